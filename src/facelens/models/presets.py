"""Family presets: the chip geometry and input normalization each face-network family was trained with.

A network only gives its trained accuracy on chips cut and scaled the way its training data were,
so a user's ArcFace or FaceNet file needs its family's recipe, not facelens' dlib default.
Every preset says where its numbers come from (``Preset.source``).

* ``arcface``: InsightFace's ``norm_crop``, 112×112, five points fitted to ``arcface_dst``
  (``insightface/utils/face_align.py``), ``(x − 127.5) / 127.5``, RGB.
* ``facenet``: facenet-pytorch's ``extract_face``, a 160×160 square crop of the face box plus a margin,
  ``fixed_image_standardization`` ``(x − 127.5) / 128``, RGB.
* ``dlib``: dlib's 150×150 5-point chip with padding 0.25 (``dlib.get_face_chip``), and the mean
  subtraction of dlib's ``input_rgb_image_sized<150>`` layer: ``(x − (122.782, 117.001, 104.298)) / 256``.

A custom preset is a mapping or a TOML file with these keys (``x`` is a pixel in 0..255)::

    name = "my-arcface-variant"        # optional, default "custom" (or the file's stem)
    source = "our training config"     # optional
    size = 112                         # chip side in pixels
    method = "template5"               # "template5", "box", "dlib5" or "none"
    template = "arcface"               # template5 only: "arcface" (scaled to size as InsightFace
                                       # does) or 5 [x, y] points in chip pixels, image-left eye first
    # padding = 0.25                   # box and dlib5 only: margin per side, fraction of face size
    mean = [127.5, 127.5, 127.5]       # 0..255 units, in the network's channel order
    std = [127.5, 127.5, 127.5]        # or one number
    channels = "RGB"                   # "RGB" or "BGR": the channel order the network takes

The network then receives ``(x[channels] − mean) / std``.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ModelError
from ..faces.align import AlignRecipe
from .layers import Normalize

__all__ = ["ARCFACE_TEMPLATE", "PRESETS", "Preset", "arcface_template", "get_preset"]

#: InsightFace's ``arcface_dst`` (insightface/python-package/insightface/utils/face_align.py): where
#: ``norm_crop`` puts the image-left eye, image-right eye, nose tip, image-left and image-right mouth
#: corner of a 112×112 chip (the subject's right eye is the image-left one). InsightFace stores
#: them as float32; these are the decimal values it writes.
ARCFACE_TEMPLATE: tuple[tuple[float, float], ...] = (
    (38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655), (70.7299, 92.2041),
)

_KEYS = ("name", "source", "size", "method", "template", "padding", "mean", "std", "channels")
_METHODS = ("template5", "box", "dlib5", "none")


def arcface_template(size: int) -> tuple[tuple[float, float], ...]:
    """``arcface_dst`` for a ``size``×``size`` chip, scaled as InsightFace's ``estimate_norm`` does.

    Sizes divisible by 112 scale it by size/112; sizes divisible by 128 scale it by size/128 and shift
    it right by 8·size/128 (the 128-px variant of the crop). Other sizes have no InsightFace template.
    """
    if size % 112 == 0:
        ratio, shift = size / 112.0, 0.0
    elif size % 128 == 0:
        ratio, shift = size / 128.0, 8.0 * size / 128.0
    else:
        raise ModelError(f"InsightFace defines the ArcFace template for sizes divisible by 112 or 128, not {size}")
    return tuple((x * ratio + shift, y * ratio) for x, y in ARCFACE_TEMPLATE)


class SwapRB(nn.Module):
    """Reverse the channel order (RGB ↔ BGR) as a module of its own, so hook-based explainers see it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1)


