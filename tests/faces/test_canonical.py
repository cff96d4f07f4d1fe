"""Warps between aligned chips and the canonical face (facelens.faces.canonical)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from facelens.errors import ModelError
from facelens.faces.align import AlignRecipe, Chip, align
from facelens.faces.canonical import (
    MESH_LANDMARKS,
    canonical_face,
    canonical_to_chip_points,
    chip_landmarks,
    from_canonical,
    template_landmarks,
    to_canonical,
)
from facelens.faces.detect import pick_face
from facelens.image import load_image

SIZE = 128


@pytest.fixture(scope="module")
def smiling_chip(manifest_rows: list[dict[str, str]], shared_faces: Path) -> Chip:
    """A smiling FRL London face (open mouth: the hardest case for a closed-mouth template)."""
    row = next(r for r in manifest_rows if r["dataset"] == "frl_london" and r["subset"] == "smiling")
    rgb = load_image(shared_faces / row["path"])
    return align(rgb, pick_face(rgb), AlignRecipe(size=150, padding=0.25, method="dlib5"))


def _blob(shape: tuple[int, int], centre: np.ndarray, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma ** 2))


def _hull(points: np.ndarray, shape: tuple[int, int], erode: int = 0) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(points).astype(np.int32)), 1)
    if erode:
        mask = cv2.erode(mask, np.ones((2 * erode + 1, 2 * erode + 1), np.uint8))
    return mask.astype(bool)


def test_template_is_a_centred_frontal_face() -> None:
    pts = template_landmarks()
    assert pts.shape == (68, 2) and (pts > 0).all() and (pts < 1).all()
    # a frontal mean face on a dlib chip is left-right symmetric about the chip's centre line
    mirror = [(0, 16), (4, 12), (36, 45), (39, 42), (48, 54)]
    for left, right in mirror:
        assert abs(pts[left, 0] + pts[right, 0] - 1.0) < 0.03
        assert abs(pts[left, 1] - pts[right, 1]) < 0.02
    assert pts[8, 1] > pts[57, 1] > pts[33, 1] > pts[27, 1] > pts[19, 1]  # chin, lip, nose, nasion, brow


def _template_chip(side: int = 150) -> Chip:
    """A blank chip whose face has exactly the template's landmarks (identity matrix: photo = chip)."""
    from facelens.faces.detect import Face

    pts = template_landmarks() * (side - 1)
    template_face = Face(box=(0, 0, side - 1, side - 1), score=1.0, landmarks=pts,
                         landmarks5=pts[[36, 39, 45, 42, 33]])
    return Chip(image=np.zeros((side, side, 3), np.uint8), matrix=np.array([[1.0, 0, 0], [0, 1.0, 0]]),
                photo_shape=(side, side), face=template_face, recipe=AlignRecipe(size=side))


def test_mesh_covers_the_frame() -> None:
    face = canonical_face(SIZE)
    assert face.triangles.max() < len(face.points)
    assert not np.isin(np.arange(60, 68), face.triangles).any()  # inner lips stay out of the mesh
    ones = to_canonical(np.ones((150, 150), np.float32), _template_chip())
    assert ones.min() > 0.99  # every canonical pixel is reached by some triangle


def test_the_template_face_warps_by_identity() -> None:
    chip = _template_chip(SIZE)
    noise = np.random.default_rng(0).random((SIZE, SIZE)).astype(np.float32)
    np.testing.assert_allclose(to_canonical(noise, chip, SIZE), noise, atol=1e-4)
    np.testing.assert_allclose(from_canonical(noise, chip), noise, atol=1e-4)


def test_blob_on_a_landmark_lands_on_the_template_landmark(smiling_chip: Chip) -> None:
    landmarks = chip_landmarks(smiling_chip)
    template = canonical_face(SIZE).landmarks
    for k in (8, 19, 24, 30, 36, 45, 48, 54):
        canon = to_canonical(_blob(smiling_chip.shape, landmarks[k], 2.0), smiling_chip, SIZE)
        peak = np.array(np.unravel_index(canon.argmax(), canon.shape)[::-1], np.float64)
        assert np.hypot(*(peak - template[k])) <= 1.0, k


