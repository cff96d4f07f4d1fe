"""A canonical frontal face, and warps of maps between any aligned chip and it.

Canonical saliency maps (John et al., T-BIOM 2021) compare and average saliency
across faces by moving every map onto one frontal face. The paper fits a dense
PRNet mesh; we use the dlib landmarks every facelens face already has, plus frame
points, and a piecewise-affine warp on their Delaunay triangulation.

The template is the mean of the 68 landmarks of the FRL London neutral photos
after dlib's 5-point alignment (padding 0.25, the dlib-resnet chip), computed once
by ``scripts/canonical_face.py``; only those 68×2 numbers ship, in
``facelens/data/canonical_face.json``. The canonical frame is that chip's unit
square, drawn at ``size`` pixels (128 by default), so the face sits where a dlib
chip puts it.

Outside the landmarks' hull (forehead, hair, background) the warp follows the
similarity transform that best maps the template onto the face's landmarks: frame
points of the canonical image (its border, and an outer ring far beyond it so
every chip pixel is covered) are carried by that transform and triangulated with
the landmarks.

Why our own warp: ``skimage.transform.PiecewiseAffineTransform`` with ``warp`` is
correct (it agrees with ours to 1e-3 on a unit-height map) but about 40× slower, since
it finds the triangle of every output pixel on every call (2.0 s against 50 ms per
128 px map, same busy 2-core CPU); OpenCV has no piecewise-affine warp, only one masked
``warpAffine`` per triangle. We rasterize each triangle once into a dense ``remap``
grid (barycentric coordinates, exact piecewise-affine) and let ``cv2.remap`` sample
it bilinearly. Triangles that fold over in a strongly turned face overwrite each
other in a fixed order instead of failing. The inner-lip points are left out of the mesh (see
``MESH_LANDMARKS``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ..errors import ModelError
from .align import Chip

if TYPE_CHECKING:
    from skimage.transform import SimilarityTransform

__all__ = [
    "CANONICAL_SIZE",
    "MESH_LANDMARKS",
    "CanonicalFace",
    "canonical_face",
    "canonical_to_chip_points",
    "chip_landmarks",
    "from_canonical",
    "similarity_scale",
    "template_landmarks",
    "to_canonical",
]

CANONICAL_SIZE = 128
TEMPLATE_RESOURCE = "canonical_face.json"
N_LANDMARKS = 68
# The inner-lip points (60–67) are left out of the mesh: on the closed-mouth template they almost
# coincide with the outer lip, so an open mouth would be squashed into slivers and lost; the outer
# lip (48–59) carries the whole mouth instead.
MESH_LANDMARKS = np.arange(60)
# canonical frame points in unit coordinates: the border of the frame (every quarter side)
# and a far ring, so that faces framed wider than the template are still fully covered
_BORDER = [(u, v) for u in (0.0, 0.25, 0.5, 0.75, 1.0) for v in (0.0, 1.0)] + \
          [(u, v) for u in (0.0, 1.0) for v in (0.25, 0.5, 0.75)]
_FAR_RING = [(u, v) for u in (-1.5, 0.5, 2.5) for v in (-1.5, 0.5, 2.5) if (u, v) != (0.5, 0.5)]


@lru_cache(maxsize=1)
def template_landmarks() -> np.ndarray:
    """The 68 template landmarks ``(68, 2)`` (x, y) in unit coordinates of the canonical frame."""
    text = (resources.files("facelens") / "data" / TEMPLATE_RESOURCE).read_text(encoding="utf-8")
    data = json.loads(text)
    points = np.asarray(data["landmarks"], np.float64)
    if points.shape != (N_LANDMARKS, 2):
        raise ModelError(f"{TEMPLATE_RESOURCE}: expected 68×2 landmarks, found {points.shape}")
    return points


@dataclass(frozen=True)
class CanonicalFace:
    """The canonical frame at one resolution: template landmarks, frame points, triangles.

    Attributes:
        size: side of the canonical image in pixels.
        landmarks: template landmarks ``(68, 2)`` in canonical pixels (x, y).
        frame: frame points ``(F, 2)`` in canonical pixels (border and far ring).
        triangles: ``(T, 3)`` vertex indices into ``points`` (landmarks first, then frame).
    """

    size: int
    landmarks: np.ndarray
    frame: np.ndarray
    triangles: np.ndarray

    @property
    def points(self) -> np.ndarray:
        return np.vstack([self.landmarks, self.frame])

    def face_hull(self) -> np.ndarray:
        """``size×size`` bool: the convex hull of the template landmarks (where the warp is
        landmark-driven rather than a similarity)."""
        hull = cv2.convexHull(np.round(self.landmarks).astype(np.int32))
        mask = np.zeros((self.size, self.size), np.uint8)
        cv2.fillConvexPoly(mask, hull, 1)
        return mask.astype(bool)


@lru_cache(maxsize=8)
def canonical_face(size: int = CANONICAL_SIZE) -> CanonicalFace:
    """The canonical frame at ``size`` pixels (cached)."""
    from scipy.spatial import Delaunay

    if size < 16:
        raise ModelError(f"canonical size must be at least 16 px, got {size}")
    scale = size - 1  # unit coordinates 0 and 1 are the centres of the first and last pixels
    landmarks = template_landmarks() * scale
    frame = np.asarray(_BORDER + _FAR_RING, np.float64) * scale
    points = np.vstack([landmarks, frame])
    vertices = np.r_[MESH_LANDMARKS, np.arange(N_LANDMARKS, len(points))]
    triangles = vertices[Delaunay(points[vertices]).simplices].astype(np.int64)
    return CanonicalFace(size=size, landmarks=landmarks, frame=frame, triangles=triangles)


def chip_landmarks(chip: Chip) -> np.ndarray:
    """The face's 68 landmarks ``(68, 2)`` (x, y) in chip pixels."""
    face = chip.face
    if face is None:
        raise ModelError("a canonical warp needs the face's landmarks: this chip was cut without a face")
    return chip.points_to_chip(face.landmarks)


