from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from facelens.errors import ImageError, ModelError, NoFaceError
from facelens.faces import Face, align, detect_faces, face_from_box, face_from_landmarks, pick_face
from facelens.faces.align import AlignRecipe
from facelens.faces.detect import MAX_ASPECT, MIN_SIDE, _levels
from facelens.faces.landmarks import LANDMARK_GROUPS, five_from_68

from .conftest import load_rgb

# Share of small images (ORL 92×112 gray, UTKFace 200×200) with a face found by the default levels.
# Measured on the whole bundle (2026-12-03): ORL 318/320 (99.4 %; 10 of them by a fallback level),
# UTKFace 798/800 (99.8 %; 30 by a fallback); on this test's sample of 40 + 40: 40/40 and 40/40.
# The floor allows two misses in each sample.
SMALL_IMAGE_FLOOR = 0.95


@pytest.mark.parametrize("path", ["images/demo/astronaut_eileen_collins.png", "images/demo/grace_hopper.jpg"])
def test_one_face_on_demo_portraits(shared_faces: Path, path: str) -> None:
    image = load_rgb(shared_faces / path)
    faces = detect_faces(image)
    # dlib's own pipeline (one upsampling) also finds a weak second "face" on the astronaut's
    # shoulder patch (score 0.12 against 1.16); the portrait's face is the largest and strongest
    face = faces[0]
    assert all(other.score < 0.2 * face.score for other in faces[1:])
    left, top, right, bottom = face.box
    assert 0 <= left < right < image.shape[1] and 0 <= top < bottom < image.shape[0]
    assert face.score > 0
    assert face.landmarks.shape == (68, 2) and face.landmarks5.shape == (5, 2)
    # Landmarks belong to this face: the eyes sit in the box's upper half, the chin near its bottom.
    right_eye, left_eye = face.eye_centers
    assert left <= right_eye[0] < left_eye[0] <= right
    assert top <= right_eye[1] < (top + bottom) / 2
    assert face.landmarks[8, 1] > (top + bottom) / 2


def test_one_face_on_each_london_photo(london_neutral: list) -> None:
    for name, _, tem, face in london_neutral:
        # The detector's box contains both pupils of the hand-placed .tem template.
        left, top, right, bottom = face.box
        for x, y in tem[:2]:
            assert left <= x <= right and top <= y <= bottom, name


def test_smiling_london_photos(shared_faces: Path, manifest_rows: list[dict[str, str]]) -> None:
    rows = [r for r in manifest_rows if r["dataset"] == "frl_london" and r["subset"] == "smiling"][::20]
    counts = [len(detect_faces(load_rgb(shared_faces / r["path"]))) for r in rows]
    assert counts == [1] * len(rows)


@pytest.mark.parametrize("dataset, step", [("orl", 8), ("utkface", 20)])
def test_faces_found_on_most_small_images(shared_faces: Path, manifest_rows: list[dict[str, str]],
                                           dataset: str, step: int) -> None:
    rows = [r for r in manifest_rows if r["dataset"] == dataset][::step]
    assert len(rows) >= 40
    found = 0
    for r in rows:
        image = load_rgb(shared_faces / r["path"])
        assert max(image.shape[:2]) <= 200
        found += bool(detect_faces(image))
    assert found / len(rows) >= SMALL_IMAGE_FLOOR, f"{dataset}: faces on {found}/{len(rows)}"


def test_no_face_on_blank_and_noise() -> None:
    rng = np.random.default_rng(0)
    blank = np.full((120, 120, 3), 128, np.uint8)
    noise = rng.integers(0, 256, (120, 120, 3), dtype=np.uint8)
    for image in (blank, noise):
        assert detect_faces(image) == []
        with pytest.raises(NoFaceError) as err:
            pick_face(image, source="noise.png")
        assert err.value.source == "noise.png"
        assert "no face found by dlib HOG detector (image 120×120)" in err.value.reason


def test_pick_face_in_a_collage(shared_faces: Path) -> None:
    """Two portraits side by side at different sizes: largest first, index picks, bad index errors."""
    small = cv2.resize(load_rgb(shared_faces / "images/demo/grace_hopper.jpg"), (256, 300),
                       interpolation=cv2.INTER_AREA)
    large = load_rgb(shared_faces / "images/frl_london/001/001_neutral.jpg")[100:700, 150:650]
    collage = np.zeros((600, 256 + 500, 3), np.uint8)
    collage[:300, :256] = small
    collage[:, 256:] = large
    faces = detect_faces(collage)
    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    assert faces[0].center[0] > 256 > faces[1].center[0]  # the large face is the right-hand photo
    assert pick_face(collage, faces=faces) is faces[0]
    assert pick_face(collage) == faces[0]
    assert pick_face(collage, faces=faces, index=1) is faces[1]
    assert pick_face(collage, faces=faces, index=-1) is faces[1]
    with pytest.raises(NoFaceError, match="face index 2 requested but only 2 faces found"):
        pick_face(collage, faces=faces, index=2, source="collage.png")
    # A score floor above the stronger face's score leaves none.
    too_high = max(f.score for f in faces) + 1.0
    with pytest.raises(NoFaceError, match="no face scored"):
        pick_face(collage, faces=faces, min_score=too_high)
    # Without the floor on the larger face, the smaller one is picked.
    weaker_large = Face(faces[0].box, faces[1].score - 1.0, faces[0].landmarks, faces[0].landmarks5)
    assert pick_face(collage, faces=[weaker_large, faces[1]], min_score=faces[1].score) is faces[1]


