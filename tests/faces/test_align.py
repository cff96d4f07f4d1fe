from __future__ import annotations

from pathlib import Path

import cv2
import dlib
import numpy as np
import pytest

from facelens.errors import ImageError, ModelError
from facelens.faces import AlignRecipe, Chip, align, chip_region_masks, detect_faces
from facelens.faces.align import similarity_matrix, template5_points
from facelens.faces.landmarks import shape_predictor

from .conftest import LondonPhoto, load_rgb

# InsightFace's arcface_dst (insightface/utils/face_align.py), typed out here independently of presets.py.
ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]])
ARCFACE = AlignRecipe(112, method="template5", template=tuple(map(tuple, ARCFACE_DST)))

# dlib's mean-face positions of its 5 landmarks in a chip without padding (interpolation.h,
# get_face_chip_details); with padding p a template point t lands at (p + t) / (1 + 2p) · size.
DLIB_5_TEMPLATE = np.array([
    [0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
    [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242],
    [0.4901123135679, 0.6277975316475],
])

PHOTOS = ["images/demo/grace_hopper.jpg", "images/demo/astronaut_eileen_collins.png",
          "images/frl_london/001/001_neutral.jpg", "images/frl_lisa/lisa2.jpg", "images/orl/s01/01.png"]


@pytest.fixture(scope="module")
def photos(shared_faces: Path) -> list[tuple[str, np.ndarray, object]]:
    out = []
    for path in PHOTOS:
        image = load_rgb(shared_faces / path)
        out.append((path, image, detect_faces(image)[0]))
    return out


@pytest.mark.parametrize("size, padding", [(150, 0.25), (64, 0.2), (200, 0.0), (112, 0.4)])
def test_dlib5_chip_is_dlibs_chip(photos: list, size: int, padding: float) -> None:
    for path, image, face in photos:
        chip = align(image, face, AlignRecipe(size, padding))
        expected = dlib.get_face_chip(image, face.full_object_detection(), size, padding)
        assert chip.image.shape == (size, size, 3) and chip.image.dtype == np.uint8
        assert np.array_equal(chip.image, expected), path
        assert chip.photo_shape == image.shape[:2] and chip.face is face


def test_matrix_puts_the_5_landmarks_where_dlib_aligns_them(photos: list) -> None:
    size, padding = 150, 0.25
    template = (padding + DLIB_5_TEMPLATE) / (1 + 2 * padding) * size
    for path, image, face in photos:
        chip = align(image, face, AlignRecipe(size, padding))
        mapped = chip.points_to_chip(face.landmarks5)
        # dlib fits a similarity to 5 points, so each misses its template spot by a few pixels only.
        assert np.abs(mapped - template).max() < 6.0, path
        # dlib's own 5-point model run on dlib's chip finds the landmarks where the matrix puts them.
        corners = chip.points_to_chip(np.array([[face.box[0], face.box[1]], [face.box[2], face.box[3]],
                                                [face.box[0], face.box[3]], [face.box[2], face.box[1]]], float))
        (x0, y0), (x1, y1) = np.floor(corners.min(0)).astype(int), np.ceil(corners.max(0)).astype(int)
        shape = shape_predictor(5)(chip.image, dlib.rectangle(int(x0), int(y0), int(x1), int(y1)))
        on_chip = np.array([(p.x, p.y) for p in shape.parts()], float)
        assert np.abs(mapped - on_chip).max() < 3.0, path
        # The 68 landmarks also land inside the chip, the eyes above the mouth.
        pts = chip.landmarks
        assert (pts > -1).all() and (pts < size).all()
        assert pts[36:48, 1].mean() < pts[48:68, 1].mean()


def test_opencv_warp_through_the_matrix_reproduces_the_chip(photos: list) -> None:
    _, image, face = photos[0]  # Grace Hopper: a 150 px chip shrinks her face by 0.64, dlib skips its pyramid
    chip = align(image, face, AlignRecipe(150, 0.25))
    scale = float(np.hypot(*chip.matrix[0, :2]))
    assert 0.5 < scale < 1.0
    warped = cv2.warpAffine(image.astype(np.float32), chip.matrix, (150, 150), flags=cv2.INTER_LINEAR)
    diff = np.abs(warped - chip.image.astype(np.float32))[2:-2, 2:-2]
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 1.5  # dlib truncates where OpenCV rounds

    # Where dlib shrinks through its image pyramid the pixels differ by blur, not by position.
    _, image, face = photos[2]  # London: a 64 px chip of a 300 px face
    chip = align(image, face, AlignRecipe(64, 0.25))
    scale = float(np.hypot(*chip.matrix[0, :2]))
    gray = cv2.GaussianBlur(image.astype(np.float32).mean(2), (0, 0), 0.5 * np.sqrt(1 / scale**2 - 1))
    warped = cv2.warpAffine(gray, chip.matrix, (64, 64), flags=cv2.INTER_LINEAR)
    window = cv2.createHanningWindow((64, 64), cv2.CV_32F)
    (dx, dy), _ = cv2.phaseCorrelate(warped, chip.image.astype(np.float32).mean(2), window)
    assert abs(dx) < 0.35 and abs(dy) < 0.35


def test_points_round_trip_and_to_photo(photos: list) -> None:
    _, image, face = photos[2]
    chip = align(image, face, AlignRecipe(150, 0.25))
    pts = face.landmarks
    assert np.allclose(chip.points_to_photo(chip.points_to_chip(pts)), pts, atol=1e-9)
    # A chip map holding each chip pixel's own x (and y) coordinate, warped back to the photo,
    # reads at every photo landmark the chip coordinate the matrix assigns it.
    ys, xs = np.mgrid[:150, :150].astype(np.float32)
    photo_x, photo_y = chip.to_photo(xs, fill=-1), chip.to_photo(ys, fill=-1)
    assert photo_x.shape == image.shape[:2] and photo_x.dtype == np.float32
    ix, iy = np.round(pts).astype(int).T
    expected = chip.points_to_chip(np.c_[ix, iy].astype(float))
    assert np.abs(photo_x[iy, ix] - expected[:, 0]).max() < 1e-3
    assert np.abs(photo_y[iy, ix] - expected[:, 1]).max() < 1e-3
    # Far from the face the photo gets the fill value.
    assert photo_x[0, 0] == -1 and photo_x[-1, -1] == -1
    # A coarse map (a 7×7 CAM) covers the same photo area as the full-size chip.
    coarse = chip.to_photo(np.ones((7, 7), np.float32))
    full = chip.to_photo(np.ones((150, 150), np.float32))
    assert np.abs((coarse > 0.5).astype(int) - (full > 0.5)).sum() < 0.01 * (full > 0.5).sum()


def test_chip_to_photo_to_chip_keeps_a_smooth_map(photos: list) -> None:
    _, image, face = photos[0]
    chip = align(image, face, AlignRecipe(150, 0.25))
    ys, xs = np.mgrid[:150, :150]
    smooth = np.exp(-((xs - 70.0) ** 2 + (ys - 85.0) ** 2) / (2 * 25.0**2)).astype(np.float32)
    back = chip.photo_to_chip(chip.to_photo(smooth))
    inner = (slice(5, -5), slice(5, -5))
    assert np.abs(back - smooth)[inner].max() < 0.03
    mask = smooth > 0.5
    assert (chip.photo_mask_to_chip(chip.chip_mask_to_photo(mask)) != mask).sum() < 0.05 * mask.sum()


def test_box_and_none_recipes(photos: list) -> None:
    _, image, face = photos[0]
    box_chip = align(image, face, AlignRecipe(48, 0.25, "box", grayscale=True))
    assert box_chip.image.shape == (48, 48, 3)
    # The box centre lands at the chip centre; the box spans 1 / 1.5 of the chip.
    center = box_chip.points_to_chip(np.array([face.center]))[0]
    assert np.abs(center - 23.5).max() < 1.0
    corners = box_chip.points_to_chip(np.array([[face.box[0] - 0.5, 0], [face.box[2] + 0.5, 0]]))
    assert abs((corners[1, 0] - corners[0, 0]) - 48 / 1.5) < 1.0
    # The chip shows the photo's pixels through its matrix.
    warped = cv2.warpAffine(cv2.GaussianBlur(image, (0, 0), 2.0), box_chip.matrix, (48, 48), flags=cv2.INTER_LINEAR)
    assert np.abs(warped.astype(float) - box_chip.image).mean() < 8.0

    whole = align(image, None, AlignRecipe(224, 0.0, "none"))
    assert whole.image.shape == (224, 224, 3) and whole.face is None
    h, w = image.shape[:2]
    photo_corners = np.array([[-0.5, -0.5], [w - 0.5, h - 0.5]])
    assert np.allclose(whole.points_to_chip(photo_corners), [[-0.5, -0.5], [223.5, 223.5]])
    assert (whole.to_photo(np.ones((224, 224), np.float32)) > 0.99).all()
    wide = align(image, face, AlignRecipe(96, method="none", width=128))
    assert wide.image.shape == (96, 128, 3) and wide.face is face
    assert np.allclose(wide.landmarks, wide.points_to_chip(face.landmarks))


def test_recipes_describe_and_validate() -> None:
    assert AlignRecipe(150).describe() == "dlib 5-point chip, 150×150, padding 0.25"
    assert "48×48" in AlignRecipe(48, 0.1, "box", grayscale=True).describe()
    assert AlignRecipe(224, method="none", width=192).chip_hw == (224, 192)
    for bad in (dict(size=0), dict(size=64, padding=-0.1), dict(size=64, method="mtcnn"),
                dict(size=64, method="dlib5", width=32)):
        with pytest.raises(ModelError):
            AlignRecipe(**bad)  # type: ignore[arg-type]


def test_align_rejects_missing_face_and_bad_images(photos: list) -> None:
    _, image, face = photos[0]
    with pytest.raises(ModelError, match="needs a face"):
        align(image, None, AlignRecipe(150))
    with pytest.raises(ImageError):
        align(image[..., :2], face, AlignRecipe(150))
    chip = align(image, face, AlignRecipe(150))
    assert isinstance(chip, Chip)
    with pytest.raises(ModelError):
        chip.to_photo(np.zeros((4, 4, 7), np.float32))
    with pytest.raises(ModelError, match="without a face"):
        _ = align(image, None, AlignRecipe(64, method="none")).landmarks


def _skimage_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """scikit-image's own estimate, as InsightFace's estimate_norm calls it (0.26 renamed the API)."""
    from skimage.transform import SimilarityTransform

    if hasattr(SimilarityTransform, "from_estimate"):
        return SimilarityTransform.from_estimate(src, dst).params[:2]
    tform = SimilarityTransform()
    assert tform.estimate(src, dst)
    return tform.params[:2]


def test_template5_puts_the_five_points_on_the_template(london_neutral: list[LondonPhoto]) -> None:
    residuals = []
    for path, image, _, face in london_neutral:
        chip = align(image, face, ARCFACE)
        assert chip.image.shape == (112, 112, 3) and chip.image.dtype == np.uint8 and chip.face is face
        five = template5_points(face.landmarks)
        mapped = chip.points_to_chip(five)
        # Least squares: the translation is optimal, so the fitted points' centroid is the template's.
        assert np.abs(mapped.mean(0) - ARCFACE_DST.mean(0)).max() < 1e-9, path
        residuals.append(np.hypot(*(mapped - ARCFACE_DST).T))
        # The matrix carries all 68 landmarks; the chip is OpenCV's warp through that very matrix.
        assert np.array_equal(chip.landmarks, chip.points_to_chip(face.landmarks))
        assert np.allclose(chip.points_to_photo(chip.landmarks), face.landmarks, atol=1e-9)
        warped = cv2.warpAffine(image, chip.matrix, (112, 112), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        assert np.array_equal(warped, chip.image), path
        # Image-left eye first: the subject's right eye (36–41) is on the image's left.
        assert mapped[0, 0] < mapped[1, 0] and mapped[3, 0] < mapped[4, 0] and mapped[:2, 1].max() < mapped[2, 1]
    res = np.array(residuals)
    print(f"\ntemplate5 residuals on {len(res)} London photos, px in the 112 chip: mean {res.mean():.2f}, "
          f"max {res.max():.2f}; per point (eyes, nose, mouth corners) {np.round(res.mean(0), 2).tolist()}")
    # A similarity cannot fit 5 points exactly, and dlib's nose tip (30) sits where ArcFace's does
    # not quite: measured mean 1.44 px, max 6.6 px (a nose tip), worst photo mean 2.8 px.
    assert res.mean() < 2.0 and res.mean(axis=1).max() < 3.5 and res.max() < 8.0
    assert res[:, [0, 1, 3, 4]].mean() < 1.5  # eyes and mouth corners fit closer than the nose


def test_template5_matrix_equals_scikit_images_similarity(london_neutral: list[LondonPhoto]) -> None:
    for path, _, _, face in london_neutral:
        five = template5_points(face.landmarks)
        expected = _skimage_similarity(five, ARCFACE_DST)
        assert np.abs(similarity_matrix(five, ARCFACE_DST) - expected).max() <= 1e-9, path
    rng = np.random.default_rng(0)
    for _ in range(20):
        src, dst = rng.uniform(0, 500, (5, 2)), rng.uniform(0, 112, (5, 2))
        assert np.abs(similarity_matrix(src, dst) - _skimage_similarity(src, dst)).max() <= 1e-9
    # A similarity: equal scales, no shear, and exact on points that are a similarity image.
    m = similarity_matrix(five, ARCFACE_DST)
    assert np.isclose(m[0, 0], m[1, 1]) and np.isclose(m[0, 1], -m[1, 0])
    angle, scale = 0.3, 0.7
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    assert np.allclose(similarity_matrix(five, five @ rot.T + [5.0, -3.0]), np.c_[rot, [5.0, -3.0]], atol=1e-9)
    with pytest.raises(ModelError, match="coincide"):
        similarity_matrix(np.ones((5, 2)), ARCFACE_DST)


def test_template5_points_follow_the_template_order(london_neutral: list[LondonPhoto]) -> None:
    pts = london_neutral[0][3].landmarks
    five = template5_points(pts)
    assert np.allclose(five[0], pts[36:42].mean(0)) and np.allclose(five[1], pts[42:48].mean(0))
    assert np.array_equal(five[2:], pts[[30, 48, 54]])
    with pytest.raises(ModelError):
        template5_points(pts[:5])


def test_regions_work_through_a_template5_chip(london_neutral: list[LondonPhoto]) -> None:
    for path, image, _, face in london_neutral[:5]:
        chip = align(image, face, ARCFACE)
        masks = chip_region_masks(chip)
        # The template's eyes lie in the eye regions, image-left eye = the subject's right eye.
        for (x, y), region in zip(ARCFACE_DST[:2], ("right_eye", "left_eye"), strict=True):
            assert masks[region][round(y), round(x)], (path, region)
        assert masks["nose"][round(ARCFACE_DST[2, 1]) - 3, round(ARCFACE_DST[2, 0])], path
        # Chip maps go back to the photo and return: a mask over the chip's eyes covers the photo's eyes.
        eyes = masks["left_eye"] | masks["right_eye"]
        on_photo = chip.chip_mask_to_photo(eyes)
        centre = np.round(face.landmarks[36:42].mean(0)).astype(int)
        assert on_photo[centre[1], centre[0]], path
        assert (chip.photo_mask_to_chip(on_photo) != eyes).sum() < 0.2 * eyes.sum()


def test_template5_recipe_validates_its_template() -> None:
    assert ARCFACE.template == tuple(map(tuple, ARCFACE_DST.tolist()))
    assert "112×112" in ARCFACE.describe() and "template" in ARCFACE.describe()
    listed = AlignRecipe(112, method="template5", template=ARCFACE_DST.tolist())  # type: ignore[arg-type]
    assert listed == ARCFACE and hash(listed) == hash(ARCFACE)
    bad = [
        (dict(method="template5"), "needs a template"),
        (dict(method="dlib5", template=ARCFACE.template), "only used by"),
        (dict(method="template5", template=ARCFACE_DST[:4].tolist()), "5 \\(x, y\\) points"),
        (dict(method="template5", template=[[1.0, 1.0]] * 5), "coincide"),
        (dict(method="template5", template=ARCFACE_DST[[1, 0, 2, 4, 3]].tolist()), "image-left eye"),
        (dict(method="template5", template=(ARCFACE_DST * 100).tolist()), "far outside"),
        (dict(method="template5", template=[[np.nan, 1.0]] * 5), "finite"),
        (dict(method="template5", template="arcface"), "5 \\(x, y\\) points"),
        (dict(method="template5", template=ARCFACE.template, width=96), "square"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ModelError, match=message):
            AlignRecipe(112, **kwargs)  # type: ignore[arg-type]
