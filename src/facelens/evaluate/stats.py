"""The statistics behind every interval facelens reports: one module, so every number is made the same way.

* **Proportions** (hits / trials: accuracy, rank-1, FNMR, a pointing-game hit rate) get a score
  interval that is never of zero width, at 0 and at n included: Wilson by default, Clopper–Pearson on
  request, both from scipy's ``binomtest``. When trials are grouped (photos of one person), the
  interval is widened to the percentile bootstrap over the groups (:func:`rate_interval`).
* **Means and ratios of sums** (AUCs, mean errors, pooled rates) get a percentile bootstrap over
  independent units (:func:`mean_interval`, :func:`ratio_interval`), resampling whole clusters so that
  two photos of one person never count as two independent trials.
* **Differences**: paired (two methods on the same photos, :func:`paired_difference`) by bootstrapping
  the per-unit differences; of two independent proportions by Newcombe's hybrid score interval widened
  to the two-sample cluster bootstrap (:func:`proportion_difference`), so a 28/28 against a 27/28 still
  gets an interval that says how little 28 photos show.
* **Multiplicity**: Bonferroni-adjusted interval levels (:func:`adjusted_level`) for families of
  comparisons, and Holm's step-down p-values (:func:`holm`) beside them.

Written here rather than taken from a library where scipy has no such function: the cluster bootstrap
(scipy's ``bootstrap`` resamples observations, not clusters), Newcombe's interval and Holm's adjustment
(statsmodels has both, but is not worth a dependency for a few lines).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "CI",
    "Estimate",
    "adjusted_level",
    "holm",
    "mean_interval",
    "paired_difference",
    "percentile_interval",
    "proportion_difference",
    "proportion_interval",
    "rate_interval",
    "ratio_interval",
    "resampled_ratios",
    "tail_resamples",
    "wilcoxon_p",
]

CI = 0.95  #: the interval level of every headline number
N_BOOT = 2000  #: bootstrap resamples, enough for stable 95 % percentile bounds
ProportionMethod = Literal["wilson", "clopper-pearson"]
_MAX_DRAWS = 2_000_000


@dataclass(frozen=True)
class Estimate:
    """A value with its interval: ``n`` trials in ``n_clusters`` independent units, at level ``ci``.

    ``trials`` is the weighted trial count when it differs from ``n`` (impostor comparisons shared by two
    people count half for each); ``method`` says how the interval was made.

    Example:
        >>> e = rate_interval([True] * 28)
        >>> (e.value, e.hi, round(e.lo, 3))
        (1.0, 1.0, 0.879)
    """

    value: float
    lo: float
    hi: float
    n: int
    n_clusters: int
    ci: float = CI
    trials: float | None = None
    method: str = "bootstrap"

    def excludes(self, x: float = 0.0) -> bool:
        """Whether the interval lies entirely above or entirely below ``x``."""
        return bool(np.isfinite(self.lo) and np.isfinite(self.hi) and (self.lo > x or self.hi < x))

    @property
    def width(self) -> float:
        return float(self.hi - self.lo)

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.value) and np.isfinite(self.lo) and np.isfinite(self.hi))

    def text(self, digits: int = 3) -> str:
        if not self.finite:
            return f"{self.value:.{digits}f} [no interval]" if np.isfinite(self.value) else "n/a"
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"

    @property
    def bounds(self) -> list[float | None]:
        """``[low, high]`` for JSON: None where there is no bound (NaN is not valid JSON and never equal)."""
        return [_num(self.lo), _num(self.hi)]

    def negated(self) -> Estimate:
        return Estimate(-self.value, -self.hi, -self.lo, self.n, self.n_clusters, self.ci, self.trials, self.method)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form every output uses: value, ``ci: [low, high]``, n and how."""
        out: dict[str, Any] = {"value": _num(self.value), "ci": self.bounds, "n": self.n,
                               "n_units": self.n_clusters, "level": self.ci, "interval": self.method}
        if self.trials is not None:
            out["trials"] = self.trials
        return out


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


