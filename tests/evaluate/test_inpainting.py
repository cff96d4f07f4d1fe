"""The inpainting game: region swaps, the network's filter, mass thresholds, and known-answer maps."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from facelens.errors import ModelError
from facelens.evaluate import inpainting as game
from facelens.faces.regions import landmark_region_masks
from facelens.models.registry import load_model

N_IDENTITIES = 4
REGIONS = ("nose", "brows")


# -- the pure parts ----------------------------------------------------------------------------------------
def test_mass_counts_follow_percent_density() -> None:
    # masses 0.5, 0.25, 0.25, 0: the mass above each pixel is 0, 0.5, 0.75, 1.0
    sorted_mass = np.array([0.5, 0.25, 0.25, 0.0])
    percents = np.array([0, 40, 50, 60, 80, 100])
    assert game.mass_counts(sorted_mass, percents).tolist() == [0, 1, 1, 2, 3, 3]
    assert game.mass_counts(sorted_mass, percents, include_zero=True).tolist() == [0, 1, 1, 2, 3, 4]


def test_saliency_order_breaks_ties_at_random_but_reproducibly() -> None:
    flat = np.ones((10, 10))
    order_a, mass = game.saliency_order(flat, seed=1)
    order_b, _ = game.saliency_order(flat, seed=1)
    order_c, _ = game.saliency_order(flat, seed=2)
    assert np.array_equal(order_a, order_b) and not np.array_equal(order_a, order_c)
    assert not np.array_equal(order_a[:10], np.arange(10))  # not the top-left row first
    assert mass.sum() == pytest.approx(1.0)
    signed = np.array([[-5.0, 1.0], [3.0, 0.0]])  # negative evidence carries no mass when positive exists
    order, mass = game.saliency_order(signed)
    assert order[:2].tolist() == [2, 1] and mass.tolist() == pytest.approx([0.75, 0.25, 0, 0])


def test_curve_area_and_rates_by_hand() -> None:
    far = np.array([0.0, 0.0, 0.02, 0.10, 0.50])
    rate = np.array([0.0, 0.5, 0.5, 1.0, 1.0])
    # trapezoids: [0→0.02] 0.5·0.02, [0.02→0.10] 0.75·0.08, [0.10→0.50] 1·0.4, held [0.50→1] 1·0.5
    assert game.curve_area(far, rate) == pytest.approx(0.01 + 0.06 + 0.4 + 0.5)
    assert game.rate_at(far, rate, 0.01) == pytest.approx(0.5)
    assert game.rate_at(far, rate, 0.06) == pytest.approx(0.75)
    assert game.rate_at(far, rate, 0.9) == pytest.approx(1.0)


@pytest.mark.parametrize(("distances", "reason"), [
    ((0.2, 0.5, 0.3, 0.5), None),
    ((0.7, 0.9, 0.3, 0.9), "probe does not match its mate"),
    ((0.2, 0.15, 0.3, 0.5), "probe closer to the twin gallery than to its mate"),
    ((0.2, 0.5, 0.6, 0.5), "inpainted probe closer to the mate than to the twin gallery"),
    ((0.2, 0.5, 0.3, 0.35), "inpainted probe still matches the mate"),
])
def test_filter_rules(distances: tuple[float, float, float, float], reason: str | None) -> None:
    assert game._accept(*distances, threshold=0.4) == reason


# -- real photos -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def london(shared_faces: Path) -> tuple[list[dict[str, str]], Path]:
    with open(shared_faces / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["dataset"] == "frl_london"]
    ids = sorted({r["identity"] for r in rows})[:N_IDENTITIES]
    return [r for r in rows if r["identity"] in ids], shared_faces


@pytest.fixture(scope="module")
def game_set(london: tuple[list[dict[str, str]], Path]) -> game.GameSet:
    rows, root = london
    return game.make_triplets(rows, load_model("dlib-resnet"), root=root, regions=REGIONS, donors=1,
                              threshold="genuine")


def test_swap_changes_only_the_dilated_region(london: tuple[list[dict[str, str]], Path]) -> None:
    rows, root = london
    model = load_model("dlib-resnet")
    probe = model.chip(root / rows[0]["path"])
    donor = model.chip(root / next(r for r in rows if r["identity"] != rows[0]["identity"])["path"])
    for region in ("eyes", "brows", "nose", "mouth"):
        out, mask = game.replace_region(probe.image, probe.landmarks, donor.image, donor.landmarks, region)
        diff = np.abs(out.astype(int) - probe.image.astype(int)).sum(axis=2)
        assert not diff[~mask].any(), f"{region}: pixels outside the mask changed"
        assert diff[mask].mean() > 5, f"{region}: the region did not change"
        # the mask hugs the landmark region: inside it, grown by a few pixels
        parts = game.GAME_REGIONS[region][0]
        tight = np.zeros(mask.shape, bool)
        for name, m in landmark_region_masks(probe.landmarks, mask.shape).items():
            if name in parts:
                tight |= m
        assert (mask & tight).sum() >= 0.95 * tight.sum()
        grown = cv2.dilate(tight.astype(np.uint8), np.ones((17, 17), np.uint8)) > 0
        assert not (mask & ~grown).any()
        assert mask.mean() < 0.12


def test_unknown_region_is_refused(london: tuple[list[dict[str, str]], Path]) -> None:
    rows, root = london
    model = load_model("dlib-resnet")
    chip = model.chip(root / rows[0]["path"])
    with pytest.raises(ModelError, match="unknown game region"):
        game.replace_region(chip.image, chip.landmarks, chip.image, chip.landmarks, "ears")
    with pytest.raises(ModelError, match="unknown game region"):
        game.make_triplets(rows, model, root=root, regions=["ears"])


def test_filter_keeps_exactly_the_cases_the_network_separates(game_set: game.GameSet) -> None:
    gs = game_set
    assert gs.candidates == N_IDENTITIES * len(REGIONS) == len(gs.cases)
    assert 0 < gs.kept < gs.candidates  # it really filters, and something survives
    assert sum(gs.rejected.values()) == gs.candidates - gs.kept
    thr = gs.threshold
    for case in gs.cases:
        ok = (case["probe_mate"] < thr and case["probe_mate"] < case["probe_twin_gallery"]
              and case["twin_twin_gallery"] < case["twin_mate"] and case["twin_mate"] > thr)
        assert ok == (case["outcome"] == "kept")
    # the calibrated threshold is the genuine distances' 95 % quantile: not above the largest
    assert thr <= max(c["probe_mate"] for c in gs.cases)


def test_the_model_threshold_keeps_nothing_on_studio_photos(london: tuple[list[dict[str, str]], Path]) -> None:
    # dlib's 0.6 was set on LFW; a single swapped region never moves a London probe that far from its mate
    rows, root = london
    gs = game.make_triplets(rows, load_model("dlib-resnet"), root=root, regions=("nose",), donors=1)
    assert gs.threshold == 0.6 and gs.kept == 0
    assert gs.rejected.get("inpainted probe still matches the mate", 0) > 0


def test_oracle_beats_random_beats_inverted(game_set: game.GameSet) -> None:
    trips = game_set.triplets
    masks = np.stack([t.mask for t in trips]).astype(np.float64)
    rng = np.random.default_rng(0)
    metric = game.InpaintingGame(load_model("dlib-resnet"), normalize=game_set.normalize, step=10)
    metric.update(trips, {"oracle": masks, "random": rng.random(masks.shape), "inverted": 1.0 - masks})
    res = metric.compute()["methods"]
    oracle, random_, inverted = (res[k] for k in ("oracle", "random", "inverted"))
    # the oracle replaces only changed pixels: no false alarm, and the full region is the inpainted twin
    assert oracle["false_alarm_at_full_mass"] == 0.0 and oracle["rate_at_full_mass"] == 1.0
    assert oracle["area"] == pytest.approx(1.0)
    # outside the region probe and twin are identical, so the inverted map can never flip the identity
    assert inverted["area"] == 0.0
    assert oracle["area"] > random_["area"] > inverted["area"]
    assert oracle["rate_at_far_5pct"] > random_["rate_at_far_5pct"]
    curve = oracle["curve"]
    assert curve["nonmate_rate"][0] == 0.0  # nothing replaced: every kept probe is still itself
    assert curve["iou"][-1] == pytest.approx(1.0)


def test_streamed_game_equals_one_batch(game_set: game.GameSet) -> None:
    trips = game_set.triplets
    maps = np.random.default_rng(3).random((len(trips), *trips[0].mask.shape))
    model = load_model("dlib-resnet")
    whole = game.InpaintingGame(model, normalize=game_set.normalize, step=25)
    whole.update(trips, maps, method="random")
    parts = game.InpaintingGame(model, normalize=game_set.normalize, step=25, batch_size=3)
    half = len(trips) // 2
    parts.update(trips[:half], maps[:half], method="random")
    other = game.InpaintingGame(model, normalize=game_set.normalize, step=25)
    other.update(trips[half:], maps[half:], method="random")
    parts.merge(other)
    a, b = whole.compute()["methods"]["random"], parts.compute()["methods"]["random"]
    assert a["area"] == pytest.approx(b["area"]) and a["curve"] == b["curve"]
    with pytest.raises(ModelError, match="maps must be"):
        whole.update(trips, maps[:, :10], method="bad")


def test_a_real_method_plays_and_the_figure_draws(game_set: game.GameSet) -> None:
    model = load_model("dlib-resnet")
    trips = game_set.triplets[:2]
    maps = game.explain_triplets(model, trips, "gradient", normalize=game_set.normalize)
    assert maps.shape == (len(trips), *trips[0].mask.shape) and np.isfinite(maps).all()
    metric = game.InpaintingGame(model, normalize=game_set.normalize, step=20)
    metric.update(trips, maps, method="gradient")
    res = metric.compute()
    g = res["methods"]["gradient"]
    assert 0.0 <= g["area"] <= 1.0 and g["n"] == len(trips)
    assert set(g["by_region"]) <= set(REGIONS)
    img = game.plot(res)
    assert img.dtype == np.uint8 and img.shape[2] == 3 and (img < 200).any(axis=2).mean() > 0.01


def test_unreadable_photos_are_skipped_with_their_name(london: tuple[list[dict[str, str]], Path],
                                                       tmp_path: Path) -> None:
    rows, root = london
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    pairs = {}
    for r in rows[:4]:
        pairs.setdefault(r["identity"], {})[r["subset"]] = root / r["path"]
    source = [(p["neutral"], p["smiling"], ident) for ident, p in pairs.items()] + [(bad, bad, "broken")]
    gs = game.make_triplets(source, load_model("dlib-resnet"), regions=("nose",), threshold="genuine")
    assert len(gs.failed) == 1 and "broken.jpg" in gs.failed[0]
    assert {c["identity"] for c in gs.cases} == set(pairs)
    with pytest.raises(ModelError, match="face matcher"):
        game.make_triplets(source, load_model("dlib-gender"))
