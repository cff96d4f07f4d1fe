"""The statistics module and the verdict rule on known answers."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from facelens.evaluate import stats, verdict
from facelens.evaluate.stats import Estimate


def test_doctests() -> None:
    for module in (stats, verdict):
        assert doctest.testmod(module).failed == 0


@pytest.mark.parametrize("k", [0, 28])
def test_proportions_at_0_and_n_get_a_non_degenerate_interval(k: int) -> None:
    e = stats.rate_interval([1] * k + [0] * (28 - k))
    assert e.value == k / 28 and e.hi - e.lo > 0.1
    assert e.lo <= e.value <= e.hi
    # the closed form of the Wilson bound at k = n: n / (n + z²)
    z2 = 1.959963984540054**2
    if k == 28:
        assert e.lo == pytest.approx(28 / (28 + z2), rel=1e-9) and e.hi == 1.0
    else:
        assert e.lo == 0.0 and e.hi == pytest.approx(z2 / (28 + z2), rel=1e-9)
    cp = stats.proportion_interval(k, 28, method="clopper-pearson")
    assert cp[1] - cp[0] > 0.1  # exact interval, also never of zero width


def test_clustered_trials_widen_the_interval() -> None:
    hits = [1, 1, 1, 1, 0, 0, 0, 0] * 4
    alone = stats.rate_interval(hits)
    by_person = stats.rate_interval(hits, clusters=[f"p{i // 4}" for i in range(len(hits))])  # 4 photos a person
    assert by_person.n_clusters == 8 and alone.n_clusters == 32
    assert by_person.width > alone.width  # persons with all-or-nothing photos: fewer independent units


def test_difference_of_two_perfect_rates_is_not_zero_width() -> None:
    d = stats.proportion_difference([1] * 28, [1] * 28)
    assert d.value == 0.0 and d.lo < -0.05 and d.hi > 0.05
    planted = stats.proportion_difference([1] * 90 + [0] * 10, [1] * 50 + [0] * 50)
    assert planted.lo > 0.2  # a 40-point gap on 100 vs 100 photos is recovered


def test_mean_interval_covers_the_truth_and_one_unit_has_no_interval() -> None:
    rng = np.random.default_rng(0)
    covered = 0
    for i in range(200):
        e = stats.mean_interval(rng.normal(1.0, 1.0, 30), seed=i, n_boot=500)
        covered += e.lo <= 1.0 <= e.hi
    assert 0.88 <= covered / 200 <= 0.99  # a percentile bootstrap at n = 30 covers close to 95%
    one = stats.mean_interval([3.0])
    assert one.value == 3.0 and not one.finite


def test_paired_difference_keeps_the_pairs() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(0, 5, 20)  # large per-photo spread, small constant effect
    d = stats.paired_difference(base - 0.5, base)
    assert d.value == pytest.approx(-0.5) and d.hi < 0
    assert stats.wilcoxon_p(base - 0.5, base) < 0.001
    assert stats.wilcoxon_p(base, base) == 1.0


def test_holm_and_bonferroni() -> None:
    assert stats.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert stats.adjusted_level(0.95, 10) == pytest.approx(0.995)


@pytest.mark.parametrize(("interval", "direction", "status"), [
    ((0.1, 0.3), "below", "supported"), ((0.6, 0.9), "below", "not supported"), ((0.3, 0.6), "below", "inconclusive"),
    ((0.6, 0.9), "above", "supported"), ((0.1, 0.3), "above", "not supported"), ((0.3, 0.6), "above", "inconclusive"),
])
def test_the_rule_reads_the_interval(interval: tuple[float, float], direction: str, status: str) -> None:
    lo, hi = interval
    e = Estimate((lo + hi) / 2, lo, hi, 12, 12)
    v = verdict.decide("claim", e, 0.5, direction=direction)  # type: ignore[arg-type]
    assert v.status == status
    assert "n = 12 photos" in v.sentence() and f"{lo:.3f}" in v.sentence()


def test_too_few_units_no_interval_or_an_illustration_is_inconclusive() -> None:
    strong = Estimate(0.9, 0.85, 0.95, 40, 7)
    assert verdict.decide("x", strong, 0.5).status == "inconclusive"  # 40 photos of 7 people: 7 units
    assert "fewer than 8" in verdict.decide("x", strong, 0.5).reason
    assert verdict.decide("x", Estimate(0.9, float("nan"), float("nan"), 20, 20), 0.5).status == "inconclusive"
    ok = Estimate(0.9, 0.85, 0.95, 20, 20)
    assert verdict.decide("x", ok, 0.5).status == "supported"
    assert verdict.decide("x", ok, 0.5, illustration=True).status == "inconclusive"
    assert verdict.sanity_word(verdict.decide("x", ok, 0.5, direction="below")) == "fail"


def test_few_units_get_at_least_students_t_interval() -> None:
    from scipy.stats import t

    v = np.random.default_rng(3).normal(0.0, 1.0, 6)
    e = stats.mean_interval(v, ci=0.99)
    half = t.ppf(0.995, 5) * v.std(ddof=1) / np.sqrt(6)
    assert e.lo <= v.mean() - half + 1e-12 and e.hi >= v.mean() + half - 1e-12  # the bootstrap alone is narrower
    assert "Student t" in e.method
