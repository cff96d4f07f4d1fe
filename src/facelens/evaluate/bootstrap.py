"""Percentile bootstrap over clusters: the one resampling loop behind every interval of the studies.

A statistic of the form ``Σ numerator / Σ denominator`` over independent units (people, photos) covers
rates (hits / trials), mean errors (errors / photos) and pooled rates; resampling whole units keeps the
correlation between photos of one person inside the interval.
"""

from __future__ import annotations

import numpy as np

__all__ = ["percentile_interval", "resampled_ratios"]


def resampled_ratios(num: np.ndarray, den: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` bootstrap replicates of ``Σ num / Σ den``, drawing units (entries) with replacement."""
    k = len(num)
    if k == 0:
        return np.full(n_boot, np.nan)
    idx = rng.integers(0, k, size=(n_boot, k))
    with np.errstate(invalid="ignore", divide="ignore"):
        return num[idx].sum(1) / den[idx].sum(1)


def percentile_interval(samples: np.ndarray, ci: float = 0.95) -> tuple[float, float]:
    """The central ``ci`` percentile interval of the finite replicates (NaN, NaN when there are none)."""
    s = samples[np.isfinite(samples)]
    if len(s) == 0:
        return float("nan"), float("nan")
    a = (1.0 - ci) / 2
    return float(np.quantile(s, a)), float(np.quantile(s, 1 - a))
