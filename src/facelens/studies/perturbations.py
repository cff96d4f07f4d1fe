"""Graded image perturbations of an aligned face chip, for item-response curves (psychophysics).

RichardWebster et al. (ECCV 2018) degrade a face step by step and record where a face matcher stops
recognizing it. Each perturbation here is a module-level function ``fn(chip, landmarks, level, ...)``
so that ``functools.partial(fn, level=...)`` is a picklable chip variant for
:func:`facelens.studies.features.extract` (``fn(chip, landmarks) -> chip``) and can run on Ray.

Levels are stated in units that mean the same on every model's chip:

========== ==================================================== ===============
name       level                                                none → destroyed
========== ==================================================== ===============
blur       Gaussian σ in inter-ocular distances (iod)           0 → 0.5
noise      additive Gaussian σ as a fraction of 255              0 → 0.6
contrast   contrast factor around the chip's mean intensity      1 → 0
brightness offset added to every pixel, as a fraction of 255    0 → 1 (white)
occlusion  share of the landmark face box covered by a patch    0 → 1
jpeg       JPEG quality (OpenCV encoder)                        100 → 1
rotation   rotation about the landmark centre, degrees          0 → 180
========== ==================================================== ===============

Random perturbations (noise, random occlusion) are seeded per face: the generator is keyed by
``seed`` and a checksum of the landmarks, so the same face always gets the same noise and different
faces get different noise, whichever worker processes them.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import FaceLensError
from ..faces.anonymize import iod

__all__ = [
    "PERTURBATIONS",
    "Perturbation",
    "blur",
    "brightness",
    "contrast",
    "get_perturbation",
    "jpeg",
    "noise",
    "occlusion",
    "perturb",
    "rotation",
]


def _check(chip: np.ndarray) -> np.ndarray:
    arr = np.asarray(chip)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise FaceLensError(f"perturbations need a uint8 H×W×3 chip, got {arr.dtype} {arr.shape}")
    return arr


def _rng(landmarks: np.ndarray, seed: int) -> np.random.Generator:
    """A generator keyed by the seed and the face (its landmarks), identical in every process."""
    key = zlib.crc32(np.round(np.asarray(landmarks, np.float64), 2).tobytes())
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, key])


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def blur(chip: np.ndarray, landmarks: np.ndarray, level: float) -> np.ndarray:
    """Gaussian blur with σ = ``level`` × the inter-ocular distance (0 leaves the chip unchanged)."""
    img = _check(chip)
    sigma = float(level) * iod(landmarks)
    if sigma <= 0:
        return img.copy()
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def noise(chip: np.ndarray, landmarks: np.ndarray, level: float, seed: int = 0) -> np.ndarray:
    """Additive Gaussian noise, σ = ``level`` × 255, independent per pixel and channel, clipped to 0–255."""
    img = _check(chip)
    if level <= 0:
        return img.copy()
    rng = _rng(landmarks, seed)
    return _to_uint8(img.astype(np.float32) + rng.normal(0.0, float(level) * 255.0, img.shape).astype(np.float32))


def contrast(chip: np.ndarray, landmarks: np.ndarray, level: float) -> np.ndarray:
    """Scale deviations from the chip's mean intensity by ``level`` (1 = unchanged, 0 = flat grey)."""
    img = _check(chip).astype(np.float32)
    mean = img.mean()
    return _to_uint8(mean + float(level) * (img - mean))


def brightness(chip: np.ndarray, landmarks: np.ndarray, level: float) -> np.ndarray:
    """Add ``level`` × 255 to every pixel (clipped): 1 turns every pixel white, negative levels darken."""
    img = _check(chip).astype(np.float32)
    return _to_uint8(img + float(level) * 255.0)


def occlusion(chip: np.ndarray, landmarks: np.ndarray, level: float, mode: str = "centre", seed: int = 0,
              fill: int = 0) -> np.ndarray:
    """Cover ``level`` of the face box (the landmarks' bounding box) with a ``fill`` patch.

    The patch has the face box's aspect ratio and sides ``sqrt(level)`` times as long, so its area is
    exactly the stated share and ``level = 1`` covers the whole box. ``mode="centre"`` centres it on
    the box; ``"random"`` places it uniformly inside the box (seeded per face).
    """
    img = _check(chip).copy()
    if mode not in ("centre", "random"):
        raise FaceLensError(f"occlusion mode must be 'centre' or 'random', got {mode!r}")
    level = float(np.clip(level, 0.0, 1.0))
    if level <= 0:
        return img
    pts = np.asarray(landmarks, np.float64)
    h, w = img.shape[:2]
    x0, y0 = np.clip(pts.min(0), 0, [w, h])
    x1, y1 = np.clip(pts.max(0), 0, [w, h])
    bw, bh = (x1 - x0) * np.sqrt(level), (y1 - y0) * np.sqrt(level)
    if mode == "centre":
        px, py = x0 + (x1 - x0 - bw) / 2, y0 + (y1 - y0 - bh) / 2
    else:
        rng = _rng(landmarks, seed)
        px, py = x0 + rng.uniform(0, x1 - x0 - bw), y0 + rng.uniform(0, y1 - y0 - bh)
    r0, r1 = round(py), round(py + bh)
    c0, c1 = round(px), round(px + bw)
    img[max(r0, 0):min(r1, h), max(c0, 0):min(c1, w)] = np.uint8(fill)
    return img