def test_template_blob_lands_on_the_chip_landmark(smiling_chip: Chip) -> None:
    landmarks = chip_landmarks(smiling_chip)
    template = canonical_face(SIZE).landmarks
    for k in (8, 30, 36, 54):
        chip_map = from_canonical(_blob((SIZE, SIZE), template[k], 2.0), smiling_chip)
        peak = np.array(np.unravel_index(chip_map.argmax(), chip_map.shape)[::-1], np.float64)
        assert np.hypot(*(peak - landmarks[k])) <= 1.5, k


def test_round_trip_keeps_a_smooth_map_inside_the_face(smiling_chip: Chip) -> None:
    smooth = _blob(smiling_chip.shape, np.array([70.0, 85.0]), 30.0)
    back = from_canonical(to_canonical(smooth, smiling_chip, SIZE), smiling_chip)
    inside = _hull(chip_landmarks(smiling_chip), smiling_chip.shape, erode=2)
    assert np.abs(back - smooth)[inside].max() < 0.02
    # a map changing faster than the canonical grid can hold does not survive: the test can fail
    stripes = (np.indices(smiling_chip.shape)[1] % 2).astype(np.float32)
    stripes_back = from_canonical(to_canonical(stripes, smiling_chip, SIZE), smiling_chip)
    assert np.abs(stripes_back - stripes)[inside].max() > 0.2


def test_matches_skimage_piecewise_affine(smiling_chip: Chip) -> None:
    from skimage.transform import PiecewiseAffineTransform, warp

    from facelens.faces.canonical import _frame_in_chip

    face = canonical_face(SIZE)
    landmarks = chip_landmarks(smiling_chip)
    src = np.vstack([landmarks, _frame_in_chip(face, landmarks)])
    keep = np.r_[MESH_LANDMARKS, np.arange(68, len(src))]
    smooth = _blob(smiling_chip.shape, np.array([75.0, 80.0]), 25.0)
    reference = warp(smooth, PiecewiseAffineTransform.from_estimate(face.points[keep], src[keep]),
                     output_shape=(SIZE, SIZE), order=1)
    ours = to_canonical(smooth, smiling_chip, SIZE)
    assert np.abs(ours - reference).max() < 5e-3


def test_canonical_points_follow_the_warp(smiling_chip: Chip) -> None:
    face = canonical_face(SIZE)
    on_chip = canonical_to_chip_points(face.landmarks[MESH_LANDMARKS], smiling_chip, SIZE)
    np.testing.assert_allclose(on_chip, chip_landmarks(smiling_chip)[MESH_LANDMARKS], atol=1e-6)
    # inside a triangle the warp is affine: centroids go to centroids
    inner = face.triangles[(face.triangles < 60).all(1)]
    centroids = canonical_to_chip_points(face.landmarks[inner].mean(1), smiling_chip, SIZE)
    np.testing.assert_allclose(centroids, chip_landmarks(smiling_chip)[inner].mean(1), atol=1e-6)
    with pytest.raises(ModelError, match="inside the canonical frame"):
        canonical_to_chip_points(np.array([[-1000.0, 0.0]]), smiling_chip, SIZE)


def test_bad_inputs_are_refused(smiling_chip: Chip) -> None:
    with pytest.raises(ModelError, match="chip map is"):
        to_canonical(np.zeros((10, 10)), smiling_chip)
    with pytest.raises(ModelError, match="NaN"):
        to_canonical(np.full(smiling_chip.shape, np.nan), smiling_chip)
    with pytest.raises(ModelError, match="square"):
        from_canonical(np.zeros((64, 32)), smiling_chip)
    faceless = Chip(image=smiling_chip.image, matrix=smiling_chip.matrix, photo_shape=smiling_chip.photo_shape,
                    face=None, recipe=smiling_chip.recipe)
    with pytest.raises(ModelError, match="without a face"):
        to_canonical(np.zeros(smiling_chip.shape), faceless)
    with pytest.raises(ModelError, match="at least 16"):
        canonical_face(8)
