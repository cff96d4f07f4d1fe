"""Perturbations are graded (stronger level, stronger change); item-response curves on real photos go from
a high clean rate to chance; criterion levels, AUCs and the zoo follow their definitions; verdicts and
crossings follow their intervals (an interval that contains the criterion never reads "stays above")."""

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
    crossing_interval,
    format_level,
    herding,
    item_response_curve,
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


def _hits(rates: list[float], n_ids: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-level hits of ``n_ids`` probes (one per identity) with exactly round(rate × n) right, shuffled."""
    rng = np.random.default_rng(seed)
    jpeg = PERTURBATIONS["jpeg"]
    out = {"original": np.ones(n_ids)}
    for lv, r in zip(jpeg.levels, rates, strict=True):
        h = np.zeros(n_ids)
        h[: round(r * n_ids)] = 1
        out[jpeg.label(lv)] = rng.permutation(h)
    return out


def _jpeg_curve(rates: list[float], n_ids: int, criterion: float):
    correct = _hits(rates, n_ids)
    ids = np.array([f"p{i}" for i in range(n_ids)], dtype=object)
    return item_response_curve(PERTURBATIONS["jpeg"], PERTURBATIONS["jpeg"].levels, correct, ids, 0.025, criterion,
                               300, 0, "rank-1 rate")


def test_an_interval_containing_the_criterion_at_the_last_level_is_inconclusive():
    # the case: 29 probes, rate 0.66 at quality 1, criterion 0.517 inside its interval
    c = _jpeg_curve([1.0, 1.0, 0.97, 0.93, 0.9, 0.86, 0.8, 0.72, 0.66], 29, 0.517)
    assert c.lo[-1] < 0.517 < c.hi[-1]
    assert not np.isfinite(c.criterion_level)  # the point estimate never crosses...
    assert c.verdict is not None and c.verdict.status == "inconclusive"  # ...but that is not "never reaches"
    text = c.sentence()
    assert "stays above" not in text and "never" not in text and "cannot be told" in text
    assert c.summary()["still_above_at_last_level"] == "inconclusive"


def test_a_curve_clearly_above_or_below_the_criterion_is_decided():
    above = _jpeg_curve([1.0] * 9, 40, 0.5)
    assert above.verdict is not None and above.verdict.status == "supported"
    assert "stays above the criterion over the whole sweep" in above.sentence()
    falls = _jpeg_curve([1.0, 1.0, 0.95, 0.9, 0.7, 0.4, 0.1, 0.0, 0.0], 40, 0.5)
    assert falls.verdict is not None and falls.verdict.status == "not supported"
    # the crossing comes with an interval that holds it, quoted to two figures
    # (in sweep order: JPEG quality falls, so the interval runs from the higher quality to the lower)
    assert falls.crossing_from >= falls.criterion_level >= falls.crossing_to and not falls.crossing_beyond
    assert falls.crossing_from > falls.crossing_to
    bounds = falls.summary()
    assert bounds["criterion_level_ci_low"] == falls.crossing_to and bounds["criterion_level_ci_high"] == \
        falls.crossing_from
    assert (f"falls below the criterion at JPEG quality = {format_level(falls.criterion_level)} (95% interval "
            f"{format_level(falls.crossing_to)} to {format_level(falls.crossing_from)})") in falls.sentence()
    # every rate interval has width, at 40/40 and 0/40 too
    assert np.all(falls.hi > falls.lo) and falls.rates[0] == 1.0 and falls.rates[-1] == 0.0
    few = _jpeg_curve([1.0, 1.0, 0.95, 0.9, 0.7, 0.4, 0.1, 0.0, 0.0], 5, 0.5)
    assert few.verdict is not None and few.verdict.status == "inconclusive" and "fewer than 8" in few.verdict.reason


def test_crossing_interval_resamples_identities():
    lv = np.array([0.0, 1.0, 2.0, 3.0])
    # everyone is right at 0 and 1, wrong at 3; at level 2, 15 of 40 people: the crossing moves with who is drawn
    hits = np.zeros((40, 4))
    hits[:, :2] = 1
    hits[:15, 2] = 1
    ids = [f"p{i}" for i in range(40)]
    lo, hi, beyond = crossing_interval(lv, hits, ids, 0.5, n_boot=500, seed=0)
    point = criterion_level(lv, hits.mean(0), 0.5)
    assert point == pytest.approx(1.8)
    assert lo < point < hi and not beyond and lo >= 1.0 and hi <= 3.0
    # everyone jumps from right to wrong between two levels: the sweep grid is all the resolution there is
    jump = np.zeros((40, 4))
    jump[:, :2] = 1
    assert crossing_interval(lv, jump, ids, 0.5, n_boot=200) == (1.0, 2.0, False)
    # nobody ever falls below: no crossing, beyond the sweep
    lo, hi, beyond = crossing_interval(lv, np.ones((40, 4)), ids, 0.5, n_boot=200)
    assert np.isnan(lo) and np.isnan(hi) and beyond


def test_levels_are_quoted_to_two_significant_figures():
    assert [format_level(x) for x in (0.1437, 31.26, 0.7149, 3.44, float("nan"))] == ["0.14", "31", "0.71", "3.4",
                                                                                       "n/a"]


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
    assert np.all(blur.hi > blur.lo)  # Wilson: never of zero width, also at 10/10 and 0/10
    assert blur.verdict is not None and blur.verdict.status == "not supported"  # 10 people: enough to decide
    assert blur.crossing_from <= blur.criterion_level <= (blur.crossing_to if not blur.crossing_beyond else 0.5)
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
    # 5 identities: every curve is measured and drawn, but no verdict is given on so few people
    assert all(d["status"] == "inconclusive" and "fewer than 8" in d["reason"] for d in data["summary"]["verdicts"])
    assert all("fewer than 8" in v for v in data["verdicts"][1:] if not v.startswith("Zoo"))
    assert "data:image/png;base64" in (out / "psychophysics.html").read_text()