@dataclass(frozen=True)
class Preset:
    """A family's chip recipe and input normalization, with where they come from.

    ``mean`` and ``std`` are in 0..255 pixel units and in the network's channel order
    (``channels``), so they can be copied from the family's training code as written there.
    """

    name: str
    recipe: AlignRecipe
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels: Literal["RGB", "BGR"]
    source: str

    def __post_init__(self) -> None:
        if not isinstance(self.recipe, AlignRecipe):
            raise ModelError(f"preset {self.name!r}: recipe must be an AlignRecipe, got {type(self.recipe).__name__}")
        object.__setattr__(self, "mean", _triple(self.mean, "mean"))
        object.__setattr__(self, "std", _triple(self.std, "std"))
        if any(s <= 0 for s in self.std):
            raise ModelError(f"preset {self.name!r}: std must be > 0, got {list(self.std)}")
        if self.channels not in ("RGB", "BGR"):
            raise ModelError(f"preset {self.name!r}: channels must be 'RGB' or 'BGR', got {self.channels!r}")

    def normalizer(self) -> nn.Module:
        """facelens' input (N×3×H×W RGB in [0, 1]) → the network's: reorder if BGR, then ``(255·x − mean) / std``.

        A `Normalize` layer (RGB), or ``Sequential(swap_rb, normalize)`` (BGR).
        """
        normalize = Normalize(self.mean, self.std, pixel_range=255.0)
        if self.channels == "RGB":
            return normalize
        return nn.Sequential(OrderedDict([("swap_rb", SwapRB()), ("normalize", normalize)]))

    def describe(self) -> str:
        """One line for reports: chip, normalization, channel order."""
        mean, std = _fmt(self.mean), _fmt(self.std)
        return (f"{self.name}: {self.recipe.describe()}; network input ({self.channels}·255 − {mean}) / {std}"
                f" [{self.source}]")

    def as_dict(self) -> dict[str, Any]:
        """The preset in the custom-preset format; ``get_preset(p.as_dict())`` gives ``p`` back."""
        out: dict[str, Any] = {"name": self.name, "source": self.source, "size": int(self.recipe.size),
                               "method": self.recipe.method}
        if self.recipe.method == "template5":
            assert self.recipe.template is not None
            out["template"] = [list(p) for p in self.recipe.template]
        elif self.recipe.method in ("box", "dlib5"):
            out["padding"] = float(self.recipe.padding)
        out.update(mean=list(self.mean), std=list(self.std), channels=self.channels)
        return out


def _fmt(values: tuple[float, ...]) -> str:
    return str(f"{values[0]:g}") if len(set(values)) == 1 else "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _triple(value: object, key: str) -> tuple[float, float, float]:
    """Three finite floats from a number or a 3-sequence."""
    if isinstance(value, bool):
        raise ModelError(f"preset key {key!r}: expected a number or 3 numbers, got {value!r}")
    if isinstance(value, (int, float)):
        values = [float(value)] * 3
    else:
        try:
            values = [float(v) for v in value]  # type: ignore[union-attr]
        except (TypeError, ValueError) as err:
            raise ModelError(f"preset key {key!r}: expected a number or 3 numbers, got {value!r}") from err
        if len(values) != 3 or any(isinstance(v, bool) for v in value):  # type: ignore[union-attr]
            raise ModelError(f"preset key {key!r}: expected a number or 3 numbers, got {value!r}")
    if not all(math.isfinite(v) for v in values):
        raise ModelError(f"preset key {key!r}: values must be finite, got {value!r}")
    return values[0], values[1], values[2]


#: facenet-pytorch's ``extract_face`` adds ``margin`` pixels *of the final 160-px image* around the box:
#: the crop is box·160/(160 − margin). With margin 20 (the value commonly used at 160 px; MTCNN's own
#: default is 0) that is 10/140 of the box per side. Our box is dlib's HOG box, not MTCNN's, so the
#: crop is an approximation of facenet-pytorch's, not a bit-exact copy.
FACENET_MARGIN = 20
FACENET_PADDING = (FACENET_MARGIN / 2) / (160 - FACENET_MARGIN)

PRESETS: dict[str, Preset] = {
    "arcface": Preset(
        name="arcface",
        recipe=AlignRecipe(size=112, method="template5", template=ARCFACE_TEMPLATE),
        mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5), channels="RGB",
        source="InsightFace: insightface/utils/face_align.py (arcface_dst, norm_crop: skimage "
               "SimilarityTransform + cv2.warpAffine, border 0) and model_zoo/arcface_onnx.py (ArcFaceONNX.get_feat: "
               "cv2.dnn.blobFromImages(BGR images, 1/127.5, mean 127.5, swapRB=True), so the network sees RGB)",
    ),
    "facenet": Preset(
        name="facenet",
        recipe=AlignRecipe(size=160, padding=FACENET_PADDING, method="box"),
        mean=(127.5, 127.5, 127.5), std=(128.0, 128.0, 128.0), channels="RGB",
        source=f"facenet-pytorch: models/utils/detect_face.py extract_face (box + margin in output pixels, "
               f"resized to 160; margin {FACENET_MARGIN} → padding {FACENET_PADDING:.4f} of the box per side, "
               f"on dlib's HOG box instead of MTCNN's) and models/mtcnn.py fixed_image_standardization "
               f"((x − 127.5) / 128)",
    ),
    "dlib": Preset(
        name="dlib",
        recipe=AlignRecipe(size=150, padding=0.25, method="dlib5"),
        mean=(122.782, 117.001, 104.298), std=(256.0, 256.0, 256.0), channels="RGB",
        source="dlib: dlib.get_face_chip(img, shape, 150, 0.25) (dnn_face_recognition_ex.cpp) and the "
               "input_rgb_image_sized<150> layer of dlib_face_recognition_resnet_model_v1 "
               "((x − avg_rgb) / 256, the averages stored in the .dat; see facelens.models.dlib_resnet)",
    ),
}


