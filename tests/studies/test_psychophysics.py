"""Perturbations are graded (stronger level, stronger change); item-response curves on real photos go from
a high clean rate to chance; criterion levels, AUCs and the zoo follow their definitions."""

from __future__ import annotations

import json
import pickle

import cv2
import numpy as np
import pytest

from facelens.cli import main
from facelens.errors import FaceLensError
from facelens.faces.canonical import template_landmarks
from facelens.studies.perturbations import PERTURBATIONS, get_perturbation, perturb
from facelens.studies.psychophysics import (
    criterion_level,
    herding,
    item_response_curves,
    normalized_auc,
    split_gallery_probes,
)

from .conftest import write_manifest


@pytest.fixture(scope="module")
def chip() -> tuple[np.ndarray, np.ndarray]:
    """A smooth random texture with template landmarks in the middle (no model needed)."""
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 256, (150, 150, 3)).astype(np.float32), (0, 0), 2.0)
    img = ((img - img.min()) / (img.max() - img.min()) * 255).astype(np.uint8)
    return img, template_landmarks() * 105 + 22


def _sweep(name: str, chip: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
    img, lm = chip
    p = PERTURBATIONS[name]
    return [p.at(lv)(img, lm) for lv in p.levels]


def test_blur_removes_high_frequencies_monotonically(chip):
    lap = [cv2.Laplacian(cv2.cvtColor(o, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for o in _sweep("blur", chip)]
    assert np.all(np.diff(lap) < 0), lap


def test_jpeg_error_grows_as_quality_drops(chip):
    img = chip[0].astype(float)
    mse = [np.mean((o - img) ** 2) for o in _sweep("jpeg", chip)]
    assert np.all(np.diff(mse) > 0), mse


def test_noise_contrast_brightness_occlusion_are_graded(chip):
    img, lm = chip
    f = img.astype(float)
    noise = [np.std(o - f) for o in _sweep("noise", chip)]
    assert noise[0] == 0 and np.all(np.diff(noise) > 0)
    spread = [o.std() for o in _sweep("contrast", chip)]
    assert np.all(np.diff(spread) < 0) and spread[-1] < 0.6  # flat grey (±rounding) at factor 0
    means = [o.mean() for o in _sweep("brightness", chip)]
    assert np.all(np.diff(means) > 0) and means[-1] == 255
    p = PERTURBATIONS["occlusion"]
    x0, y0 = lm.min(0)
    x1, y1 = lm.max(0)
    box = (x1 - x0) * (y1 - y0)
    for lv in p.levels[1:]:
        for mode in ("centre", "random"):
            covered = (perturb(img, lm, "occlusion", lv, mode=mode) != img).any(-1).sum()
            assert covered == pytest.approx(lv * box, rel=0.12, abs=30), (lv, mode)


def test_rotation_identity_and_quarter_turn(chip):
    img, lm = chip
    assert np.array_equal(perturb(img, lm, "rotation", 0), img)
    assert np.array_equal(perturb(img, lm, "rotation", 360), img)
    # a bright dot right of the landmark centre ends up above it after +90° (counter-clockwise)
    dot = np.zeros_like(img)
    cx, cy = np.round(lm.mean(0)).astype(int)
    dot[cy, cx + 20] = 255
    out = perturb(dot, lm, "rotation", 90)
    y, x = np.unravel_index(out[..., 0].argmax(), out.shape[:2])
    assert abs(x - cx) <= 1 and abs(y - (cy - 20)) <= 1


def test_variants_are_picklable_and_seeded_per_face(chip):
    img, lm = chip
    fn = get_perturbation("noise").at(0.2, seed=3)
    again = pickle.loads(pickle.dumps(fn))
    assert np.array_equal(fn(img, lm), again(img, lm))
    assert not np.array_equal(fn(img, lm), fn(img, lm + 1.0))  # another face, other noise
    with pytest.raises(FaceLensError):
        get_perturbation("sharpen")
    with pytest.raises(FaceLensError):
        perturb(img.astype(np.float32), lm, "blur", 0.1)


def test_criterion_level_and_auc_follow_their_definitions():
    lv = np.linspace(0, 1, 11)
    rates = 1 - lv  # linear fall from 1 to 0
    assert criterion_level(lv, rates, 0.5) == pytest.approx(0.5)
    assert criterion_level(lv, rates, 0.25) == pytest.approx(0.75)
    assert normalized_auc(lv, rates) == pytest.approx(0.5)
    # decreasing levels (JPEG quality): the same curve read the other way round
    q = 100 - 90 * lv
    assert criterion_level(q, rates, 0.5) == pytest.approx(55.0)
    assert normalized_auc(q, rates) == pytest.approx(0.5)
    assert np.isnan(criterion_level(lv, np.ones(11), 0.5))
    assert normalized_auc([0, 2, 10], [0.7, 0.7, 0.7]) == pytest.approx(0.7)


def test_herding_partitions_and_finds_the_planted_goat_and_lamb():
    rng = np.random.default_rng(0)
    n = 12
    ids = [f"p{i}" for i in range(n)]
    s = rng.normal(-1.0, 0.05, (n, n))
    s[np.arange(n), np.arange(n)] = rng.normal(-0.3, 0.02, n)
    s[3, 3] = -0.9  # p3 barely matches itself: a goat
    s[:, 7] += 0.4  # everyone looks like p7: a lamb
    s[7, 7] = -0.3
    herd = herding(s, ids, ids, quantile=0.25)
    assert sorted(m.identity for m in herd) == sorted(ids)  # each identity exactly once
    cats = {m.identity: m.category for m in herd}
    assert set(cats.values()) <= {"goat", "lamb", "wolf", "sheep"}
    assert cats["p3"] == "goat" and cats["p7"] == "lamb"
    assert all((m.category == "sheep") == (not (m.goat or m.lamb or m.wolf)) for m in herd)
    with pytest.raises(FaceLensError):
        herding(s[:, :5], ids, ids)


@pytest.fixture(scope="module")
def london(pick_rows):
    return pick_rows("frl_london", 10)


def test_curves_on_real_photos_go_from_clean_to_chance(london):
    res = item_response_curves(london, "dlib-resnet", perturbations={"blur": (0, 0.1, 0.5), "brightness": (0, 1.0)},
                               n_boot=200)
    assert res.mode == "identification" and res.n_gallery == 10 and res.n_probes == 10
    blur, bright = res.curves["blur"], res.curves["brightness"]
    assert blur.chance == pytest.approx(0.1)
    assert blur.clean_rate >= 0.9 and blur.rates[0] == blur.clean_rate
    assert blur.rates[-1] <= blur.chance + 0.2 and bright.rates[-1] <= bright.chance + 0.2
    assert 0 < blur.criterion_level < 0.5
    assert blur.criterion == pytest.approx((blur.clean_rate + blur.chance) / 2)
    assert np.all(blur.lo <= blur.rates + 1e-12) and np.all(blur.rates <= blur.hi + 1e-12)
    assert res.herd is not None and sorted(m.identity for m in res.herd) == sorted({f"frl_london:{r.identity}"
                                                                                    for r in london})


def test_split_gallery_probes_keeps_identities_apart(london):
    gallery, probes = split_gallery_probes(london, probes_per_identity=1)
    assert len(gallery) == len(probes) == 10
    assert all("neutral" in str(g.path) and "smiling" in str(p.path) for g, p in zip(gallery, probes, strict=True))
    assert split_gallery_probes(london, max_identities=4, seed=1)[0] == split_gallery_probes(london, max_identities=4,
                                                                                             seed=1)[0]


def test_cli_writes_the_study_files(tmp_path, london):
    manifest = write_manifest(tmp_path / "m.csv", london)
    out = tmp_path / "out"
    assert main(["audit", "psychophysics", "--manifest", str(manifest), "--perturbations", "blur,rotation",
                 "--max-identities", "5", "--n-boot", "100", "--limit", "12", "--out", str(out)]) == 0
    data = json.loads((out / "psychophysics.json").read_text())
    assert set(data["summary"]["curves"]) == {"blur", "rotation"}
    assert data["counts"]["gallery"] == 5 and data["counts"]["probes"] == 5
    for name in ("curves", "examples", "herd"):
        assert (out / f"psychophysics_{name}.png").stat().st_size > 1000
    assert (out / "psychophysics_curves.csv").read_text().startswith("perturbation,level")
    assert "data:image/png;base64" in (out / "psychophysics.html").read_text()
