"""Verification rates: TAR at FAR against a brute-force count, resolvability, rank-k."""

from __future__ import annotations

import math

import numpy as np
import pytest

from facelens.evaluate.verification import rank_k, rates_at_threshold, tar_at_far, verification_rates


def _brute_tar_at_far(genuine, impostor, far):
    """Search every candidate threshold: the lowest one whose impostor accept rate is still ≤ far."""
    best = 0.0
    for t in np.unique(np.r_[genuine, impostor, np.inf]):
        if np.mean(impostor > t) <= far:
            best = max(best, float(np.mean(genuine > t)))
    return best


@pytest.mark.parametrize("far", [0.01, 0.05, 0.2])
def test_tar_at_far_matches_a_brute_force_search(far):
    rng = np.random.default_rng(1)
    genuine, impostor = rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 500)
    assert tar_at_far(genuine, impostor, far) == pytest.approx(_brute_tar_at_far(genuine, impostor, far))


def test_unresolvable_far_is_nan_not_a_number_the_data_cannot_support():
    assert math.isnan(tar_at_far(np.ones(10), np.zeros(50), 1e-3))
    r = verification_rates(np.ones(10), np.zeros(50), fars=(1e-2, 1e-3))
    assert r.resolvable == {1e-2: False, 1e-3: False}
    r = verification_rates(np.ones(10), np.zeros(200), fars=(1e-2,))
    assert r.resolvable == {1e-2: True} and r.tar_at_far[1e-2] == 1.0


def test_perfect_and_random_separation():
    rng = np.random.default_rng(2)
    perfect = verification_rates(rng.uniform(2, 3, 100), rng.uniform(0, 1, 1000))
    assert perfect.auc == 1.0 and perfect.eer == 0.0
    same = rng.normal(size=4000)
    chance = verification_rates(same[:2000], same[2000:])
    assert abs(chance.auc - 0.5) < 0.05 and abs(chance.eer - 0.5) < 0.05


def test_rates_at_threshold_and_rank_k():
    tar, far = rates_at_threshold(np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.6]), 0.5)
    assert (tar, far) == (pytest.approx(2 / 3), 0.5)
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    assert rank_k(scores, ["a", "a"], ["a", "b", "c"], k=1) == 0.5
    assert rank_k(scores, ["a", "a"], ["a", "b", "c"], k=2) == 1.0
