"""A user's own network file (ONNX, TorchScript or a state dict) as a `FaceModel`, under a family preset.

Why each format is handled the way it is:

* **ONNX** is converted to plain torch modules with ``onnx2torch``, so every explainer sees named
  convolutions and can hook and backpropagate through them. A converter can be wrong, so the
  converted module is checked against onnxruntime (CPU) on seeded inputs at load time; the largest
  gap is recorded in the model, and a gap above ``PARITY_TOLERANCE`` refuses the file rather than
  explaining a network that is not the user's.
* **TorchScript** is run as saved (``torch.jit.load``): it holds code, but code the TorchScript
  compiler wrote, not arbitrary Python.
* **State dicts** are read with ``torch.load(weights_only=True)`` and nothing else. A pickled
  ``nn.Module`` (``torch.save(model)``) can run any code while loading, so it is refused with a
  line saying how to save the network instead.

A trailing ``Softmax`` of an ONNX classifier is dropped: facelens classifiers return logits
(:mod:`facelens.models.base`), and gradients of saturated probabilities explain little.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..weights import _sha256
from .base import FaceModel, Task

if TYPE_CHECKING:
    import onnx

    from .presets import Preset

__all__ = ["MODEL_SUFFIXES", "PARITY_INPUTS", "PARITY_TOLERANCE", "load_model_file"]

#: file endings that make `load_model` treat a name as a user's model file
MODEL_SUFFIXES = (".onnx", ".pt", ".pth", ".ts")
#: the largest |torch − onnxruntime| accepted at load; float32 conversions of the same graph agree to ~1e-6
PARITY_TOLERANCE = 1e-4
#: seeded inputs the parity check runs
PARITY_INPUTS = 3


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (protobuf and torch errors span several)."""
    text = " ".join(str(exc).split())
    return text[:300] + ("…" if len(text) > 300 else "") if text else type(exc).__name__


def _fmt_shape(dims: Sequence[int | str]) -> str:
    return "×".join(str(d) for d in dims)


def load_model_file(path: str | os.PathLike[str], preset: Preset | str | os.PathLike[str] | dict[str, Any], *,
                    task: Task | None = None, class_names: Sequence[str] | None = None, name: str | None = None,
                    arch: str | None = None) -> FaceModel:
    """Load a network file and wrap it with ``preset``'s chip recipe and input normalization.

    ``preset`` is a `Preset`, a preset name (``arcface``, ``facenet``, ``dlib``), a TOML path or a
    mapping (:func:`facelens.models.presets.get_preset`). ``task`` defaults to ``classification``
    when ``class_names`` are given or the ONNX graph ends in a Softmax, else ``embedding``. ``arch``
    names the architecture a state dict belongs to (``torchvision:<arch>``). Every problem the
    file can cause is a one-line `ModelError` naming it.
    """
    from .presets import get_preset

    preset = get_preset(preset)  # type: ignore[arg-type]
    file = Path(path)
    shown = str(path)
    if not file.is_file():
        raise ModelError(f"{shown}: no such model file")
    if task not in (None, "embedding", "classification"):
        raise ModelError(f"{shown}: task must be 'embedding' or 'classification', got {task!r}")
    if task == "embedding" and class_names:
        raise ModelError(f"{shown}: class_names make a classifier; drop them or pass task='classification'")
    kind = _file_kind(file)
    if kind == "onnx":
        body, info, task, class_names = _load_onnx(file, shown, preset, task, class_names)
    elif kind == "torchscript":
        body, info = _load_torchscript(file, shown)
    else:
        body, info = _load_state_dict(file, shown, arch)
    return _finish(body, file, shown, preset, info, task=task, class_names=class_names, name=name)


# -- what kind of file ----------------------------------------------------------------------------
def _file_kind(file: Path) -> str:
    """``onnx``, ``torchscript`` or ``torch`` (a torch.save archive): by content, then by suffix.

    TorchScript and torch.save archives are both zip files; only TorchScript stores its ``code/``.
    """
    if zipfile.is_zipfile(file):
        try:
            with zipfile.ZipFile(file) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ModelError(f"{file}: unreadable zip archive ({_one_line(exc)})") from exc
        if any("/code/" in n or n.startswith("code/") or n.endswith("constants.pkl") for n in names):
            return "torchscript"
        return "torch"
    if file.suffix.lower() in (".pt", ".pth", ".ts"):
        return "torch"  # legacy (pre-1.6) torch.save files are plain pickles; torch.load(weights_only) judges
    return "onnx"


