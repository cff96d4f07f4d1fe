"""The anonymization audit on real photos: masking the whole face must defeat re-identification while the
unmasked photos match; classifier tables must be self-consistent; bad photos are reported and skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facelens.cli import main
from facelens.datasets import ManifestRow
from facelens.errors import FaceLensError
from facelens.studies.anonymization import (
    UserMask,
    _user_mask_variant,
    anonymization_audit,
    anonymization_settings,
    load_user_mask,
    parse_strengths,
)

from .conftest import write_manifest


@pytest.fixture(scope="module")
def bad_rows(tmp_path_factory) -> list[ManifestRow]:
    """A corrupt file and a face-less image, posing as smiling photos of the first FRL London identity."""
    d = tmp_path_factory.mktemp("bad")
    corrupt = d / "corrupt.jpg"
    corrupt.write_bytes(b"this is not a JPEG")
    blank = d / "blank.png"
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(blank)
    return [ManifestRow(path=p, identity="frl_london_001", dataset="frl_london", subset="smiling")
            for p in (corrupt, blank)]


@pytest.fixture(scope="module")
def reid(pick_rows, bad_rows):
    """dlib-resnet re-identification: 10 FRL London identities (neutral enrolled, smiling probed) and 3 ORL
    identities (first photo enrolled, 2 probed), plus two bad probes."""
    rows = pick_rows("frl_london", 10) + pick_rows("orl", 3, per_identity=3) + bad_rows
    return anonymization_audit(rows, "dlib-resnet", methods=("full_face", "mouth"), saliency="gradcam",
                               n_boot=200)


def _row(result, dataset, setting):
    return next(r for r in result.tables["reidentification"] if r["dataset"] == dataset and r["setting"] == setting)


@pytest.mark.parametrize("dataset", ["frl_london", "orl"])
def test_full_face_mask_destroys_reidentification_while_unmasked_photos_match(reid, dataset):
    orig, full = _row(reid, dataset, "original"), _row(reid, dataset, "full_face")
    assert orig["rank1"] >= 0.9 and orig["verified_at_threshold"] >= 0.9
    assert orig["mean_genuine_distance"] < 0.6  # dlib's own "same person" rule holds unmasked
    # masked: the own enrolled photo is no longer accepted, and rank-1 falls to the chance region
    assert full["verified_at_threshold"] <= 0.2
    assert full["rank1"] <= max(3 * full["chance_rank1"], 0.2)
    assert full["mean_genuine_distance"] > 0.6


def test_verdicts_follow_the_numbers(reid):
    by_label = {v.split(":")[0]: v for v in reid.verdicts}
    assert by_label["unmasked baseline"].startswith("unmasked baseline")
    assert "not enough" not in by_label["full face"]
    assert "not enough" in by_label["mouth"]  # the mouth alone hides nothing from dlib-resnet
    assert "95% CI" in by_label["full face"] and "n = " in by_label["full face"]


def test_bad_photos_are_reported_and_skipped(reid, bad_rows):
    reasons = {Path(f["path"]).name: f["reason"] for f in reid.failures}
    assert set(reasons) >= {"corrupt.jpg", "blank.png"}
    assert "no face" in reasons["blank.png"]
    # the good smiling photo of that identity is still probed: 10 FRL probes, 3 × 2 ORL probes
    assert _row(reid, "frl_london", "original")["probes"] == 10
    assert _row(reid, "orl", "original")["probes"] == 6
    assert reid.counts["failed"] == len(reid.failures) == 2


def test_tar_at_far_is_nan_when_impostor_pairs_cannot_resolve_it(reid):
    row = _row(reid, "orl", "original")  # 6 probes × 2 other identities = 12 impostor pairs
    assert row["impostor_pairs"] == 12
    assert np.isnan(row["tar_at_far_0.01"]) and np.isnan(row["tar_at_far_0.001"])
    assert any("cannot resolve" in n and n.startswith("orl") for n in reid.notes)


def test_saliency_and_bar_figures_have_captions(reid):
    assert set(reid.figures) == {"reidentification", "saliency"}
    sal = reid.figures["saliency"]
    assert sal.ndim == 3 and sal.shape[2] == 3 and sal.std() > 10
    assert all(len(reid.captions[k]) > 60 for k in reid.figures)


@pytest.fixture(scope="module")
def gender(pick_rows):
    rows = pick_rows("frl_london", 5)
    return anonymization_audit(rows, "dlib-gender", methods=("eye_bar", "full_face", "blur"),
                               strengths={"blur": [0.4]}, masks=["eyes,nose"], saliency=None, n_boot=200)


def test_classifier_table_is_consistent(gender):
    table = {r["setting"]: r for r in gender.tables["classifier"]}
    assert list(table) == ["original", "eye_bar", "full_face", "blur 0.4", "mask eyes+nose"]
    orig = table["original"]
    assert orig["confidence_drop"] == 0 and orig["class_changed"] == 0
    assert orig["photos"] == 10
    for r in table.values():
        assert r["confidence_unmasked"] == pytest.approx(orig["confidence_unmasked"])
        assert r["confidence_drop"] == pytest.approx(r["confidence_unmasked"] - r["confidence_after"])
        assert 0 <= r["class_changed_ci_low"] <= r["class_changed"] <= r["class_changed_ci_high"] <= 1
    # dlib-gender's answer relies on the face: hiding all of it must cost confidence in the unmasked class
    assert table["full_face"]["confidence_drop"] > 0.05
    assert "accuracy_vs_label" in orig  # FRL London has self-reported sex
    examples = gender.tables["examples"]
    assert examples[0]["photo"].endswith(".jpg") and "(" in examples[0]["original"]


def test_user_masks_png_and_regions(tmp_path):
    png = tmp_path / "band.png"
    m = np.zeros((50, 50), np.uint8)
    m[10:20, :] = 255
    Image.fromarray(m).save(png)
    user = load_user_mask(str(png))
    assert user.label == "mask band" and user.pixels is not None and user.pixels.sum() == 500
    chip = np.full((150, 150, 3), 200, np.uint8)
    marks = np.zeros((68, 2))
    out = _user_mask_variant(chip, marks, pixels=user.pixels)
    assert (out[30:60] == 0).all() and (out[:30] == 200).all() and (out[60:] == 200).all()  # scaled ×3
    assert load_user_mask("eyes,nose") == UserMask("mask eyes+nose", ("eyes", "nose"))
    with pytest.raises(FaceLensError, match="not a region"):
        load_user_mask("eyes,elbow")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(FaceLensError, match=r"empty\.png.*hides nothing"):
        load_user_mask(str(tmp_path / "empty.png"))
    with pytest.raises(FaceLensError, match=r"missing\.png: mask file not found"):
        load_user_mask(str(tmp_path / "missing.png"))


def test_settings_and_strength_parsing():
    labels = [s.label for s in anonymization_settings(("eye_bar", "pixelate"), {"pixelate": [0.2, 0.3]})]
    assert labels == ["eye_bar", "pixelate 0.2", "pixelate 0.3"]
    assert parse_strengths(["blur=0.05,0.15", "pixelate=0.1"]) == {"blur": [0.05, 0.15], "pixelate": [0.1]}
    with pytest.raises(FaceLensError, match="METHOD=S1,S2"):
        parse_strengths(["eye_bar=0.1"])
    with pytest.raises(FaceLensError, match="unknown anonymization"):
        anonymization_settings(("sunglasses",))


def test_portrait_self_test_says_it_is_tiny():
    res = anonymization_audit(None, "dlib-gender", methods=("full_face",), saliency=None, n_boot=100)
    assert "tiny self-test" in res.notes[0] and "not a measurement" in res.notes[0]
    assert all(v.startswith("Tiny self-test (2 photos)") for v in res.verdicts)
    assert res.tables["classifier"][0]["photos"] == 8  # 2 portraits + 3 altered copies each


def test_cli_writes_json_csv_html(tmp_path, pick_rows):
    manifest = write_manifest(tmp_path / "m.csv", pick_rows("frl_london", 4) + pick_rows("orl", 2, per_identity=2))
    out = tmp_path / "out"
    code = main(["audit", "anonymization", "--manifest", str(manifest), "--limit", "12", "--methods", "full_face",
                 "--mask", "eyes", "--saliency", "none", "--bootstrap", "50", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "anonymization.json").read_text())
    assert data["settings"]["settings"] == ["original", "full_face", "mask eyes"]
    assert set(data["summary"]["rank1"]) == {"frl_london", "orl"}
    csv_text = (out / "anonymization_reidentification.csv").read_text()
    assert csv_text.startswith("dataset,setting,method,strength,identities,probes,rank1")
    html = (out / "anonymization.html").read_text()
    assert "data:image/png;base64," in html and "full face" in html