def test_levels_start_with_dlibs_own_and_stay_within_the_pixel_limit() -> None:
    limit = 50_000_000
    assert _levels((800, 800), limit) == [1, 0]  # ×4 would pass 1600 px on the shorter side
    assert _levels((200, 200), limit) == [1, 0, 2, 3]
    assert _levels((112, 92), limit) == [1, 0, 2, 3]  # never beyond ×8
    assert _levels((3000, 4000), limit) == [1, 0]  # 48 megapixels upsampled: within the limit
    assert _levels((4000, 5000), limit) == [0]  # upsampled it would be 80 megapixels
    assert _levels((4000, 5000), 10_000_000) == []  # callers refuse the image before asking


@pytest.mark.parametrize("shape, error, words", [
    ((30, 4000), ImageError, "is a strip"),
    ((4000, 3), NoFaceError, "too small to hold a face"),
    ((40, 40 * MAX_ASPECT + 1), ImageError, f"refused above {MAX_ASPECT}:1"),
    ((MIN_SIDE - 1, 200), NoFaceError, f"at least {MIN_SIDE} px"),
])
def test_shapes_dlib_must_not_see_are_refused(shape: tuple[int, int], error: type, words: str) -> None:
    image = np.full((*shape, 3), 128, np.uint8)
    with pytest.raises(error, match=words) as err:
        detect_faces(image, source="strip.png")
    assert err.value.source == "strip.png"


def test_pixel_limit_bounds_every_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACELENS_MAX_PIXELS", "10000")
    with pytest.raises(ImageError, match="more pixels than the limit of 10000"):
        detect_faces(np.full((200, 200, 3), 128, np.uint8), source="big.png")
    with pytest.raises(ImageError, match="upsample 1 would make"):
        detect_faces(np.full((80, 80, 3), 128, np.uint8), upsample=1)
    assert detect_faces(np.full((80, 80, 3), 128, np.uint8)) == []  # level 0 only, nothing found


def test_fixed_upsample_and_bad_input(hopper: tuple) -> None:
    image, face = hopper
    at_one = detect_faces(image, upsample=1)
    assert len(at_one) == 1
    # Same face at another pyramid level: the boxes overlap heavily.
    a, b = face.box, at_one[0].box
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    assert inter / min(face.area, at_one[0].area) > 0.7
    assert face.upsample == 1 and not face.fallback and "dlib's own pipeline" in face.detection()
    with pytest.raises(ModelError):
        detect_faces(image, upsample=-1)
    with pytest.raises(ImageError):
        detect_faces(image[..., 0])
    with pytest.raises(ImageError):
        detect_faces(image.astype(np.float32))


def test_face_is_frozen_comparable_and_hashable(hopper: tuple) -> None:
    image, face = hopper
    twin = face_from_box(image, face.box, face.score)
    assert twin == face and hash(twin) == hash(face)
    assert twin != face_from_box(image, tuple(v + 4 for v in face.box), face.score)
    with pytest.raises(ValueError):
        face.landmarks[0, 0] = 0.0
    with pytest.raises(AttributeError):
        face.score = 1.0  # type: ignore[misc]
    assert face.width == face.box[2] - face.box[0] + 1 and face.area == face.width * face.height
    assert {face: 1}[twin] == 1


def test_landmark_groups_follow_the_subjects_sides(hopper: tuple) -> None:
    """dlib's "right" eye and brow are the subject's: on a frontal photo, the image's left."""
    _, face = hopper
    pts = face.landmarks
    x = {name: pts[list(idx)][:, 0].mean() for name, idx in LANDMARK_GROUPS.items()}
    assert x["right_eye"] < x["nose"] < x["left_eye"]
    assert x["right_brow"] < x["left_brow"]
    # dlib's 5 points are the eye corners and nose base, in the order of five_from_68.
    assert np.abs(five_from_68(pts) - face.landmarks5).max() < 0.05 * face.width


def test_face_from_landmarks_aligns_like_the_detected_face(hopper: tuple) -> None:
    image, face = hopper
    rebuilt = face_from_landmarks(image, face.landmarks)
    assert math.isnan(rebuilt.score)
    recipe = AlignRecipe(150, 0.25)
    a, b = align(image, face, recipe), align(image, rebuilt, recipe)
    # The 5 points taken from the 68 are within a few pixels of dlib's: the chips nearly agree
    # (on Grace Hopper's face from dlib's own detection: scale and rotation within 0.031, landmarks
    # within 5.3 px on the 150 px chip; from the level-0 box they were within 0.02 and 4 px).
    assert np.abs(a.matrix - b.matrix)[:, :2].max() < 0.04
    assert np.abs(a.points_to_chip(face.landmarks) - b.points_to_chip(face.landmarks)).max() < 6.0
    with pytest.raises(ModelError):
        face_from_landmarks(image, face.landmarks[:5])
