"""dlib's landmark predictors and the names of the 68-point groups.

Side convention: **left and right are the subject's**, as in the iBUG 300-W
annotation that dlib's 68-point model was trained on. On an ordinary
(non-mirrored) frontal photo the subject's right eye therefore appears on the
*image's left*. Every facelens name follows this rule (``RIGHT_EYE``,
``right_cheek`` in :mod:`facelens.faces.regions`, ...). Beware that the Face
Research Lab ``.tem`` files name their points from the viewer's side: their
"left pupil" (point 0) is the subject's right pupil.

The 68-point model is trained on iBUG 300-W, whose terms exclude commercial use;
facelens needs it only for region masks. Alignment uses the CC0 5-point model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import dlib
import numpy as np

from ..errors import ModelError
from ..weights import weight_path

__all__ = [
    "FIVE_POINT_NAMES",
    "JAW",
    "LANDMARK_GROUPS",
    "LEFT_BROW",
    "LEFT_EYE",
    "MOUTH",
    "MOUTH_INNER",
    "MOUTH_OUTER",
    "NOSE",
    "NOSE_BRIDGE",
    "NOSE_LOWER",
    "RIGHT_BROW",
    "RIGHT_EYE",
    "box_to_rectangle",
    "five_from_68",
    "landmarks5",
    "landmarks68",
    "shape_predictor",
]

# 68-point groups (0-based dlib indices); left/right = the subject's (see module docstring).
JAW = tuple(range(0, 17))  # 0: subject's right ear level, 8: chin, 16: subject's left ear level
RIGHT_BROW = tuple(range(17, 22))  # subject's right brow (image left), outer → inner
LEFT_BROW = tuple(range(22, 27))  # subject's left brow (image right), inner → outer
NOSE_BRIDGE = tuple(range(27, 31))  # nasion (27) → tip (30)
NOSE_LOWER = tuple(range(31, 36))  # nostril base, 31 (subject's right) → 33 (centre) → 35
NOSE = NOSE_BRIDGE + NOSE_LOWER
RIGHT_EYE = tuple(range(36, 42))  # subject's right eye (image left): 36 outer corner, 39 inner corner
LEFT_EYE = tuple(range(42, 48))  # subject's left eye (image right): 42 inner corner, 45 outer corner
MOUTH_OUTER = tuple(range(48, 60))  # 48 subject's right corner, 51 top of upper lip, 57 bottom of lower lip
MOUTH_INNER = tuple(range(60, 68))
MOUTH = MOUTH_OUTER + MOUTH_INNER

LANDMARK_GROUPS: dict[str, tuple[int, ...]] = {
    "jaw": JAW,
    "right_brow": RIGHT_BROW,
    "left_brow": LEFT_BROW,
    "nose_bridge": NOSE_BRIDGE,
    "nose_lower": NOSE_LOWER,
    "nose": NOSE,
    "right_eye": RIGHT_EYE,
    "left_eye": LEFT_EYE,
    "mouth_outer": MOUTH_OUTER,
    "mouth_inner": MOUTH_INNER,
    "mouth": MOUTH,
}

# dlib's 5-point model: two corners per eye, then the base of the nose.
FIVE_POINT_NAMES = (
    "left_eye_outer", "left_eye_inner", "right_eye_outer", "right_eye_inner", "nose_base",
)
# The 68-point landmarks closest to each of the 5 points, in the same order.
_FIVE_FROM_68 = (45, 42, 36, 39, 33)

_PREDICTOR_FILES = {5: "shape_predictor_5_face_landmarks.dat", 68: "shape_predictor_68_face_landmarks.dat"}
_predictors: dict[int, Callable[..., dlib.full_object_detection]] = {}
_lock = threading.Lock()


def shape_predictor(points: int) -> Callable[..., dlib.full_object_detection]:
    """The dlib shape predictor with 5 or 68 points, loaded once per process (parsing takes ~1 s)."""
    if points not in _PREDICTOR_FILES:
        raise ModelError(f"dlib has 5- and 68-point face predictors, not {points}")
    predictor = _predictors.get(points)
    if predictor is None:
        with _lock:
            predictor = _predictors.get(points)
            if predictor is None:
                predictor = dlib.shape_predictor(str(weight_path(_PREDICTOR_FILES[points])))
                _predictors[points] = predictor
    return predictor


def box_to_rectangle(box: tuple[int, int, int, int]) -> dlib.rectangle:
    """A facelens box (left, top, right, bottom; right/bottom inclusive, as in dlib) as a dlib rectangle."""
    left, top, right, bottom = (int(v) for v in box)
    return dlib.rectangle(left, top, right, bottom)


def _shape_array(shape: dlib.full_object_detection) -> np.ndarray:
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


def _predict(points: int, image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    rgb = np.ascontiguousarray(image)
    return _shape_array(shape_predictor(points)(rgb, box_to_rectangle(box)))


def landmarks68(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The 68 iBUG landmarks (x, y photo pixels) inside a detector box; dlib rounds them to whole pixels."""
    return _predict(68, image, box)


def landmarks5(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """dlib's 5 alignment landmarks (x, y photo pixels; order in `FIVE_POINT_NAMES`) inside a box."""
    return _predict(5, image, box)


def five_from_68(landmarks: np.ndarray) -> np.ndarray:
    """Approximate dlib's 5 points from 68 (eye corners and nose base).

    For faces whose 68 landmarks are known but whose image was not run through
    the 5-point model. On the photos we checked the two agree within a few
    pixels, so chips are close to, but not bit-identical with, dlib's.
    """
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (68, 2):
        raise ModelError(f"expected 68×2 landmarks, got shape {pts.shape}")
    return pts[list(_FIVE_FROM_68)].copy()
