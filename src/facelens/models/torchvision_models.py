"""ImageNet models from torchvision, as in the classic VGG16 explainability workshop.

Weights are never downloaded here: they come from torchvision's own cache
(``torch.hub.get_dir()/checkpoints``), where an earlier ``torchvision`` download
or a copied file puts them, or from a file the user names. Random weights only
with an explicit ``weights=None``, and the model then says so in its name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from ..errors import ModelError, WeightsError
from ..faces.align import AlignRecipe
from .base import FaceModel
from .layers import Normalize
from .registry import _no_inplace, default_layers

__all__ = ["build_torchvision", "list_torchvision_rows", "torchvision_weight_file"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SHOWN_ARCHS = ("vgg16", "resnet50", "resnet18")

# Depth aliases chosen by hand where the generic guess would land mid-block.
_KNOWN_LAYERS = {
    "vgg16": {"early": "model.features.8", "mid": "model.features.22", "late": "model.features.29"},
    "vgg19": {"early": "model.features.8", "mid": "model.features.26", "late": "model.features.35"},
    "resnet18": {"early": "model.layer1", "mid": "model.layer3", "late": "model.layer4"},
    "resnet34": {"early": "model.layer1", "mid": "model.layer3", "late": "model.layer4"},
    "resnet50": {"early": "model.layer1", "mid": "model.layer3", "late": "model.layer4"},
    "resnet101": {"early": "model.layer1", "mid": "model.layer3", "late": "model.layer4"},
}


def _default_weights(arch: str) -> torchvision.models.WeightsEnum:
    try:
        return torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError) as exc:
        raise ModelError(f"torchvision has no pretrained weights for {arch!r}: {exc}") from None


def torchvision_weight_file(arch: str) -> Path:
    """Where torchvision keeps this architecture's default ImageNet weights."""
    url = _default_weights(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _check_hash_prefix(path: Path) -> None:
    """torchvision file names carry a sha256 prefix (``vgg16-397923af.pth``); hold files to it."""
    stem = path.stem
    prefix = stem.rsplit("-", 1)[-1] if "-" in stem else ""
    if len(prefix) < 8 or any(c not in "0123456789abcdef" for c in prefix):
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if not h.hexdigest().startswith(prefix):
        raise WeightsError(f"{path}: sha256 does not start with {prefix}; the file is corrupt or not this model")


def list_torchvision_rows() -> list[dict[str, object]]:
    rows = []
    for arch in _SHOWN_ARCHS:
        f = torchvision_weight_file(arch)
        rows.append({
            "name": f"torchvision:{arch}", "task": "classification", "input": "224×224 RGB, whole image",
            "license": "BSD-3-Clause (torchvision); ImageNet weights: see torchvision docs",
            "source": f"torchvision cache {f.name}", "cached": f.is_file(),
            "description": f"ImageNet {arch} (any torchvision:<arch> works when its weights are present)",
        })
    return rows


def build_torchvision(arch: str, weights: object = "default") -> FaceModel:
    """A torchvision ImageNet classifier wrapped as a `FaceModel` (224×224, whole image)."""
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(f"torchvision has no classification model {arch!r}")
    try:
        enum = _default_weights(arch)
        categories = list(enum.meta["categories"])
    except ModelError:
        enum, categories = None, [str(i) for i in range(1000)]
    module = torchvision.models.get_model(arch, weights=None)
    if weights is None:
        name, source = f"torchvision:{arch} (random weights)", "random initialization (weights=None)"
    else:
        path = torchvision_weight_file(arch) if weights == "default" else Path(str(weights))
        if not path.is_file():
            raise WeightsError(
                f"no ImageNet weights for torchvision:{arch} at {path}. facelens never downloads them: "
                f"copy the file there (from a machine where torchvision downloaded it), pass "
                f"weights='/path/to/{path.name}', or weights=None for explicitly random weights."
            )
        if weights == "default":
            _check_hash_prefix(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            module.load_state_dict(state)
        except Exception as exc:
            raise WeightsError(f"{path}: not a {arch} state dict ({type(exc).__name__}: {exc})") from exc
        name, source = f"torchvision:{arch}", f"torchvision weights file {path}"
    _no_inplace(module)
    net = nn.Sequential()
    net.add_module("normalize", Normalize(tuple(255 * m for m in IMAGENET_MEAN), tuple(255 * s for s in IMAGENET_STD)))
    net.add_module("model", module)
    return FaceModel(
        name=name, task="classification", net=net, input_size=(224, 224),
        recipe=AlignRecipe(size=224, padding=0.0, method="none"), class_names=categories,
        layers=_KNOWN_LAYERS.get(arch) or default_layers(net),
        preprocessing="ImageNet: (RGB/255 − [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]",
        license="BSD-3-Clause code; ImageNet-trained weights (non-commercial research terms of ImageNet)",
        source=source, description=f"ImageNet {arch}" + (" with RANDOM weights" if weights is None else ""),
    )