# -- ONNX -----------------------------------------------------------------------------------------
def _register_pad18() -> None:
    """onnx2torch 1.5.15 has no converter for Pad at opset 18 (dlib's age-v1.onnx uses it).

    Pad-18 only added the optional ``axes`` input; without it Pad-18 is Pad-13, so the Pad-13
    converter is reused for those nodes and a node that does use ``axes`` is refused by name.
    """
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, get_converter

    key = OperationDescription(domain="", operation_type="Pad", version=18)
    if key in _CONVERTER_REGISTRY:
        return
    pad13 = get_converter(operation_type="Pad", version=13)

    def convert_pad18(node: Any, graph: Any) -> Any:
        if len(node.input_values) > 3 and node.input_values[3]:
            raise NotImplementedError(f"Converter is not implemented (operation_type='Pad', version=18 with axes; "
                                      f"node {node.name})")
        return pad13(node, graph)

    _CONVERTER_REGISTRY[key] = convert_pad18


def _graph_inputs(model: onnx.ModelProto) -> list[Any]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _dims(value_info: Any) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "N")
            for d in value_info.type.tensor_type.shape.dim]


def _strip_softmax(model: onnx.ModelProto) -> bool:
    """Drop the Softmax that produces the graph's only output; True if there was one."""
    out = model.graph.output[0].name
    producers = [n for n in model.graph.node if out in n.output]
    if len(producers) != 1 or producers[0].op_type != "Softmax":
        return False
    node = producers[0]
    if any(out in n.input for n in model.graph.node):
        return False
    model.graph.node.remove(node)
    model.graph.output[0].name = node.input[0]
    return True


def _load_onnx(file: Path, shown: str, preset: Preset, task: Task | None,
               class_names: Sequence[str] | None) -> tuple[nn.Module, dict[str, object], Task, list[str] | None]:
    import onnx

    try:
        model = onnx.load(str(file))
    except Exception as exc:  # protobuf DecodeError, OSError, ...
        raise ModelError(f"{shown}: not a readable ONNX model, TorchScript or state dict ({_one_line(exc)})") from exc
    inputs = _graph_inputs(model)
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise ModelError(f"{shown}: has {len(inputs)} inputs and {len(model.graph.output)} outputs; facelens "
                         f"needs one image input and one output")
    dims = _dims(inputs[0])
    h, w = preset.recipe.chip_hw
    if len(dims) != 4:
        raise ModelError(f"{shown} takes a {_fmt_shape(dims) or 'scalar'} input; facelens feeds N×3×H×W chips")
    if isinstance(dims[1], int) and dims[1] != 3:
        raise ModelError(f"{shown} takes {_fmt_shape(dims)} ({dims[1]} channels); preset {preset.name} "
                         f"gives 3-channel {preset.channels} chips")
    fixed = [d for d in dims[2:] if isinstance(d, int)]
    if len(fixed) == 2 and (dims[2], dims[3]) != (h, w):
        want = f"size {dims[2]}" if dims[2] == dims[3] else f"a {dims[2]}×{dims[3]} chip"
        raise ModelError(f"{shown} takes {_fmt_shape(dims)}, preset {preset.name} gives {h}×{w} chips; "
                         f"pass a preset with {want}")
    dropped = False
    if task in (None, "classification"):
        dropped = _strip_softmax(model)
    if dropped or class_names:
        task = "classification"
    task = task or "embedding"

    _register_pad18()
    _check_operators(model, shown)
    import onnx2torch

    try:
        converted = onnx2torch.convert(model)
    except (NotImplementedError, KeyError) as exc:
        msg = str(exc)
        op = re.search(r"operation_type='([^']+)', version=(\d+)", msg)
        what = f"operator {op.group(1)} (version {op.group(2)})" if op else _one_line(exc)
        raise ModelError(f"{shown}: onnx2torch cannot convert {what}; facelens can only explain what it converts"
                         ) from exc
    except Exception as exc:
        raise ModelError(f"{shown}: onnx2torch could not convert the graph ({_one_line(exc)})") from exc
    converted.eval()

    batch_fixed = isinstance(dims[0], int) and dims[0] > 0
    parity, out_dim = _onnx_parity(model, converted, inputs[0].name, preset, shown, batch_fixed)
    if task == "classification" and not class_names:
        class_names = [str(i) for i in range(out_dim)]
    if class_names is not None and len(class_names) != out_dim:
        raise ModelError(f"{shown} outputs {out_dim} values per face, but {len(class_names)} class names were given")
    info: dict[str, object] = {
        "format": "onnx", "input_shape": _fmt_shape(dims), "output_dim": out_dim,
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "parity_max_abs": parity, "parity_reference": f"onnxruntime CPU, {PARITY_INPUTS} seeded inputs",
        "dropped_softmax": dropped,
    }
    return converted, info, task, list(class_names) if class_names is not None else None


