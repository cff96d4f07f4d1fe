"""Landmark-placed anonymization: the CNIL eye bar, region masks, and face blur or pixelation.

Every mask is placed from the 68 landmarks of the face, in whatever frame they are given (photo or
aligned chip), so the same call anonymizes a photo before detection or a chip before the network.
Strengths are relative to the inter-ocular distance (iod), so "blur 0.2" means the same to a face of
40 pixels and to one of 400: a Gaussian σ of 0.2 iod, or pixel blocks of 0.2 iod.

>>> import numpy as np
>>> from facelens.faces.anonymize import ANONYMIZATIONS
>>> sorted(ANONYMIZATIONS)[:3]
['blur', 'eye_bar', 'eyes_nose']
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FaceLensError
from .regions import eye_bar_mask, region_masks, regions_union

__all__ = ["ANONYMIZATIONS", "DEFAULT_STRENGTHS", "Anonymization", "anonymization_mask", "anonymize", "iod"]

#: method → what it hides (for captions and the CLI's help)
ANONYMIZATIONS: dict[str, str] = {
    "eye_bar": "a black bar over the eyes (CNIL guideline)",
    "eyes_nose": "black over both eyes and the nose",
    "mouth": "black over the mouth",
    "full_face": "black over the whole face (brows to chin)",
    "blur": "Gaussian blur of the face, σ = strength × inter-ocular distance",
    "pixelate": "pixelation of the face, blocks of strength × inter-ocular distance",
    "mask": "black over a mask given by the user",
}
#: the strengths an audit sweeps for the two graded methods
DEFAULT_STRENGTHS: dict[str, tuple[float, ...]] = {"blur": (0.05, 0.15, 0.4), "pixelate": (0.1, 0.25, 0.5)}
_REGION_OF = {"eyes_nose": "eyes_nose", "mouth": "mouth", "full_face": "face"}


@dataclass(frozen=True)
class Anonymization:
    """One anonymization setting, e.g. ``Anonymization("blur", 0.15)``; its ``label`` names it in tables."""

    method: str
    strength: float | None = None

    def __post_init__(self) -> None:
        if self.method not in ANONYMIZATIONS:
            raise FaceLensError(f"unknown anonymization {self.method!r}; choose from {', '.join(ANONYMIZATIONS)}")
        if self.method in DEFAULT_STRENGTHS and (self.strength is None or self.strength <= 0):
            raise FaceLensError(f"{self.method} needs a positive strength (× inter-ocular distance)")

    @property
    def label(self) -> str:
        return self.method if self.strength is None else f"{self.method} {self.strength:g}"


def iod(landmarks68: np.ndarray) -> float:
    """Inter-ocular distance: between the centres of the two eyes' six landmarks."""
    pts = np.asarray(landmarks68, np.float64)
    return float(np.linalg.norm(pts[42:48].mean(0) - pts[36:42].mean(0)))


def anonymization_mask(shape_hw: tuple[int, int], landmarks68: np.ndarray, method: str,
                       mask: np.ndarray | None = None) -> np.ndarray:
    """The boolean area a method changes (blur and pixelation change the whole face)."""
    if method == "eye_bar":
        return eye_bar_mask(shape_hw, landmarks68)
    if method == "mask":
        if mask is None:
            raise FaceLensError("the 'mask' anonymization needs a mask")
        m = np.asarray(mask, bool)
        if m.shape != tuple(shape_hw):
            raise FaceLensError(f"the mask is {m.shape[0]}×{m.shape[1]}, the image {shape_hw[0]}×{shape_hw[1]}")
        return m
    region = _REGION_OF.get(method, "face")
    return regions_union(region_masks(shape_hw, landmarks68), region)


def anonymize(image: np.ndarray, landmarks68: np.ndarray, method: str | Anonymization,
              strength: float | None = None, *, mask: np.ndarray | None = None,
              fill: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """A copy of the RGB uint8 ``image`` with the face anonymized by ``method`` (see `ANONYMIZATIONS`)."""
    setting = method if isinstance(method, Anonymization) else Anonymization(method, strength)
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise FaceLensError(f"anonymize needs an H×W×3 uint8 RGB image, got {img.dtype} {img.shape}")
    area = anonymization_mask(img.shape[:2], landmarks68, setting.method, mask)
    out = img.copy()
    if setting.method == "blur":
        import cv2

        sigma = max(setting.strength * iod(landmarks68), 0.5)  # type: ignore[operator]
        blurred = cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
        out[area] = blurred[area]
    elif setting.method == "pixelate":
        out[area] = _pixelate(img, max(round(setting.strength * iod(landmarks68)), 2))[area]  # type: ignore[operator]
    else:
        out[area] = np.asarray(fill, np.uint8)
    return out


def _pixelate(img: np.ndarray, block: int) -> np.ndarray:
    """Mean colour per ``block``×``block`` tile (area averaging, then nearest-neighbour back up)."""
    import cv2

    h, w = img.shape[:2]
    small = cv2.resize(img, (max(w // block, 1), max(h // block, 1)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
