"""Cut the network's input chip out of a photo, and map things between the two frames.

Every chip keeps the 2×3 affine ``matrix`` from photo pixels to chip pixels
(``chip_xy = matrix @ [x, y, 1]``, pixel centres at integer coordinates, as in
both dlib and OpenCV). Saliency computed on the chip can so be drawn on the
photo, and region masks drawn on the photo can be carried to the chip.

"dlib5" chips are cut by dlib itself (``get_face_chip_details`` +
``extract_image_chip``), so they equal ``dlib.get_face_chip`` bit for bit,
which is what dlib's recognition and age networks were trained on. dlib blurs
through an image pyramid before its bilinear sampling when it shrinks a face;
redoing that in OpenCV would only approximate it, so we let dlib cut the chip
and derive the matrix from the chip's rectangle and angle the way dlib's
``get_mapping_to_chip`` does.

"template5" chips are InsightFace's ``norm_crop`` (``insightface/utils/face_align.py``): five
points (eye centres, nose tip, mouth corners; here from dlib's 68 landmarks) are fitted to a
template by a least-squares similarity (Umeyama 1991, as scikit-image's
``SimilarityTransform.estimate`` computes it, which ``norm_crop`` calls), and the photo is warped
with ``cv2.warpAffine`` (bilinear, border 0). The fitted matrix *is* the chip's matrix: OpenCV and
the template both put pixel centres at integer coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import dlib
import numpy as np

from ..errors import ImageError, ModelError
from .detect import Face

__all__ = ["AlignMethod", "AlignRecipe", "Chip", "align", "dlib_chip_matrix", "similarity_matrix",
           "template5_points"]

AlignMethod = Literal["dlib5", "box", "none", "template5"]
_METHODS = ("dlib5", "box", "none", "template5")
Template = tuple[tuple[float, float], ...]


def _check_template(template: object, size: int) -> Template:
    """Five finite (x, y) points, spread out enough for a similarity fit to be defined."""
    try:
        pts = np.array(template, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ModelError(f"template must be 5 (x, y) points, got {template!r}") from err
    if pts.shape != (5, 2):
        raise ModelError(f"template must be 5 (x, y) points (eyes, nose tip, mouth corners), got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ModelError("template points must be finite numbers")
    if np.hypot(*(pts[1] - pts[0])) < 1e-6 or pts.var(axis=0).sum() < 1e-6:
        raise ModelError("template points coincide: the eyes (and the rest) must be distinct points")
    if pts[1, 0] <= pts[0, 0]:
        raise ModelError("template order is image-left eye, image-right eye, nose, image-left mouth corner, "
                         "image-right mouth corner; its second point must lie right of the first")
    if (np.abs(pts) > 4 * size).any():
        raise ModelError(f"template points lie far outside a {size}×{size} chip: are they in chip pixels?")
    return tuple((float(x), float(y)) for x, y in pts)


@dataclass(frozen=True)
class AlignRecipe:
    """How a model wants its input cut: which alignment, how large, how much margin.

    ``padding`` is dlib's: the margin added on each side as a fraction of the
    face's size ("dlib5": of the landmark template, "box": of the detector
    box's longer side; "template5" ignores it, the template sets the margin).
    ``grayscale`` is informational: the network converts
    inside itself, chips stay RGB. ``width`` lets a "none" recipe feed a
    non-square network (default: square, ``size``×``size``). ``template`` is
    "template5"'s five target points in chip pixels of a ``size``×``size`` chip, in
    InsightFace's order: image-left eye, image-right eye, nose tip, image-left and
    image-right mouth corner (the subject's right eye is the image-left one).
    """

    size: int
    padding: float = 0.25
    method: AlignMethod = "dlib5"
    grayscale: bool = False
    width: int | None = None
    template: Template | None = None

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ModelError(f"alignment method must be one of {_METHODS}, got {self.method!r}")
        if int(self.size) != self.size or self.size < 1:
            raise ModelError(f"chip size must be a positive integer, got {self.size!r}")
        if self.width is not None and (int(self.width) != self.width or self.width < 1):
            raise ModelError(f"chip width must be a positive integer, got {self.width!r}")
        if self.width not in (None, self.size) and self.method != "none":
            raise ModelError(f"'{self.method}' chips are square; only method='none' takes a width")
        if not np.isfinite(self.padding) or self.padding < 0:
            raise ModelError(f"padding must be >= 0, got {self.padding!r}")
        if self.method == "template5":
            if self.template is None:
                raise ModelError("method='template5' needs a template: 5 (x, y) points in chip pixels")
            object.__setattr__(self, "template", _check_template(self.template, int(self.size)))
        elif self.template is not None:
            raise ModelError(f"a template is only used by method='template5', not '{self.method}'")

    @property
    def chip_hw(self) -> tuple[int, int]:
        """(height, width) of the chips this recipe makes."""
        return int(self.size), int(self.width if self.width is not None else self.size)

    @property
    def needs_face(self) -> bool:
        return self.method != "none"

    def describe(self) -> str:
        h, w = self.chip_hw
        gray = " (network sees grayscale)" if self.grayscale else ""
        if self.method == "dlib5":
            text = f"dlib 5-point chip, {w}×{h}, padding {self.padding:g}"
        elif self.method == "box":
            text = f"square crop around the face box, {w}×{h}, padding {self.padding:g}"
        elif self.method == "template5":
            text = f"5-point similarity to a template (eyes, nose tip, mouth corners), {w}×{h}"
        else:
            text = f"whole image resized to {w}×{h}, no alignment"
        return text + gray


def _as_affine(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (2, 3):
        raise ModelError(f"an affine matrix is 2×3, got shape {m.shape}")
    return m


def _invert(matrix: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(_as_affine(matrix)).astype(np.float64)


def _compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The affine ``outer ∘ inner`` (apply ``inner`` first)."""
    return np.c_[outer[:, :2] @ inner[:, :2], outer[:, :2] @ inner[:, 2] + outer[:, 2]]


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ModelError(f"points must be N×2 (x, y), got shape {pts.shape}")
    return pts @ matrix[:, :2].T + matrix[:, 2]


def _warp(source: np.ndarray, dst_to_src: np.ndarray, dst_hw: tuple[int, int], fill: float) -> np.ndarray:
    """Bilinear warp that treats each source pixel as a unit square: destination pixels whose centre
    falls on the source's area get its (edge-replicated) values, the others ``fill``; OpenCV's constant
    border alone would fade the outermost half pixel towards ``fill``."""
    h, w = (int(v) for v in dst_hw)
    out = cv2.warpAffine(source, dst_to_src, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REPLICATE)
    m = dst_to_src.astype(np.float32)
    xs, ys = np.arange(w, dtype=np.float32)[None, :], np.arange(h, dtype=np.float32)[:, None]
    sx = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    sy = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    sh, sw = source.shape[:2]
    outside = (sx < -0.5) | (sx >= sw - 0.5) | (sy < -0.5) | (sy >= sh - 0.5)
    out[outside] = fill
    return out


@dataclass
class Chip:
    """An aligned network input and the way back to the photo it came from."""

    image: np.ndarray
    matrix: np.ndarray
    photo_shape: tuple[int, int]
    face: Face | None
    recipe: AlignRecipe

    @property
    def size(self) -> int:
        return int(self.image.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the chip."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    @property
    def landmarks(self) -> np.ndarray:
        """The face's 68 landmarks in chip pixels."""
        if self.face is None:
            raise ModelError("this chip was cut without a face, so it has no landmarks")
        return self.points_to_chip(self.face.landmarks)

    @property
    def landmarks5(self) -> np.ndarray:
        """The face's 5 alignment landmarks in chip pixels."""
        if self.face is None:
            raise ModelError("this chip was cut without a face, so it has no landmarks")
        return self.points_to_chip(self.face.landmarks5)

    @property
    def inverse_matrix(self) -> np.ndarray:
        """2×3 affine from chip pixels back to photo pixels."""
        return _invert(self.matrix)

    def points_to_chip(self, points: np.ndarray) -> np.ndarray:
        return _apply(self.matrix, points)

    def points_to_photo(self, points: np.ndarray) -> np.ndarray:
        return _apply(self.inverse_matrix, points)

    def _map_matrix(self, map_hw: tuple[int, int]) -> np.ndarray:
        """Photo → map pixels for a map covering the chip at another resolution (e.g. a 7×7 CAM)."""
        ch, cw = self.shape
        mh, mw = map_hw
        sx, sy = mw / cw, mh / ch
        # Pixel-centre convention: map_x + 0.5 = (chip_x + 0.5) · sx.
        chip_to_map = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])
        return _compose(chip_to_map, self.matrix)

    def to_photo(self, chip_map: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Warp a map over the chip (any resolution, e.g. a 7×7 CAM or a 150×150 saliency) onto the photo.

        Bilinear; photo pixels that the chip does not cover get ``fill``. Returns
        float32 H×W (or H×W×C for a C-channel map, C ≤ 4).
        """
        arr = np.asarray(chip_map, dtype=np.float32)
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] > 4) or 0 in arr.shape:
            raise ModelError(f"chip_map must be H×W or H×W×C (C ≤ 4), got shape {arr.shape}")
        return _warp(arr, self._map_matrix(arr.shape[:2]), self.photo_shape, fill)

    def photo_to_chip(self, photo_map: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Warp a float map over the photo into the chip frame (bilinear), float32; ``fill`` off the photo."""
        arr = np.asarray(photo_map, dtype=np.float32)
        if arr.shape[:2] != tuple(self.photo_shape):
            raise ModelError(f"photo map is {arr.shape[:2]}, the photo is {tuple(self.photo_shape)}")
        return _warp(arr, self.inverse_matrix, self.shape, fill)

    def photo_mask_to_chip(self, mask: np.ndarray) -> np.ndarray:
        """A boolean photo mask in the chip frame (pixels at least half covered)."""
        return self.photo_to_chip(np.asarray(mask, dtype=np.float32)) >= 0.5

    def chip_mask_to_photo(self, mask: np.ndarray) -> np.ndarray:
        """A boolean chip mask on the photo (pixels at least half covered)."""
        return self.to_photo(np.asarray(mask, dtype=np.float32)) >= 0.5


def dlib_chip_matrix(details: dlib.chip_details) -> np.ndarray:
    """Photo → chip affine of a dlib ``chip_details``, as dlib's ``get_mapping_to_chip`` defines it.

    The rectangle's top-left, top-right and bottom-right corners, rotated by the
    chip angle about its centre, go to chip pixels (0, 0), (cols−1, 0) and
    (cols−1, rows−1).
    """
    rect, angle = details.rect, float(details.angle)
    cx, cy = (rect.left() + rect.right()) / 2.0, (rect.top() + rect.bottom()) / 2.0
    cos_a, sin_a = np.cos(angle), np.sin(angle)

    def rotated(x: float, y: float) -> tuple[float, float]:
        dx, dy = x - cx, y - cy
        return cx + cos_a * dx - sin_a * dy, cy + sin_a * dx + cos_a * dy

    src = np.array([rotated(rect.left(), rect.top()), rotated(rect.right(), rect.top()),
                    rotated(rect.right(), rect.bottom())])
    dst = np.array([[0.0, 0.0], [details.cols - 1.0, 0.0], [details.cols - 1.0, details.rows - 1.0]])
    src_h = np.c_[src, np.ones(3)]
    return np.linalg.solve(src_h, dst).T


def template5_points(landmarks68: np.ndarray) -> np.ndarray:
    """The five points "template5" fits, from dlib's 68, in the template's (image-left first) order.

    Eye centres (mean of 36–41, the subject's right eye, which is image-left; mean of 42–47),
    nose tip (30), mouth corners (48, the subject's right, image-left; 54). InsightFace's
    detectors predict these five directly; the eye centre of the six-point contour is our stand-in
    for their pupil.
    """
    pts = np.asarray(landmarks68, dtype=np.float64)
    if pts.shape != (68, 2):
        raise ModelError(f"expected 68×2 landmarks, got shape {pts.shape}")
    return np.array([pts[36:42].mean(axis=0), pts[42:48].mean(axis=0), pts[30], pts[48], pts[54]])


def similarity_matrix(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking ``src`` onto ``dst``, 2×3.

    Umeyama, "Least-squares estimation of transformation parameters between two point patterns",
    IEEE TPAMI 13(4), 1991, step for step as scikit-image's ``_umeyama`` (``SimilarityTransform.estimate``,
    what InsightFace's ``estimate_norm`` calls) computes it; written out here because scikit-image
    0.26 deprecates ``estimate`` and 0.22–0.25 lack its replacement.
    """
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ModelError(f"a similarity needs two N×2 point sets of one shape, got {src.shape} and {dst.shape}")
    num, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_demean, dst_demean = src - src_mean, dst - dst_mean
    a = dst_demean.T @ src_demean / num
    d = np.ones(dim)
    if np.linalg.det(a) < 0:
        d[dim - 1] = -1
    u, s, v = np.linalg.svd(a)
    rank = np.linalg.matrix_rank(a)
    src_var = src_demean.var(axis=0).sum()
    if rank == 0 or not np.isfinite(a).all() or src_var <= 0:
        raise ModelError("the points coincide: no similarity fits them")
    t = np.eye(dim + 1)
    if rank == dim - 1:
        if np.linalg.det(u) * np.linalg.det(v) > 0:
            t[:dim, :dim] = u @ v
        else:
            dd = d.copy()
            dd[dim - 1] = -1
            t[:dim, :dim] = u @ np.diag(dd) @ v
    else:
        t[:dim, :dim] = u @ np.diag(d) @ v
    scale = 1.0 / src_var * (s @ d)
    t[:dim, dim] = dst_mean - scale * (t[:dim, :dim] @ src_mean)
    t[:dim, :dim] *= scale
    return t[:2].copy()


def _check_rgb(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8 or 0 in arr.shape:
        raise ImageError("<array>", f"expected an H×W×3 uint8 RGB array, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def _resize(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    shrinking = h < image.shape[0] or w < image.shape[1]
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def _scale_matrix(sx: float, sy: float, x0: float, y0: float) -> np.ndarray:
    """Photo → chip affine for "crop at (x0, y0), then resize by (sx, sy)" under cv2.resize's convention."""
    return np.array([[sx, 0.0, sx * (0.5 - x0) - 0.5], [0.0, sy, sy * (0.5 - y0) - 0.5]])


def _align_dlib5(rgb: np.ndarray, face: Face, recipe: AlignRecipe) -> tuple[np.ndarray, np.ndarray]:
    # dlib's Python get_face_chip and compute_face_descriptor take the padding as a C float, so
    # round it the same way: 0.2 as a double and as a float give chips that differ by a pixel.
    padding = float(np.float32(recipe.padding))
    details = dlib.get_face_chip_details(face.full_object_detection(), int(recipe.size), padding)
    chip = np.asarray(dlib.extract_image_chip(rgb, details))
    return chip, dlib_chip_matrix(details)


def _align_box(rgb: np.ndarray, face: Face, recipe: AlignRecipe) -> tuple[np.ndarray, np.ndarray]:
    """Square crop centred on the box; zero outside the photo, like dlib's chips."""
    side = max(1, round(max(face.width, face.height) * (1.0 + 2.0 * recipe.padding)))
    cx, cy = face.center
    left, top = round(cx - (side - 1) / 2.0), round(cy - (side - 1) / 2.0)
    h, w = rgb.shape[:2]
    crop = np.zeros((side, side, 3), np.uint8)
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + side, w), min(top + side, h)
    if x0 < x1 and y0 < y1:
        crop[y0 - top:y1 - top, x0 - left:x1 - left] = rgb[y0:y1, x0:x1]
    size = int(recipe.size)
    scale = size / side
    return _resize(crop, (size, size)), _scale_matrix(scale, scale, left, top)


def _align_template5(rgb: np.ndarray, face: Face, recipe: AlignRecipe) -> tuple[np.ndarray, np.ndarray]:
    """InsightFace's ``norm_crop``: fit the five points to the template, warp bilinearly with border 0."""
    assert recipe.template is not None
    matrix = similarity_matrix(template5_points(face.landmarks), np.array(recipe.template))
    size = int(recipe.size)
    chip = cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    return chip, matrix


def _align_none(rgb: np.ndarray, recipe: AlignRecipe) -> tuple[np.ndarray, np.ndarray]:
    ch, cw = recipe.chip_hw
    h, w = rgb.shape[:2]
    return _resize(rgb, (ch, cw)), _scale_matrix(cw / w, ch / h, 0.0, 0.0)


def align(image: np.ndarray, face: Face | None, recipe: AlignRecipe) -> Chip:
    """Cut the chip a model with this recipe takes.

    "dlib5", "box" and "template5" need a face; "none" ignores it for the pixels but keeps it
    on the chip so regions can still be drawn there.
    """
    rgb = _check_rgb(image)
    if recipe.needs_face and face is None:
        raise ModelError(f"alignment '{recipe.method}' needs a face; detect one first (pick_face)")
    if recipe.method == "dlib5":
        assert face is not None
        pixels, matrix = _align_dlib5(rgb, face, recipe)
    elif recipe.method == "box":
        assert face is not None
        pixels, matrix = _align_box(rgb, face, recipe)
    elif recipe.method == "template5":
        assert face is not None
        pixels, matrix = _align_template5(rgb, face, recipe)
    else:
        pixels, matrix = _align_none(rgb, recipe)
    return Chip(image=np.ascontiguousarray(pixels), matrix=matrix, photo_shape=(rgb.shape[0], rgb.shape[1]),
                face=face, recipe=recipe)
