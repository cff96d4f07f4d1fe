"""The anonymization audit on real photos: masking the whole face must defeat re-identification while the
unmasked photos match; verdicts follow the one interval rule (a setting at chance never reads "partial");
classifier tables must be self-consistent; the self-test is an illustration; bad photos are reported and skipped."""

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
    reidentify,
)
from facelens.studies.recognition import above_chance, illustration_label

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


def _decided(result, dataset, setting):
    return next(d for d in result.summary["verdicts"] if d["dataset"] == dataset and d["setting"] == setting)


def _line(result, dataset, setting):
    label = "unmasked baseline" if setting == "original" else setting.replace("_", " ")
    return next(v for v in result.verdicts if v.startswith(f"{label} — {dataset}:"))


def test_verdicts_follow_the_numbers(reid):
    # FRL London, 10 identities: unmasked and mouth-masked photos are re-identified (whole interval above the
    # bar); the full face mask is at chance, so the claim is not supported — never "partial"
    assert _decided(reid, "frl_london", "original")["status"] == "supported"
    assert _decided(reid, "frl_london", "mouth")["status"] == "supported"
    assert "is not enough against dlib-resnet" in _line(reid, "frl_london", "mouth")
    full = _decided(reid, "frl_london", "full_face")
    assert full["status"] in ("not supported", "inconclusive")
    assert full["threshold"] == pytest.approx(above_chance(1 / 10))
    line = _line(reid, "frl_london", "full_face")
    assert "partial" not in line and "sizeable" not in line and "not enough" not in line
    assert "(95% interval), n = 10 identities" in line
    # ORL here has 3 identities: fewer than the least the tool decides on, whatever the numbers
    for setting in ("original", "mouth", "full_face"):
        d = _decided(reid, "orl", setting)
        assert d["status"] == "inconclusive" and "fewer than 8" in d["reason"]
    # the table says the same as the sentences
    for r in reid.tables["reidentification"]:
        assert r["still_reidentified"] == _decided(reid, r["dataset"], r["setting"])["status"]


def test_no_interval_of_zero_width(reid):
    rows = reid.tables["reidentification"]
    found = [(k[:-7], r[k], r[k[:-7] + "_ci_high"]) for r in rows for k in r if k.endswith("_ci_low")]
    assert {n for n, *_ in found} == {"rank1", "verified_at_threshold", "false_accepts_at_threshold"}
    for name, lo, hi in found:
        assert hi > lo, (name, lo, hi)
    full = _row(reid, "frl_london", "full_face")
    assert full["verified_at_threshold"] == 0 and full["verified_at_threshold_ci_high"] > 0  # 0/n still has width


def _separated(n_ids: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n_ids, 16)), [f"id{i}" for i in range(n_ids)]


def test_known_answers_on_synthetic_embeddings():
    gallery, labels = _separated(40)
    rng = np.random.default_rng(1)
    kept = gallery + rng.normal(scale=0.05, size=gallery.shape)  # a mask that keeps identity
    random = rng.normal(size=gallery.shape)  # a mask that leaves nothing of the person: rank-1 at chance
    opts = dict(metric="l2", score_threshold=-0.6, n_boot=200)
    keeps = reidentify(gallery, labels, kept, labels, setting="weak", **opts)
    hides = reidentify(gallery, labels, random, labels, setting="strong", **opts)
    assert keeps.verdict.status == "supported" and keeps.rank1.value == 1.0
    assert hides.verdict.status in ("not supported", "inconclusive")
    assert hides.rank1.lo < hides.bar and hides.bar == pytest.approx(above_chance(1 / 40))
    # few people: no verdict either way, with the reason stated
    small, small_labels = _separated(5)
    few = reidentify(small, small_labels, small, small_labels, **opts)
    assert few.rank1.value == 1.0 and few.verdict.status == "inconclusive" and "fewer than 8" in few.verdict.reason
    # a self-test decides nothing, however clear the numbers
    shown = reidentify(gallery, labels, kept, labels, illustration=True, **opts)
    assert shown.verdict.status == "inconclusive" and "illustration" in shown.verdict.reason


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
    # the unmasked row's drop is 0 by definition: no interval rather than one of zero width
    assert np.isnan(orig["confidence_drop_ci_low"]) and np.isnan(orig["confidence_drop_ci_high"])
    for r in table.values():
        assert r["confidence_unmasked"] == pytest.approx(orig["confidence_unmasked"])
        assert r["confidence_drop"] == pytest.approx(r["confidence_unmasked"] - r["confidence_after"])
        assert 0 <= r["class_changed_ci_low"] <= r["class_changed"] <= r["class_changed_ci_high"] <= 1
        assert r["class_changed_ci_high"] > r["class_changed_ci_low"]
        if r["setting"] != "original":
            assert r["confidence_drop_ci_high"] > r["confidence_drop_ci_low"]
    # every masked setting gets the two decided claims; 5 FRL London people is fewer than 8: inconclusive
    decided = gender.summary["verdicts"]
    assert len(decided) == 2 * (len(table) - 1)
    assert all(d["status"] == "inconclusive" and "fewer than 8" in d["reason"] for d in decided)
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


def test_portrait_self_test_is_an_illustration_without_verdict():
    label = illustration_label(2)
    res = anonymization_audit(None, "dlib-gender", methods=("full_face",), saliency=None, n_boot=100)
    assert res.notes[0].startswith(label) and "measures nothing" in res.notes[0]
    # said once, before the numbers it qualifies; the lines after it are numbers, never a status
    assert res.verdicts[0].startswith(label) and "not findings" in res.verdicts[0]
    assert not any(s in v for v in res.verdicts for s in (": supported", ": not supported", ": inconclusive"))
    assert res.tables["classifier"][0]["photos"] == 8  # 2 portraits + 3 altered copies each
    assert all(d["status"] == "inconclusive" and "illustration" in d["reason"] for d in res.summary["verdicts"])
    reid = anonymization_audit(None, "dlib-resnet", methods=("full_face",), saliency=None, n_boot=100)
    assert reid.verdicts[0].startswith(label) and "not findings" in reid.verdicts[0]
    assert not any(s in v for v in reid.verdicts for s in (": supported", ": not supported", ": inconclusive"))
    assert all(d["status"] == "inconclusive" and "illustration" in d["reason"] for d in reid.summary["verdicts"])
    assert not any("still re-identifies" in v and ": supported" in v for v in reid.verdicts)


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