def _check_operators(model: onnx.ModelProto, shown: str) -> None:
    """Name the first node onnx2torch has no converter for, before converting (its own error names no node)."""
    from onnx2torch.node_converters.registry import get_converter

    opsets = {o.domain or "": o.version for o in model.opset_import}
    missing: dict[str, str] = {}
    for node in model.graph.node:
        domain = node.domain or ""
        try:
            get_converter(operation_type=node.op_type, version=opsets.get(domain, 1), domain=domain)
        except NotImplementedError:
            missing.setdefault(node.op_type, node.name or "unnamed")
    if missing:
        first, node_name = next(iter(missing.items()))
        others = f" (also {', '.join(list(missing)[1:])})" if len(missing) > 1 else ""
        raise ModelError(f"{shown}: onnx2torch cannot convert operator {first} at opset "
                         f"{opsets.get('', '?')} (node {node_name}){others}; facelens can only explain what it "
                         f"converts")


def _seeded_inputs(preset: Preset, n: int) -> torch.Tensor:
    """``n`` seeded chips in the network's input space: uniform RGB in [0, 1] through the preset's normalizer."""
    h, w = preset.recipe.chip_hw
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, h, w, generator=gen)
    with torch.no_grad():
        return preset.normalizer()(x)


def _onnx_parity(model: onnx.ModelProto, converted: nn.Module, input_name: str, preset: Preset, shown: str,
                 batch_fixed: bool) -> tuple[float, int]:
    """Max |converted − onnxruntime| on seeded inputs, and the output size per face; refuses a gap above tolerance."""
    import onnxruntime as ort

    x = _seeded_inputs(preset, PARITY_INPUTS)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        batches = [x[i:i + 1] for i in range(len(x))] if batch_fixed else [x]
        ref = np.concatenate([session.run(None, {input_name: b.numpy()})[0] for b in batches])
    except Exception as exc:
        raise ModelError(f"{shown}: onnxruntime cannot run it on {_fmt_shape([1, 3, *preset.recipe.chip_hw])} "
                         f"chips from preset {preset.name} ({_one_line(exc)})") from exc
    with torch.no_grad():
        try:
            got = torch.cat([converted(b) for b in ([x[i:i + 1] for i in range(len(x))] if batch_fixed else [x])])
        except Exception as exc:
            raise ModelError(f"{shown}: the converted network fails on preset {preset.name}'s chips "
                             f"({_one_line(exc)})") from exc
    got_np = got.numpy()
    if got_np.shape != ref.shape:
        raise ModelError(f"{shown}: converted output {got_np.shape} differs in shape from onnxruntime's {ref.shape}")
    if got_np.ndim != 2:
        raise ModelError(f"{shown} outputs {_fmt_shape(ref.shape)} per batch; facelens needs one vector per face "
                         f"(N×D)")
    gap = float(np.max(np.abs(got_np.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
    if not np.isfinite(gap) or gap > PARITY_TOLERANCE:
        raise ModelError(f"{shown}: the onnx2torch conversion differs from onnxruntime by up to {gap:.3g} "
                         f"(tolerance {PARITY_TOLERANCE:g}); refusing to explain a different network")
    return gap, int(ref.shape[1])


# -- TorchScript and state dicts ------------------------------------------------------------------
def _load_torchscript(file: Path, shown: str) -> tuple[nn.Module, dict[str, object]]:
    try:
        module = torch.jit.load(str(file), map_location="cpu")
    except Exception as exc:
        raise ModelError(f"{shown}: not a loadable TorchScript archive ({_one_line(exc)})") from exc
    module.eval()
    return module, {"format": "torchscript", "parity_max_abs": None,
                    "parity_reference": "none: TorchScript runs as saved"}


def _read_state(file: Path, shown: str) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary objects."""
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(f"{shown} is a pickled Python object (torch.save(model)), which facelens never unpickles; "
                         f"save it as TorchScript (torch.jit.save(torch.jit.script(model), path)) or as a state_dict "
                         f"(torch.save(model.state_dict(), path))"
                         ) from exc
    except Exception as exc:
        raise ModelError(f"{shown}: not a TorchScript, state-dict or ONNX file ({_one_line(exc)})") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{shown}: holds {type(obj).__name__}, not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_state_dict(file: Path, shown: str, arch: str | None) -> tuple[nn.Module, dict[str, object]]:
    state = _read_state(file, shown)
    if arch is None:
        raise ModelError(f"{shown} is a state dict: name its architecture (arch='torchvision:resnet18'), or save "
                         f"the network as TorchScript or ONNX")
    if not arch.startswith("torchvision:"):
        raise ModelError(f"{shown}: architecture {arch!r} is not known; use 'torchvision:<arch>'")
    import torchvision

    arch_name = arch.split(":", 1)[1]
    if arch_name not in torchvision.models.list_models():
        raise ModelError(f"{shown}: torchvision has no architecture {arch_name!r}")
    linears = [v for k, v in state.items() if k.endswith(".weight") and v.ndim == 2]
    kwargs = {"num_classes": int(linears[-1].shape[0])} if linears else {}
    try:
        module = torchvision.models.get_model(arch_name, weights=None, **kwargs)
        module.load_state_dict(state, strict=True)
    except Exception as exc:
        raise ModelError(f"{shown} does not fit {arch} ({_one_line(exc)})") from exc
    module.eval()
    return module, {"format": "state_dict", "arch": arch, "parity_max_abs": None,
                    "parity_reference": "none: weights loaded into a torch architecture"}


# -- common tail ----------------------------------------------------------------------------------
def _finish(body: nn.Module, file: Path, shown: str, preset: Preset, info: dict[str, object], *,
            task: Task | None, class_names: Sequence[str] | None, name: str | None) -> FaceModel:
    from .registry import _no_inplace, default_layers

    if not isinstance(body, torch.jit.ScriptModule):
        _no_inplace(body)
    net = nn.Sequential(OrderedDict([("normalize", preset.normalizer()), ("model", body)]))
    for param in net.parameters():
        param.requires_grad_(False)
    net.eval()
    h, w = preset.recipe.chip_hw
    if info.get("output_dim") is None:  # torch files declare no shapes: try the preset's chips
        with torch.no_grad():
            try:
                out = net(torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0)))
            except Exception as exc:
                raise ModelError(f"{shown} fails on 2×3×{h}×{w} chips from preset {preset.name} "
                                 f"({_one_line(exc)}); pass a preset with the size it was trained on") from exc
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            shape = _fmt_shape(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(f"{shown} outputs {shape} for 2 chips; facelens needs one vector per face (N×D)")
        info["output_dim"] = int(out.shape[1])
        info["input_shape"] = f"N×3×{h}×{w}"
    out_dim = int(info["output_dim"])  # type: ignore[call-overload]
    if class_names:
        task = "classification"
        if len(class_names) != out_dim:
            raise ModelError(f"{shown} outputs {out_dim} values per face, but {len(class_names)} class names "
                             f"were given")
    elif task == "classification":
        class_names = [str(i) for i in range(out_dim)]
    task = task or "embedding"
    sha = _sha256(file)  # the weights module's streaming hash: the same digest `facelens models` shows
    info.update(path=str(file.resolve()), sha256=sha, preset=preset.name, preset_spec=preset.as_dict(),
                input_size=f"{h}×{w}", task=task)
    parity = info.get("parity_max_abs")
    parity_text = (f"max |Δ| vs {str(info['parity_reference']).split(',')[0]} {parity:.2g}"
                   if isinstance(parity, float) else str(info["parity_reference"]))
    if info.get("dropped_softmax"):
        parity_text += "; final Softmax dropped (logits)"
    return FaceModel(
        name=name or file.name, task=task, net=net, input_size=(h, w), recipe=preset.recipe,
        class_names=list(class_names) if class_names else None, layers=default_layers(net),
        preprocessing=preset.describe(), license="user", source=str(file.resolve()),
        description=f"{file.name} ({info['format']}, sha256 {sha[:12]}…) with preset {preset.name}; {parity_text}",
        provenance=info,
    )