def jpeg(chip: np.ndarray, landmarks: np.ndarray, level: float) -> np.ndarray:
    """Encode and decode with OpenCV's JPEG encoder at quality ``level`` (1–100)."""
    img = _check(chip)
    quality = int(np.clip(round(float(level)), 1, 100))
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise FaceLensError(f"OpenCV could not JPEG-encode a {img.shape} chip at quality {quality}")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def rotation(chip: np.ndarray, landmarks: np.ndarray, level: float) -> np.ndarray:
    """Rotate by ``level`` degrees (counter-clockwise) about the landmarks' centre; black corners."""
    img = _check(chip)
    if float(level) % 360 == 0:
        return img.copy()
    cx, cy = np.asarray(landmarks, np.float64).mean(0)
    m = cv2.getRotationMatrix2D((float(cx), float(cy)), float(level), 1.0)
    return cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


@dataclass(frozen=True)
class Perturbation:
    """One graded perturbation: its function, the unit of its level, and a default sweep.

    ``levels`` runs from ``none`` (no change, or none visible for JPEG quality 100) to a level at which
    a face is destroyed for a human observer; ``at(level)`` gives the picklable chip variant.
    """

    name: str
    fn: Callable[..., np.ndarray]
    unit: str
    levels: tuple[float, ...]
    none: float
    description: str

    def at(self, level: float, **options: object) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """The chip variant ``fn(chip, landmarks) -> chip`` at ``level`` (a picklable partial)."""
        return functools.partial(self.fn, level=float(level), **options)

    def label(self, level: float) -> str:
        return f"{self.name}@{float(level):g}"

    def variants(self, levels: Sequence[float] | None = None,
                 **options: object) -> list[tuple[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]]:
        """``(name, fn)`` chip variants for a sweep (the default sweep when ``levels`` is None)."""
        return [(self.label(lv), self.at(lv, **options)) for lv in (self.levels if levels is None else levels)]

    def destruction(self, levels: Sequence[float] | np.ndarray) -> np.ndarray:
        """Where each level lies between ``none`` (0) and the end of the default sweep (1)."""
        end = self.levels[-1]
        return (np.asarray(levels, np.float64) - self.none) / (end - self.none)

    @property
    def is_identity_at_none(self) -> bool:
        """Whether the ``none`` level returns the chip unchanged (all but JPEG)."""
        return self.name != "jpeg"


PERTURBATIONS: dict[str, Perturbation] = {p.name: p for p in (
    Perturbation("blur", blur, "σ (× inter-ocular distance)", (0, 0.03, 0.06, 0.09, 0.12, 0.15, 0.2, 0.3, 0.5), 0.0,
                 "Gaussian blur"),
    Perturbation("noise", noise, "σ (fraction of 255)", (0, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6), 0.0,
                 "additive Gaussian noise"),
    Perturbation("contrast", contrast, "contrast factor", (1.0, 0.5, 0.2, 0.1, 0.07, 0.05, 0.035, 0.02, 0.01, 0.0),
                 1.0,
                 "reduced contrast (toward flat grey)"),
    Perturbation("brightness", brightness, "offset (fraction of 255)", (0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0),
                 0.0, "brighter (toward white)"),
    Perturbation("occlusion", occlusion, "share of the face box covered", (0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
                 0.0, "a black patch over the face"),
    Perturbation("jpeg", jpeg, "JPEG quality", (100, 50, 30, 20, 15, 10, 6, 3, 1), 100.0, "JPEG compression"),
    Perturbation("rotation", rotation, "degrees", (0, 10, 20, 25, 30, 35, 45, 60, 90, 180), 0.0,
                 "in-plane rotation"),
)}


def get_perturbation(name: str) -> Perturbation:
    if name not in PERTURBATIONS:
        raise FaceLensError(f"unknown perturbation {name!r}; choose from {', '.join(PERTURBATIONS)}")
    return PERTURBATIONS[name]


def perturb(chip: np.ndarray, landmarks: np.ndarray, name: str, level: float, **options: object) -> np.ndarray:
    """Apply the perturbation ``name`` at ``level`` to one chip (see the module table for units)."""
    return get_perturbation(name).at(level, **options)(chip, landmarks)