# -- bootstrap --------------------------------------------------------------------------------------------
def resampled_ratios(num: np.ndarray, den: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` bootstrap replicates of ``Σ num / Σ den``, drawing units (entries) with replacement."""
    k = len(num)
    if k == 0:
        return np.full(n_boot, np.nan)
    out = np.empty(n_boot)
    step = max(1, _MAX_DRAWS // k)  # bounded memory: at most _MAX_DRAWS indices at a time
    for start in range(0, n_boot, step):
        idx = rng.integers(0, k, size=(min(step, n_boot - start), k))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + len(idx)] = num[idx].sum(1) / den[idx].sum(1)
    return out


def tail_resamples(n_boot: int, ci: float) -> int:
    """Enough resamples for the interval's tails: at least 20 beyond each bound, so a Bonferroni level
    such as 99.9 % is not read off a handful of extreme draws."""
    return max(int(n_boot), math.ceil(40 / max(1.0 - ci, 1e-6))) if n_boot > 0 else 0


def percentile_interval(samples: np.ndarray, ci: float = CI) -> tuple[float, float]:
    """The central ``ci`` percentile interval of the finite replicates (NaN, NaN when there are none)."""
    s = np.asarray(samples, np.float64)
    s = s[np.isfinite(s)]
    if len(s) == 0:
        return float("nan"), float("nan")
    a = (1.0 - ci) / 2
    return float(np.quantile(s, a)), float(np.quantile(s, 1 - a))


def _units(clusters: Sequence[Hashable] | np.ndarray | None, n: int) -> np.ndarray:
    """An integer unit id per entry (each entry its own unit when ``clusters`` is None)."""
    if clusters is None:
        return np.arange(n)
    labels = [str(c) for c in (clusters.tolist() if isinstance(clusters, np.ndarray) else clusters)]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} cluster labels for {n} values")
    _, inv = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    return inv


def _cluster_sums(values: Any, weights: Any, clusters: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-unit ``Σ value·weight`` and ``Σ weight`` over the finite entries, and how many entries were kept."""
    v = np.asarray(values, np.float64).ravel()
    w = np.ones_like(v) if weights is None else np.asarray(weights, np.float64).ravel()
    if len(w) != len(v):
        raise ValueError(f"{len(v)} values and {len(w)} weights")
    units = _units(clusters, len(v))
    ok = np.isfinite(v) & np.isfinite(w)
    v, w, units = v[ok], w[ok], units[ok]
    _, inv = np.unique(units, return_inverse=True)
    return np.bincount(inv, weights=v * w), np.bincount(inv, weights=w), len(v)


def ratio_interval(values: Any, weights: Any = None, clusters: Any = None, *, ci: float = CI, n_boot: int = N_BOOT,
                   seed: int = 0) -> Estimate:
    """``Σ values·weights / Σ weights`` with a percentile bootstrap over clusters (non-finite entries dropped).

    0/1 values give a rate, errors a mean error, per-person rates weighted by their trials a pooled rate.
    """
    num, den, n = _cluster_sums(values, weights, clusters)
    how = "cluster bootstrap" if clusters is not None else "bootstrap"
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, 0, ci, None, how)
    value = float(num.sum() / den.sum()) if den.sum() > 0 else float("nan")
    lo, hi = percentile_interval(resampled_ratios(num, den, tail_resamples(n_boot, ci),
                                                  np.random.default_rng(seed)), ci)
    if len(num) < 2:
        lo = hi = float("nan")  # one unit: no spread to resample
    return Estimate(value, lo, hi, n, len(num), ci, None if weights is None else float(den.sum()), how)


def mean_interval(values: Any, clusters: Any = None, *, ci: float = CI, n_boot: int = N_BOOT,
                  seed: int = 0) -> Estimate:
    """The mean over units: the union of the percentile-bootstrap interval and Student's t interval over
    the units' means (one unit: no interval).

    The percentile bootstrap is too narrow with few units (with 12 photos its 99.7 % interval covers
    far less than that); the t interval (scipy) is the honest one there and the bootstrap the safer one
    for skewed values with many units, so the wider of the two is reported.
    """
    from scipy.stats import t as student_t

    e = ratio_interval(values, None, clusters, ci=ci, n_boot=n_boot, seed=seed)
    num, den, _ = _cluster_sums(values, None, clusters)
    k = len(num)
    if k < 2 or not e.finite:
        return e
    means = num / den
    half = float(student_t.ppf(0.5 + ci / 2, k - 1) * means.std(ddof=1) / math.sqrt(k))
    lo, hi = min(e.lo, e.value - half), max(e.hi, e.value + half)
    return Estimate(e.value, lo, hi, e.n, e.n_clusters, ci, e.trials, f"{e.method} ∪ Student t")


# -- proportions ----------------------------------------------------------------------------------------------
def proportion_interval(k: int, n: int, *, ci: float = CI, method: ProportionMethod = "wilson") -> tuple[float, float]:
    """Score (Wilson) or exact (Clopper–Pearson) interval of ``k / n`` from scipy; never of zero width."""
    from scipy.stats import binomtest

    if n <= 0:
        return float("nan"), float("nan")
    if method not in ("wilson", "clopper-pearson"):
        raise ValueError(f"method must be 'wilson' or 'clopper-pearson', got {method!r}")
    res = binomtest(int(k), int(n)).proportion_ci(confidence_level=ci,
                                                  method="exact" if method == "clopper-pearson" else "wilson")
    return float(res.low), float(res.high)


def rate_interval(hits: Any, clusters: Any = None, *, ci: float = CI, n_boot: int = N_BOOT, seed: int = 0,
                  method: ProportionMethod = "wilson", weights: Any = None) -> Estimate:
    """A proportion with its score interval, widened to the cluster bootstrap when units repeat.

    ``hits`` are 0/1 (or, with ``weights``, per-unit error rates and their trial counts). The score
    interval keeps the width honest at 0 and n; the bootstrap keeps it honest when trials of one
    person are correlated (the union of the two is reported).
    """
    num, den, n = _cluster_sums(hits, weights, clusters)
    trials = float(den.sum())
    if trials <= 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, 0, ci, None, method)
    value = float(num.sum()) / trials
    n_eff = max(1, round(trials))
    lo, hi = proportion_interval(round(value * n_eff), n_eff, ci=ci, method=method)
    how = method
    if (len(num) < n or weights is not None) and len(num) >= 2 and n_boot > 0:
        blo, bhi = percentile_interval(resampled_ratios(num, den, tail_resamples(n_boot, ci),
                                                        np.random.default_rng(seed)), ci)
        if np.isfinite(blo):
            lo, hi = min(lo, blo), max(hi, bhi)
            how = f"{method} ∪ cluster bootstrap"
    return Estimate(value, lo, hi, n, len(num), ci, trials if weights is not None else None, how)


def proportion_difference(hits_a: Any, hits_b: Any, clusters_a: Any = None, clusters_b: Any = None, *,
                          ci: float = CI, n_boot: int = N_BOOT, seed: int = 0,
                          weights_a: Any = None, weights_b: Any = None) -> Estimate:
    """``rate(a) − rate(b)`` for two independent groups: Newcombe's hybrid score interval (method 10),
    widened to the two-sample cluster bootstrap. Never of zero width, even when both rates are 0 or 1."""
    sums_a, sums_b = _cluster_sums(hits_a, weights_a, clusters_a), _cluster_sums(hits_b, weights_b, clusters_b)
    (num_a, den_a, n_a), (num_b, den_b, n_b) = sums_a, sums_b
    units = len(num_a) + len(num_b)
    if not (den_a.sum() > 0 and den_b.sum() > 0):
        return Estimate(float("nan"), float("nan"), float("nan"), n_a + n_b, units, ci)
    pa, pb = float(num_a.sum() / den_a.sum()), float(num_b.sum() / den_b.sum())
    ta, tb = max(1, round(float(den_a.sum()))), max(1, round(float(den_b.sum())))
    la, ua = proportion_interval(round(pa * ta), ta, ci=ci)
    lb, ub = proportion_interval(round(pb * tb), tb, ci=ci)
    d = pa - pb
    lo = d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2)
    hi = d + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)
    how = "Newcombe score"
    clustered = len(num_a) < n_a or len(num_b) < n_b or weights_a is not None or weights_b is not None
    if clustered and len(num_a) >= 2 and len(num_b) >= 2 and n_boot > 0:
        rng = np.random.default_rng(seed)
        draws = tail_resamples(n_boot, ci)
        blo, bhi = percentile_interval(resampled_ratios(num_a, den_a, draws, rng)
                                       - resampled_ratios(num_b, den_b, draws, rng), ci)
        if np.isfinite(blo):
            lo, hi = min(lo, blo), max(hi, bhi)
            how = "Newcombe score ∪ cluster bootstrap"
    return Estimate(d, lo, hi, n_a + n_b, units, ci, None, how)


# -- paired comparisons and multiplicity -------------------------------------------------------------------------
def paired_difference(values_a: Any, values_b: Any, clusters: Any = None, *, ci: float = CI, n_boot: int = N_BOOT,
                      seed: int = 0) -> Estimate:
    """Mean of ``a − b`` over the same units (the pairing is kept), with a cluster-bootstrap interval."""
    a = np.asarray(values_a, np.float64).ravel()
    b = np.asarray(values_b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length: {len(a)} and {len(b)}")
    return mean_interval(a - b, clusters, ci=ci, n_boot=n_boot, seed=seed)


def wilcoxon_p(values_a: Any, values_b: Any) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired values (scipy); 1.0 when every difference is 0."""
    from scipy.stats import wilcoxon

    d = np.asarray(values_a, np.float64).ravel() - np.asarray(values_b, np.float64).ravel()
    d = d[np.isfinite(d)]
    if len(d) == 0 or not np.any(d != 0):
        return 1.0
    return float(wilcoxon(d).pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order."""
    p = np.asarray(pvalues, np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def adjusted_level(ci: float, comparisons: int) -> float:
    """Bonferroni: the interval level that keeps the family-wise coverage at ``ci`` over ``comparisons``."""
    return 1.0 - (1.0 - ci) / max(1, int(comparisons))