def _template(value: object, size: int) -> object:
    """A named template scaled to ``size``, or the given points as they are: `AlignRecipe` checks them
    (shape, finiteness, order), and `_from_mapping` names the key in its error."""
    if isinstance(value, str):
        if value.lower() != "arcface":
            raise ModelError(f"preset key 'template': a named template must be 'arcface', got {value!r}")
        return arcface_template(size)
    return value


def _from_mapping(spec: Mapping[str, Any], default_name: str = "custom") -> Preset:
    """A custom preset from the documented keys; every bad key is named in the error."""
    unknown = sorted(set(spec) - set(_KEYS))
    if unknown:
        raise ModelError(f"preset key {unknown[0]!r} is not known; the keys are {', '.join(_KEYS)}")
    for key in ("size", "method", "mean", "std", "channels"):
        if key not in spec:
            raise ModelError(f"preset key {key!r} is missing (custom presets need size, method, mean, std, channels)")
    name, source = spec.get("name", default_name), spec.get("source", "custom preset")
    for key, value in (("name", name), ("source", source)):
        if not isinstance(value, str) or not value.strip():
            raise ModelError(f"preset key {key!r}: expected a non-empty string, got {value!r}")
    size = spec["size"]
    if isinstance(size, bool) or not isinstance(size, (int, float)) or int(size) != size or size < 1:
        raise ModelError(f"preset key 'size': expected a positive integer, got {size!r}")
    size = int(size)
    method = spec["method"]
    if method not in _METHODS:
        raise ModelError(f"preset key 'method': expected one of {', '.join(_METHODS)}, got {method!r}")
    template = None
    if method == "template5":
        if "template" not in spec:
            raise ModelError("preset key 'template' is missing: method 'template5' needs it")
        template = _template(spec["template"], size)
    elif "template" in spec:
        raise ModelError(f"preset key 'template' only applies to method 'template5', not {method!r}")
    if "padding" in spec and method not in ("box", "dlib5"):
        raise ModelError(f"preset key 'padding' only applies to methods 'box' and 'dlib5', not {method!r}")
    # template5 and none ignore the padding: keep AlignRecipe's default so equal recipes compare equal.
    padding = spec.get("padding", 0.0 if method == "box" else 0.25)
    if isinstance(padding, bool) or not isinstance(padding, (int, float)) or not math.isfinite(padding) or padding < 0:
        raise ModelError(f"preset key 'padding': expected a number >= 0, got {padding!r}")
    channels = spec["channels"]
    if not isinstance(channels, str) or channels.upper() not in ("RGB", "BGR"):
        raise ModelError(f"preset key 'channels': expected 'RGB' or 'BGR', got {channels!r}")
    mean, std = _triple(spec["mean"], "mean"), _triple(spec["std"], "std")
    if any(s <= 0 for s in std):
        raise ModelError(f"preset key 'std': values must be > 0, got {spec['std']!r}")
    try:
        recipe = AlignRecipe(size=size, padding=float(padding), method=method, template=template)
    except ModelError as err:
        key = "template" if method == "template5" else "size"
        raise ModelError(f"preset key {key!r}: {err}") from err
    return Preset(name=name, recipe=recipe, mean=mean, std=std, channels=channels.upper(),  # type: ignore[arg-type]
                  source=source)


def get_preset(spec: str | os.PathLike[str] | Mapping[str, Any] | Preset) -> Preset:
    """A preset by name (``PRESETS``), from a TOML file, or from a mapping of the documented keys."""
    if isinstance(spec, Preset):
        return spec
    if isinstance(spec, Mapping):
        return _from_mapping(spec)
    if isinstance(spec, str) and spec.lower() in PRESETS:
        return PRESETS[spec.lower()]
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if path.suffix.lower() != ".toml" and not path.is_file():
            raise ModelError(f"unknown preset {str(spec)!r}: use one of {', '.join(PRESETS)} or a .toml file")
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError as err:
            raise ModelError(f"preset file {path} does not exist") from err
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ModelError(f"preset file {path} could not be read: {err}") from err
        try:
            return _from_mapping(data, default_name=path.stem)
        except ModelError as err:
            raise ModelError(f"{path}: {err}") from err
    raise ModelError(f"a preset is a name, a .toml path, a mapping or a Preset, got {type(spec).__name__}")
