"""Control maps: what a faithfulness number must beat before it means anything.

Every metric is evaluated on these beside the methods, at the same steps and saliency mass:

* ``random``: seeded uniform noise on a 7×7 grid, upsampled bilinearly (RISE's grid). It removes the
  face in blobs, as most saliency maps do; random *pixel* order is an easier control for deletion
  (pixels scattered over the face are blurred away without removing its identity: on dlib-resnet its
  deletion AUC is 1.6× that of the smooth random map) and is not used for that reason.
* ``edges``: the Sobel gradient magnitude of the chip, lightly smoothed: a model-free map that knows
  where the image has structure but nothing about the network.
* ``centre``: an isotropic Gaussian at the chip centre (σ = a quarter of the side): the centre prior
  of aligned faces, also model-free.

A method that does not beat ``random`` explains nothing measurable; one that does not beat ``edges``
or ``centre`` adds nothing beyond the image or the alignment. Each control is seeded per photo (from
the photo's label), so a photo gets the same random map however the run is batched or distributed.

Example:
    >>> import numpy as np
    >>> chip = np.zeros((32, 32, 3), np.uint8); chip[8:24, 8:24] = 255
    >>> m = control_maps(chip, "a.jpg", seed=0)
    >>> sorted(m), m["edges"].shape
    (['centre', 'edges', 'random'], (32, 32))
"""

from __future__ import annotations

import zlib

import cv2
import numpy as np

__all__ = ["CONTROLS", "centre_map", "control_maps", "edge_map", "random_map"]

CONTROLS: tuple[str, ...] = ("random", "edges", "centre")
RANDOM_GRID = 7


def _photo_seed(seed: int, label: str) -> int:
    return (zlib.crc32(label.encode()) ^ (int(seed) * 0x9E3779B1)) & 0x7FFFFFFF


def random_map(shape: tuple[int, int], seed: int, label: str = "") -> np.ndarray:
    """Uniform noise on a 7×7 grid, upsampled bilinearly (half-pixel centres) to ``shape``."""
    rng = np.random.default_rng(_photo_seed(seed, label))
    grid = rng.random((RANDOM_GRID, RANDOM_GRID)).astype(np.float32)
    h, w = shape
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)


def edge_map(chip: np.ndarray, smooth: float = 1.5) -> np.ndarray:
    """Sobel gradient magnitude of the chip's luminance, Gaussian-smoothed by ``smooth`` pixels."""
    img = np.asarray(chip)
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img
    g = gray.astype(np.float32) / 255.0
    mag = np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3))
    return cv2.GaussianBlur(mag, (0, 0), smooth) if smooth > 0 else mag


def centre_map(shape: tuple[int, int], sigma: float = 0.25) -> np.ndarray:
    """An isotropic Gaussian at the centre, σ = ``sigma`` × the mean side."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    s = sigma * (h + w) / 2
    return np.exp(-(((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (2 * s * s))).astype(np.float32)


def control_maps(chip: np.ndarray, label: str, seed: int = 0) -> dict[str, np.ndarray]:
    """The three control maps of one chip (``H×W×3`` uint8), keyed by :data:`CONTROLS`."""
    shape = tuple(np.asarray(chip).shape[:2])
    return {"random": random_map(shape, seed, label), "edges": edge_map(chip),  # type: ignore[arg-type]
            "centre": centre_map(shape)}  # type: ignore[arg-type]
