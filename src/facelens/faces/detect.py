"""Face detection with dlib's HOG detector, plus landmarks for every face found.

**The default is dlib's own pipeline.** ``upsample=None`` first runs the detector exactly as
``face_recognition`` and dlib's recognition example do, with one ×2 upsampling, so that the box,
the 5 landmarks, the chip and hence the embedding equal dlib's own on every photo where that
detector finds the face (``tests/models/test_dlib_end_to_end.py`` checks it on the shared photos).
Only when it finds nothing are the other levels tried, in this order: none (faces that fill the
frame, which the finer pyramid of level 1 misses on some ORL and UTKFace crops), then ×4 and ×8 (small
faces). A face found that way is a *fallback*: `Face.upsample` says which level found it and
`Face.fallback` is True, so results can say that dlib's own pipeline would have found no face there.
The HOG window finds faces of about 80 px and up at level 0, 40 px at level 1, 20 px at level 2.

**Nothing unbounded reaches dlib.** A 4000×3 PNG upsampled nine times once corrupted dlib's heap
(``malloc(): corrupted top size``, the process gone, no exception). Before any native call:

* the longer side may be at most :data:`MAX_ASPECT` times the shorter (dlib ran every shape up to
  128:1 below 60 megapixels cleanly in a sweep, and crashed at 640:1 and 1333:1; no photo of a face is
  a 20:1 strip);
* the shorter side must be at least :data:`MIN_SIDE` px, the smallest face the ×8 level can find;
* every pyramid level, the image as given included, must stay within the pixel limit of
  :func:`facelens.image.max_pixels_limit` (50 megapixels unless raised), which also bounds memory.

What is refused raises an `ImageError` or `NoFaceError` that names the file.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import dlib
import numpy as np

from ..errors import ImageError, ModelError, NoFaceError
from ..image import max_pixels_limit
from .landmarks import box_to_rectangle, five_from_68, landmarks5, landmarks68

__all__ = ["Face", "clear_detections", "detect_faces", "face_from_box", "face_from_landmarks", "pick_face"]

#: The upsampling of dlib's own pipeline (``face_recognition``, dlib's ``dnn_face_recognition`` example).
REFERENCE_UPSAMPLE = 1
#: The fallback levels above the reference stop once the image's shorter side would pass this many pixels.
LADDER_MAX_SIDE = 1600
#: The most ×2 upsamplings the fallback tries (×8: faces of about 10 px).
MAX_UPSAMPLE = 3
#: The longest side may be at most this many times the shortest.
MAX_ASPECT = 20
#: The shortest side the detector is run on: the HOG window (80 px) at the highest fallback level.
MIN_SIDE = 80 // 2**MAX_UPSAMPLE

_detector: dlib.fhog_object_detector | None = None
_lock = threading.Lock()


def _hog_detector() -> dlib.fhog_object_detector:
    global _detector
    if _detector is None:
        with _lock:
            if _detector is None:
                _detector = dlib.get_frontal_face_detector()
    return _detector


def _frozen_points(points: np.ndarray, count: int, what: str) -> np.ndarray:
    arr = np.array(points, dtype=np.float64)
    if arr.shape != (count, 2):
        raise ModelError(f"{what} must be {count}×2 (x, y), got shape {arr.shape}")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face in photo pixel coordinates.

    ``box`` is (left, top, right, bottom) with right/bottom *inclusive*, exactly
    as dlib reports it, so the landmark predictors see the same rectangle again.
    ``score`` is the HOG detector's SVM score (higher is more face-like; NaN
    when the face was not detected but built from known landmarks).
    ``landmarks`` are dlib's 68 points and ``landmarks5`` its 5 alignment points;
    left/right are the subject's (see :mod:`facelens.faces.landmarks`).
    ``upsample`` is the detector level that found the face (None when it was built from a box or
    landmarks given by the caller).
    """

    box: tuple[int, int, int, int]
    score: float
    landmarks: np.ndarray = field(repr=False)
    landmarks5: np.ndarray = field(repr=False)
    upsample: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "box", tuple(int(v) for v in self.box))
        object.__setattr__(self, "score", float(self.score))
        object.__setattr__(self, "landmarks", _frozen_points(self.landmarks, 68, "landmarks"))
        object.__setattr__(self, "landmarks5", _frozen_points(self.landmarks5, 5, "landmarks5"))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Face):
            return NotImplemented
        same_score = self.score == other.score or (math.isnan(self.score) and math.isnan(other.score))
        return (self.box == other.box and same_score and np.array_equal(self.landmarks, other.landmarks)
                and np.array_equal(self.landmarks5, other.landmarks5))

    def __hash__(self) -> int:
        return hash((self.box, self.landmarks.tobytes()))

    @property
    def fallback(self) -> bool:
        """True when dlib's own pipeline (one upsampling) did not find this face and another level did."""
        return self.upsample is not None and self.upsample != REFERENCE_UPSAMPLE

    def detection(self) -> str:
        """How the face was found, in words a result can carry."""
        if self.upsample is None:
            return "face given by the caller (box or landmarks), not detected"
        if not self.fallback:
            return f"dlib HOG detector, upsample {self.upsample} (dlib's own pipeline)"
        return (f"dlib HOG detector, fallback upsample {self.upsample}: dlib's own pipeline (upsample "
                f"{REFERENCE_UPSAMPLE}) finds no face here, so embeddings may differ from dlib's own")

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0] + 1

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1] + 1

    @property
    def area(self) -> int:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        """(x, y) centre of the box."""
        return ((self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0)

    @property
    def eye_centers(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean of the subject's right-eye and left-eye landmarks (image left, image right when frontal)."""
        return self.landmarks[36:42].mean(axis=0), self.landmarks[42:48].mean(axis=0)

    @property
    def roll_degrees(self) -> float:
        """In-plane rotation of the eye line, positive when the subject's left eye is lower in the image."""
        right, left = self.eye_centers
        return float(np.degrees(np.arctan2(left[1] - right[1], left[0] - right[0])))

    def full_object_detection(self) -> dlib.full_object_detection:
        """The face as dlib's 5-point detection, e.g. for ``dlib.get_face_chip``."""
        parts = [dlib.point(round(x), round(y)) for x, y in self.landmarks5]
        return dlib.full_object_detection(box_to_rectangle(self.box), parts)


def _check_rgb(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ImageError("<array>", f"expected an H×W×3 uint8 RGB array, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def face_from_box(image: np.ndarray, box: tuple[int, int, int, int], score: float = math.nan) -> Face:
    """A `Face` for a box found some other way (another detector, a hand-drawn box).

    The box must overlap the image and be no larger than three times it: dlib's predictors take it
    as given, and a box of any size would send them sampling far outside the pixels.
    """
    rgb = _check_rgb(image)
    h, w = rgb.shape[:2]
    left, top, right, bottom = (int(v) for v in box)
    if not (left <= right and top <= bottom and right >= 0 and bottom >= 0 and left < w and top < h
            and right - left < 3 * w and bottom - top < 3 * h):
        raise ModelError(f"face box {tuple(box)} does not fit the {w}×{h} image")
    return Face(box=box, score=score, landmarks=landmarks68(rgb, box), landmarks5=landmarks5(rgb, box))


def face_from_landmarks(image: np.ndarray, landmarks68: np.ndarray, score: float = math.nan) -> Face:
    """A `Face` from known 68-point landmarks, without running any dlib model.

    The box is the landmarks' bounding box and the 5 alignment points are taken
    from the 68 (eye corners, nose base), so a "dlib5" chip from this face is
    close to, not identical with, the chip of a detected face.
    """
    h, w = np.asarray(image).shape[:2]
    pts = _frozen_points(landmarks68, 68, "landmarks68")
    if not (np.isfinite(pts).all() and (pts[:, 0] > -w).all() and (pts[:, 0] < 2 * w).all()
            and (pts[:, 1] > -h).all() and (pts[:, 1] < 2 * h).all()):
        raise ModelError(f"landmarks68 lie far outside the {w}×{h} image")
    left, top = np.floor(pts.min(axis=0)).astype(int)
    right, bottom = np.ceil(pts.max(axis=0)).astype(int)
    return Face(box=(left, top, right, bottom), score=score, landmarks=pts, landmarks5=five_from_68(pts))


def _check_detectable(shape_hw: tuple[int, int], source: str) -> int:
    """The pixel limit per pyramid level, after refusing shapes dlib must never see."""
    h, w = (int(v) for v in shape_hw)
    shorter, longer = min(h, w), max(h, w)
    if shorter < MIN_SIDE:
        raise NoFaceError(source, f"image {w}×{h} is too small to hold a face: the detector needs a shorter "
                                  f"side of at least {MIN_SIDE} px")
    if longer > MAX_ASPECT * shorter:
        raise ImageError(source, f"image {w}×{h} is a strip ({longer / shorter:.0f}:1); face detection is "
                                 f"refused above {MAX_ASPECT}:1 (crop the photo around the face)")
    limit = max_pixels_limit()
    if h * w > limit:
        raise ImageError(source, f"image {w}×{h} has more pixels than the limit of {limit} for face detection "
                                 "(set FACELENS_MAX_PIXELS to raise it)")
    return limit


def _levels(shape_hw: tuple[int, int], limit: int) -> list[int]:
    """dlib's own level first, then the fallbacks, each within the pixel limit."""
    h, w = shape_hw
    shorter = min(h, w)
    levels = [REFERENCE_UPSAMPLE, 0, *range(REFERENCE_UPSAMPLE + 1, MAX_UPSAMPLE + 1)]
    return [lv for lv in levels if h * w * 4**lv <= limit
            and (lv <= REFERENCE_UPSAMPLE or shorter * 2**lv <= LADDER_MAX_SIDE)]


_RECENT_MAX = 64
_recent: OrderedDict[tuple, list[Face]] = OrderedDict()
_recent_lock = threading.Lock()


def clear_detections() -> None:
    """Forget the remembered detections (benchmarks time detection itself, not the memory of it)."""
    with _recent_lock:
        _recent.clear()


def detect_faces(image: np.ndarray, *, upsample: int | None = None, min_score: float = 0.0,
                 source: str = "<array>") -> list[Face]:
    """Every face dlib's HOG detector finds, with landmarks, largest box first.

    ``upsample=None`` runs dlib's own level, then the fallbacks (module docstring); an integer runs
    exactly that many ×2 upsamplings. ``min_score`` is passed to dlib as ``adjust_threshold``:
    negative values also return weaker detections. ``source`` names the image in errors.

    The last 64 results are remembered by the image's content: a report or a study detects the
    same photo once per model and per section (detection is a tenth of a second or more), and a
    `Face` is immutable, so sharing it is safe.
    """
    rgb = _check_rgb(image)
    if upsample is not None and upsample < 0:
        raise ModelError(f"upsample must be >= 0 or None, got {upsample}")
    limit = _check_detectable(rgb.shape[:2], source)
    if upsample is not None and rgb.shape[0] * rgb.shape[1] * 4**upsample > limit:
        raise ImageError(source, f"upsample {upsample} would make the {rgb.shape[1]}×{rgb.shape[0]} image larger "
                                 f"than the limit of {limit} pixels (set FACELENS_MAX_PIXELS to raise it)")
    key = (rgb.shape, hashlib.blake2b(np.ascontiguousarray(rgb).data, digest_size=16).digest(), upsample,
           float(min_score))
    with _recent_lock:
        if key in _recent:
            _recent.move_to_end(key)
            return list(_recent[key])
    levels = _levels(rgb.shape[:2], limit) if upsample is None else [int(upsample)]
    faces = _detect(rgb, levels, min_score)
    with _recent_lock:
        _recent[key] = faces
        while len(_recent) > _RECENT_MAX:
            _recent.popitem(last=False)
    return list(faces)


def _detect(rgb: np.ndarray, levels: list[int], min_score: float) -> list[Face]:
    detector = _hog_detector()
    rects: list[dlib.rectangle] = []
    scores: list[float] = []
    found_at = levels[-1] if levels else 0
    for level in levels:
        rects, scores, _ = detector.run(rgb, level, float(min_score))
        if len(rects):
            found_at = level
            break
    boxes = [(r.left(), r.top(), r.right(), r.bottom()) for r in rects]
    faces = [Face(box=box, score=score, landmarks=landmarks68(rgb, box), landmarks5=landmarks5(rgb, box),
                  upsample=found_at)
             for box, score in zip(boxes, scores, strict=True)]
    faces.sort(key=lambda f: (-f.area, -f.score))
    return faces


def pick_face(image: np.ndarray, *, faces: list[Face] | None = None, index: int | None = None,
              min_score: float = 0.0, source: str = "<array>") -> Face:
    """The face to explain: the largest one scoring at least ``min_score``, or ``faces[index]``.

    ``faces`` defaults to `detect_faces` on the image; ``index`` counts in that
    largest-first order. Raises `NoFaceError` when there is no such face.
    """
    if faces is None:
        faces = detect_faces(image, min_score=min_score, source=source)
    h, w = np.asarray(image).shape[:2]
    if index is not None:
        if not -len(faces) <= index < len(faces):
            found = f"only {len(faces)} face{'s' if len(faces) != 1 else ''} found" if faces else "no face found"
            raise NoFaceError(source, f"face index {index} requested but {found} (image {w}×{h})")
        return faces[index]
    confident = [f for f in faces if math.isnan(f.score) or f.score >= min_score]
    if not confident:
        reason = f"no face found by dlib HOG detector (image {w}×{h})"
        if faces:
            best = max(f.score for f in faces)
            reason = f"no face scored >= {min_score:g} with dlib HOG detector (best {best:.2f}, image {w}×{h})"
        raise NoFaceError(source, reason)
    return max(confident, key=lambda f: f.area)