def _similarity(face: CanonicalFace, landmarks: np.ndarray) -> SimilarityTransform:
    """The least-squares similarity (Umeyama) from the template onto the face's landmarks."""
    from skimage.transform import SimilarityTransform

    fit = SimilarityTransform.from_estimate(face.landmarks, landmarks)
    if not fit:
        raise ModelError("cannot fit a similarity between the template and the face's landmarks")
    return fit


def _frame_in_chip(face: CanonicalFace, landmarks: np.ndarray) -> np.ndarray:
    """Frame points carried into the chip by the similarity template → face."""
    return np.asarray(_similarity(face, landmarks)(face.frame), np.float64)


def similarity_scale(chip: Chip, size: int = CANONICAL_SIZE) -> float:
    """Chip pixels per canonical pixel: the scale of the similarity template → face."""
    return float(_similarity(canonical_face(size), chip_landmarks(chip)).scale)


def _piecewise_grid(dst: np.ndarray, src: np.ndarray, triangles: np.ndarray,
                    shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``cv2.remap`` grids: for every destination pixel, its source position.

    Each triangle is rasterized once in the destination frame; a pixel inside it gets
    the same barycentric combination of the source vertices. Pixels in no triangle
    map to (−1, −1), which ``remap`` fills with 0.
    """
    h, w = shape
    map_x = np.full((h, w), -1.0, np.float32)
    map_y = np.full((h, w), -1.0, np.float32)
    eps = 1e-9
    for tri in triangles:
        d, s = dst[tri], src[tri]
        x0, y0 = np.floor(d.min(0)).astype(int)
        x1, y1 = np.ceil(d.max(0)).astype(int)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)
        if x1 < x0 or y1 < y0:
            continue
        basis = np.array([d[1] - d[0], d[2] - d[0]]).T  # 2×2
        det = np.linalg.det(basis)
        if abs(det) < eps:
            continue
        inv = np.linalg.inv(basis)
        ys, xs = np.mgrid[y0:y1 + 1, x0:x1 + 1]
        rel = np.stack([xs.ravel() - d[0, 0], ys.ravel() - d[0, 1]])
        l1, l2 = inv @ rel
        l0 = 1.0 - l1 - l2
        inside = (l0 >= -1e-7) & (l1 >= -1e-7) & (l2 >= -1e-7)
        if not inside.any():
            continue
        bary = np.stack([l0[inside], l1[inside], l2[inside]], 1)
        mapped = bary @ s
        map_x[ys.ravel()[inside], xs.ravel()[inside]] = mapped[:, 0]
        map_y[ys.ravel()[inside], xs.ravel()[inside]] = mapped[:, 1]
    return map_x, map_y


def _remap(values: np.ndarray, grids: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return cv2.remap(np.ascontiguousarray(values, np.float32), grids[0], grids[1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def _check_map(values: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    arr = np.asarray(values, np.float32)
    if arr.shape != shape:
        raise ModelError(f"{what} is {arr.shape}, expected {shape}")
    if not np.isfinite(arr).all():
        raise ModelError(f"{what} has NaN or infinite values")
    return arr


def to_canonical(saliency: np.ndarray, chip: Chip, size: int = CANONICAL_SIZE) -> np.ndarray:
    """A chip map ``(H, W)`` moved onto the canonical face ``(size, size)``.

    Each canonical pixel samples the chip where the piecewise-affine warp puts it
    (bilinear), so values are carried over, not mass: a sum-normalize after the warp
    (as `canonical_map` does) counts every face equally.
    """
    h, w = chip.image.shape[:2]
    values = _check_map(saliency, (h, w), "the chip map")
    face = canonical_face(size)
    landmarks = chip_landmarks(chip)
    src = np.vstack([landmarks, _frame_in_chip(face, landmarks)])
    grids = _piecewise_grid(face.points, src, face.triangles, (size, size))
    return _remap(values, grids)


def from_canonical(canonical_map: np.ndarray, chip: Chip) -> np.ndarray:
    """A canonical map ``(size, size)`` moved onto this chip's face ``(H, W)``: the inverse
    warp of `to_canonical` (e.g. a model-level map drawn on any photo)."""
    arr = np.asarray(canonical_map, np.float32)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ModelError(f"a canonical map is square, got shape {arr.shape}")
    values = _check_map(arr, arr.shape, "the canonical map")
    face = canonical_face(arr.shape[0])
    landmarks = chip_landmarks(chip)
    dst = np.vstack([landmarks, _frame_in_chip(face, landmarks)])
    grids = _piecewise_grid(dst, face.points, face.triangles, chip.image.shape[:2])
    return _remap(values, grids)


def _barycentric(points: np.ndarray, face: CanonicalFace) -> tuple[np.ndarray, np.ndarray]:
    """For canonical points ``(P, 2)``: the mesh triangle holding each (−1 if none) and the
    point's barycentric coordinates ``(P, 3)`` in it."""
    corners = face.points[face.triangles]  # (T, 3, 2)
    basis = np.stack([corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]], 2)  # (T, 2, 2)
    inv = np.linalg.inv(basis)
    rel = points[:, None, :] - corners[None, :, 0]  # (P, T, 2)
    l12 = np.einsum("tij,ptj->pti", inv, rel)
    bary = np.concatenate([1.0 - l12.sum(2, keepdims=True), l12], 2)  # (P, T, 3)
    inside = (bary >= -1e-9).all(2)
    triangle = np.where(inside.any(1), inside.argmax(1), -1)
    return triangle, bary[np.arange(len(points)), np.maximum(triangle, 0)]


@lru_cache(maxsize=32)
def _cached_barycentric(size: int, points: bytes) -> tuple[np.ndarray, np.ndarray]:
    """`_barycentric` of the same canonical points (a method's occlusion sites) for every chip:
    finding them in the mesh took 6 ms, 3% of fer-emotion's canonical occlusion."""
    triangle, bary = _barycentric(np.frombuffer(points, np.float64).reshape(-1, 2), canonical_face(size))
    triangle.setflags(write=False)
    bary.setflags(write=False)
    return triangle, bary


def canonical_to_chip_points(points: np.ndarray, chip: Chip, size: int = CANONICAL_SIZE) -> np.ndarray:
    """Canonical pixel positions ``(P, 2)`` carried onto the chip by the same warp
    (each point keeps its barycentric coordinates in its mesh triangle)."""
    face = canonical_face(size)
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    triangle, bary = _cached_barycentric(size, pts.tobytes())
    if (triangle < 0).any():
        raise ModelError("canonical points must lie inside the canonical frame's triangulation")
    landmarks = chip_landmarks(chip)
    src = np.vstack([landmarks, _frame_in_chip(face, landmarks)])
    return np.einsum("pk,pkd->pd", bary, src[face.triangles[triangle]])
