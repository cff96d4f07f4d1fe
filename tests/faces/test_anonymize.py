"""Landmark-placed anonymization: what each method changes, and where."""

from __future__ import annotations

import numpy as np
import pytest

from facelens.errors import FaceLensError
from facelens.faces.anonymize import (
    ANONYMIZATIONS,
    Anonymization,
    anonymization_mask,
    anonymize,
    iod,
)
from facelens.faces.regions import eye_bar_mask, region_masks


def _high_frequency_energy(img: np.ndarray, mask: np.ndarray) -> float:
    gray = img.astype(np.float64).mean(2)
    lap = np.abs(gray[1:-1, 1:-1] * 4 - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:])
    return float(lap[mask[1:-1, 1:-1]].mean())


def test_every_method_changes_only_its_area(hopper):
    image, face = hopper
    for method in ANONYMIZATIONS:
        strength = 0.2 if method in ("blur", "pixelate") else None
        user = eye_bar_mask(image.shape[:2], face.landmarks) if method == "mask" else None
        out = anonymize(image, face.landmarks, method, strength, mask=user)
        area = anonymization_mask(image.shape[:2], face.landmarks, method, user)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert np.array_equal(out[~area], image[~area]), f"{method} changed pixels outside its area"
        changed = np.any(out != image, axis=2)
        assert changed[area].mean() > 0.5, f"{method} left most of its area untouched"


def test_masks_cover_the_named_regions(hopper):
    image, face = hopper
    regions = region_masks(image.shape[:2], face.landmarks)
    eyes = regions["left_eye"] | regions["right_eye"]
    bar = anonymization_mask(image.shape[:2], face.landmarks, "eye_bar")
    assert bar[eyes].mean() > 0.95
    assert not bar[regions["mouth"]].any()
    eyes_nose = anonymization_mask(image.shape[:2], face.landmarks, "eyes_nose")
    assert eyes_nose[regions["nose"]].all() and not eyes_nose[regions["mouth"]].any()
    full = anonymization_mask(image.shape[:2], face.landmarks, "full_face")
    assert full[regions["mouth"]].all() and full[eyes].all() and not full[regions["hair_background"]].any()


def test_stronger_blur_and_pixelation_remove_more_detail(hopper):
    image, face = hopper
    from scipy.ndimage import binary_erosion

    # inside the face only: the seam where the altered face meets the untouched photo is an edge itself
    face_area = binary_erosion(anonymization_mask(image.shape[:2], face.landmarks, "full_face"), iterations=6)
    for method in ("blur", "pixelate"):
        energies = [_high_frequency_energy(anonymize(image, face.landmarks, method, s), face_area)
                    for s in (0.05, 0.2, 0.5)]
        assert energies[0] > energies[1] > energies[2], (method, energies)
        assert energies[0] < _high_frequency_energy(image, face_area)


def test_strength_is_relative_to_the_inter_ocular_distance(hopper):
    image, face = hopper
    small = np.ascontiguousarray(image[::2, ::2])
    marks = face.landmarks / 2.0
    assert iod(marks) == pytest.approx(iod(face.landmarks) / 2, rel=1e-6)
    area_big = anonymization_mask(image.shape[:2], face.landmarks, "full_face")
    area_small = anonymization_mask(small.shape[:2], marks, "full_face")
    e_big = _high_frequency_energy(anonymize(image, face.landmarks, "blur", 0.2), area_big)
    e_small = _high_frequency_energy(anonymize(small, marks, "blur", 0.2), area_small)
    base_big, base_small = _high_frequency_energy(image, area_big), _high_frequency_energy(small, area_small)
    # the same relative strength removes a similar share of the detail at both scales
    assert abs(e_big / base_big - e_small / base_small) < 0.15


def test_bad_settings_are_facelens_errors(hopper):
    image, face = hopper
    with pytest.raises(FaceLensError, match="unknown anonymization"):
        Anonymization("sunglasses")
    with pytest.raises(FaceLensError, match="positive strength"):
        anonymize(image, face.landmarks, "blur")
    with pytest.raises(FaceLensError, match="needs a mask"):
        anonymize(image, face.landmarks, "mask")
    with pytest.raises(FaceLensError, match="the mask is"):
        anonymize(image, face.landmarks, "mask", mask=np.zeros((3, 3), bool))
    with pytest.raises(FaceLensError, match="uint8"):
        anonymize(image.astype(np.float32), face.landmarks, "eye_bar")
    assert Anonymization("pixelate", 0.25).label == "pixelate 0.25"
