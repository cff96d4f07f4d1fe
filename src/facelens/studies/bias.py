"""Demographic bias audit: per-group error rates with intervals, and nothing claimed beyond them.

Groups come from the manifest's labels, exactly as each source gives them: ``sex``, an **age band**
(see :data:`AGE_BANDS`) and ``race`` (``race_or_skin``: London's self-reported ethnicity and UTKFace's
file-name race code use different vocabularies; we keep both as given and compare race groups only
within one dataset), their **intersections** ``sex × race`` and ``sex × age`` (a disparity can live in
a cell that neither margin shows), and an ``all`` row (the overall rate every group is read against).
Race labels are bare (``asian``) when the audited rows' race labels come from one dataset and
qualified by it (``utkface:asian``) otherwise.

The statistics core works on plain arrays so that it can be checked on synthetic data; every interval
comes from :mod:`facelens.evaluate.stats` and every verdict from :func:`facelens.evaluate.verdict.decide`:

- **Proportions** (accuracy, FNMR, FMR) get a Wilson score interval widened to the bootstrap over
  people (:func:`~facelens.evaluate.stats.rate_interval`): never of zero width, so a perfect 28/28 is
  [0.879, 1], not [1, 1]. Differences of two groups' proportions use Newcombe's score interval widened
  to the two-sample bootstrap over people (:func:`~facelens.evaluate.stats.proportion_difference`).
  A cluster is one person: the two London photos of a subject, or the impostor comparisons of one
  subject, are not independent trials. Photos without an identity (UTKFace) are their own cluster (one
  person may recur there, so those intervals may be slightly narrow).
- **Means** (age error, attention shares) get a percentile bootstrap over people
  (:func:`cluster_bootstrap`); a bootstrap that cannot vary (one person, or every value equal) gives
  *no* interval rather than a zero-width one.
- :func:`compare_groups` — every group's estimate and every pairwise difference. Difference intervals
  are Bonferroni-adjusted over the comparisons of one attribute and metric
  (:func:`~facelens.evaluate.stats.adjusted_level`); a difference is **supported only when its interval
  excludes 0**. A group with fewer than :data:`MIN_PEOPLE` people is shown, but every comparison it is
  in is "inconclusive" with that reason. ``planned`` contrasts (``--contrast``) are reported at their
  own level: one pre-specified comparison needs no multiplicity correction.
- :func:`paired_difference` — the same person scored two ways (the probe experiment's balanced vs
  unbalanced head), bootstrapped over clusters with the pairing kept.

The study (:func:`run_bias`, ``facelens audit bias``) measures ``dlib-gender`` accuracy, ``dlib-age``
mean absolute error, ``dlib-resnet`` FNMR and FMR at its one global threshold (pairs within a group),
where the recognizer looks per group (region attention and canonical maps of a cheap explanation), and
the CAM bias study's probe experiment: a logistic-regression head on the embeddings trained to predict
sex from an unbalanced (90/10) and from a balanced training set, compared per group on held-out people.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import re
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..datasets import ManifestRow, read_manifest
from ..errors import FaceLensError
from ..evaluate.stats import (
    Estimate,
    adjusted_level,
    percentile_interval,
    proportion_difference,
    rate_interval,
    resampled_ratios,
)
from ..evaluate.verdict import MIN_N, Verdict, decide
from ..executors import BatchFn, RowFailure, map_rows
from .base import StudyResult, StudySpec, register_study

__all__ = [
    "AGE_BANDS",
    "ATTRIBUTES",
    "AUDITED",
    "CROSS",
    "INTERSECTIONS",
    "MIN_PEOPLE",
    "Estimate",
    "GroupComparison",
    "GroupDifference",
    "GroupEstimate",
    "ProbeResult",
    "age_band",
    "audit_predictions",
    "cluster_bootstrap",
    "compare_groups",
    "group_of",
    "judge_difference",
    "paired_difference",
    "probe_experiment",
    "race_qualified",
    "resolve_contrast",
    "run_bias",
]

#: Age bands (inclusive years). Children are a band of their own because their faces differ in shape;
#: 65+ is one band because few photos are older and dlib-age's top bin is 80.
AGE_BANDS: tuple[tuple[str, int, int], ...] = (
    ("0-14", 0, 14), ("15-24", 15, 24), ("25-34", 25, 34), ("35-49", 35, 49), ("50-64", 50, 64), ("65+", 65, 10**6),
)
ATTRIBUTES: tuple[str, ...] = ("sex", "age", "race")
#: How the parts of an intersectional group are joined, in attribute and group names alike.
CROSS = " × "
INTERSECTIONS: tuple[str, ...] = (f"sex{CROSS}race", f"sex{CROSS}age")
#: Everything the study reports, in order: the overall row, the margins, the intersections.
AUDITED: tuple[str, ...] = ("all", *ATTRIBUTES, *INTERSECTIONS)
#: The fewest people a group needs before any difference it is in is decided (smaller groups are shown,
#: and their comparisons are "inconclusive"): a bootstrap over a handful of people under-covers.
MIN_PEOPLE = 10

Kind = Literal["auto", "proportion", "mean"]


def age_band(age: int | float | None) -> str | None:
    """The :data:`AGE_BANDS` label of an age in years (None when unknown)."""
    if age is None or not np.isfinite(age):
        return None
    for name, lo, hi in AGE_BANDS:
        if lo <= age <= hi:
            return name
    return None


def group_of(row: ManifestRow, attribute: str, *, qualify: bool = True) -> str | None:
    """A photo's group for ``all``, ``sex``, ``age`` (band), ``race`` or an intersection, None when unlabelled.

    Race is ``"<dataset>:<label>"`` with ``qualify`` (the default): each source labels race in its own
    vocabulary and photographs people in its own way (studio photos in London, web crops in UTKFace), so
    race groups are compared only within one source; comparing across sources would measure the sources.
    Pass ``qualify=False`` when every race label comes from one dataset (:func:`race_qualified`).
    An intersection such as ``"sex × race"`` joins its parts with :data:`CROSS` (``"female × asian"``)
    and is None when any part is unlabelled.
    """
    if attribute == "all":
        return "all"
    if CROSS.strip() in attribute:
        parts = [group_of(row, a.strip(), qualify=qualify) for a in attribute.split(CROSS.strip())]
        return None if any(p is None for p in parts) else CROSS.join(str(p) for p in parts)
    if attribute == "sex":
        return row.sex
    if attribute == "age":
        return age_band(row.age)
    if attribute == "race":
        if not row.race:
            return None
        return f"{row.dataset}:{row.race}" if row.dataset and qualify else row.race
    raise FaceLensError(f"unknown attribute {attribute!r}; use one of {', '.join(AUDITED)}")


def race_qualified(rows: Sequence[ManifestRow]) -> bool:
    """Whether race labels need their dataset in group names: yes when they come from more than one dataset."""
    return len({r.dataset for r in rows if r.race}) > 1


def cluster_of(row: ManifestRow) -> str:
    """The resampling unit: the person when the manifest names one, else the photo itself."""
    return f"{row.dataset}:{row.identity}" if row.identity else str(row.path)


# -- statistics core -------------------------------------------------------------------------------------
def _prepare(values: Any, weights: Any, clusters: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    v = np.asarray(values, np.float64).ravel()
    w = np.ones_like(v) if weights is None else np.asarray(weights, np.float64).ravel()
    c = np.arange(len(v)) if clusters is None else np.asarray(clusters, dtype=object).ravel()
    if not len(v) == len(w) == len(c):
        raise FaceLensError(f"values ({len(v)}), weights ({len(w)}) and clusters ({len(c)}) differ in length")
    ok = np.isfinite(v) & np.isfinite(w)
    return v[ok], w[ok], c[ok]


def _cluster_totals(v: np.ndarray, w: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, inv = np.unique(c.astype(str), return_inverse=True)
    return np.bincount(inv, weights=v * w), np.bincount(inv, weights=w)


def cluster_bootstrap(values: Any, weights: Any = None, clusters: Any = None, *, n_boot: int = 2000,
                      ci: float = 0.95, seed: int = 0) -> Estimate:
    """``Σ values·weights / Σ weights`` with a percentile-bootstrap interval over clusters.

    With errors this is a mean error; with ``values`` = per-person error rates and ``weights`` = their
    trial counts it is a pooled rate. ``clusters`` (one label per value) is the resampling unit; None
    resamples values independently. For proportions prefer :func:`~facelens.evaluate.stats.rate_interval`,
    whose interval is never of zero width.
    """
    v, w, c = _prepare(values, weights, clusters)
    num, den = _cluster_totals(v, w, c)
    value = float(num.sum() / den.sum()) if den.sum() > 0 else float("nan")
    lo, hi = percentile_interval(resampled_ratios(num, den, n_boot, np.random.default_rng(seed)), ci)
    return Estimate(value, lo, hi, len(v), len(num), ci, None if weights is None else float(w.sum()),
                    "cluster bootstrap" if clusters is not None else "bootstrap")


def paired_difference(values_a: Any, values_b: Any, clusters: Any = None, *, n_boot: int = 2000, ci: float = 0.95,
                      seed: int = 0) -> Estimate:
    """Mean of ``a − b`` over the same trials, bootstrapped over clusters (the pairing is kept)."""
    a = np.asarray(values_a, np.float64).ravel()
    b = np.asarray(values_b, np.float64).ravel()
    if a.shape != b.shape:
        raise FaceLensError(f"paired values differ in length: {len(a)} and {len(b)}")
    return cluster_bootstrap(a - b, None, clusters, n_boot=n_boot, ci=ci, seed=seed)


def _no_interval(e: Estimate, why: str) -> Estimate:
    """``e`` without its interval: a bootstrap that could not vary bounds nothing, so none is reported."""
    return Estimate(e.value, float("nan"), float("nan"), e.n, e.n_clusters, e.ci, e.trials, f"no interval: {why}")


@dataclass(frozen=True)
class GroupEstimate:
    group: str
    estimate: Estimate


def _n_text(e: Estimate) -> str:
    return f"{round(e.trials)} comparisons" if e.trials is not None else f"{e.n} photos"


def _describe(name: str, e: Estimate) -> str:
    return f"{name} {e.text()} (n={_n_text(e)}, {e.n_clusters} people)"


def judge_difference(metric: str, attribute: str, a: str, ea: Estimate, b: str, eb: Estimate, diff: Estimate, *,
                     higher_is_better: bool = True, min_people: int = MIN_PEOPLE) -> Verdict:
    """The verdict on "``a`` differs from ``b``" in the direction the data point, by the one rule.

    Below ``min_people`` in either group the difference is "inconclusive" whatever its interval (the
    rule's minimum-n clause, applied per group); otherwise :func:`~facelens.evaluate.verdict.decide`
    reads the interval against 0, so a difference is supported only when the interval excludes 0.
    """
    value = diff.value
    direction: Literal["above", "below"] = "below" if np.isfinite(value) and value < 0 else "above"
    if np.isfinite(value) and value != 0:
        word = "is better than" if (value > 0) == higher_is_better else "is worse than"
    else:
        word = "differs from"
    claim = f"{metric} by {attribute}: {_describe(a, ea)} {word} {_describe(b, eb)}; difference {a} − {b}"
    small = [(g, e.n_clusters) for g, e in ((a, ea), (b, eb)) if e.n_clusters < min_people]
    if small:
        why = "; ".join(f"{g} has {k} {'person' if k == 1 else 'people'}" for g, k in small)
        return Verdict(claim, "inconclusive", diff, 0.0, direction,
                       f"{why}, fewer than the {min_people} a group needs to be compared", min_people, "people")
    if not diff.finite and diff.method.startswith("no interval"):
        why = diff.method.replace("no interval: ", "the data give no interval: ")
        return Verdict(claim, "inconclusive", diff, 0.0, direction, why, min_people, "people")
    return decide(claim, diff, 0.0, direction=direction, min_n=MIN_N, unit="people")


@dataclass(frozen=True)
class GroupDifference:
    """``a − b`` with its (adjusted) interval and the verdict on it; ``supported`` only by the rule.

    ``degenerate`` marks a mean whose bootstrap never varied in a group (one person, or every value the
    same): it gets no interval, so the verdict is "inconclusive" and no difference is claimed.
    """

    a: str
    b: str
    estimate: Estimate
    degenerate: bool = False
    verdict: Verdict | None = None

    @property
    def supported(self) -> bool:
        if self.verdict is not None:
            return self.verdict.supported
        return self.estimate.excludes(0.0) and not self.degenerate

    @property
    def status(self) -> str:
        if self.verdict is not None:
            return self.verdict.status
        return "supported" if self.supported else "inconclusive"


@dataclass
class GroupComparison:
    """Per-group estimates of one metric over one attribute, every pairwise difference and any planned contrast."""

    metric: str
    attribute: str
    groups: list[GroupEstimate]
    differences: list[GroupDifference]
    higher_is_better: bool = True
    ci: float = 0.95
    difference_ci: float = 0.95
    excluded: dict[str, int] = field(default_factory=dict)  # groups below the minimum: their people
    kind: str = "mean"
    min_people: int = MIN_PEOPLE
    tested: int = 0  # comparisons in the Bonferroni family (pairs of groups both at the minimum, × family)
    contrasts: list[GroupDifference] = field(default_factory=list)
    contrast_ci: float = 0.95

    def group(self, name: str) -> Estimate:
        for g in self.groups:
            if g.group == name:
                return g.estimate
        raise KeyError(name)

    def _judge(self, a: str, b: str, e: Estimate) -> Verdict:
        return judge_difference(self.metric, self.attribute, a, self.group(a), b, self.group(b), e,
                                higher_is_better=self.higher_is_better, min_people=self.min_people)

    def difference(self, a: str, b: str) -> GroupDifference:
        for d in (*self.differences, *self.contrasts):
            if (d.a, d.b) == (a, b):
                return d
            if (d.b, d.a) == (a, b):
                e = d.estimate.negated()
                return GroupDifference(a, b, e, d.degenerate, self._judge(a, b, e))
        raise KeyError((a, b))

    def group_rows(self) -> list[dict[str, Any]]:
        rows = []
        for g in self.groups:
            e = g.estimate
            small = e.n_clusters < self.min_people
            rows.append({"metric": self.metric, "attribute": self.attribute, "group": g.group, "value": e.value,
                         "ci_low": e.lo, "ci_high": e.hi, "ci_level": e.ci, "interval": e.method,
                         "n": round(e.trials) if e.trials is not None else e.n,
                         "n_unit": "comparisons" if e.trials is not None else "photos", "n_people": e.n_clusters,
                         "compared": not small,
                         "note": (f"fewer than {self.min_people} people: shown, its comparisons inconclusive"
                                  if small else "")})
        return rows

    def _difference_row(self, d: GroupDifference, level: float) -> dict[str, Any]:
        return {"metric": self.metric, "attribute": self.attribute, "a": d.a, "b": d.b,
                "difference_a_minus_b": d.estimate.value, "ci_low": d.estimate.lo, "ci_high": d.estimate.hi,
                "ci_level": round(level, 5), "interval": d.estimate.method, "degenerate": d.degenerate,
                "supported": d.supported, "status": d.status, "reason": d.verdict.reason if d.verdict else ""}

    def difference_rows(self) -> list[dict[str, Any]]:
        return [self._difference_row(d, self.difference_ci) for d in self.differences]

    def contrast_rows(self) -> list[dict[str, Any]]:
        return [self._difference_row(d, self.contrast_ci) for d in self.contrasts]

    def verdicts(self) -> list[str]:
        """Sentences built from each difference's :class:`Verdict`: the supported ones, then what stayed open."""
        if self.attribute == "all" or (len(self.groups) == 1 and not self.differences):
            return []  # an overall estimate, no comparison: nothing to decide
        head = f"{self.metric} by {self.attribute}"
        adj = (f"; level Bonferroni-adjusted over {self.tested} comparisons" if self.tested > 1 else "")
        out = [f"{d.verdict.sentence()[:-1]}{adj}." for d in self.differences if d.supported and d.verdict]
        if self.excluded:
            out.append(f"{head}: inconclusive for every comparison of "
                       + ", ".join(f"{g} ({k} {'person' if k == 1 else 'people'})" for g, k in self.excluded.items())
                       + f": fewer than the {self.min_people} people a group needs to be compared "
                       "(shown, not decided).")
        decided = [d for d in self.differences if d.verdict is not None and d.a not in self.excluded
                   and d.b not in self.excluded]
        if decided and not any(d.supported for d in decided):
            big = max(decided, key=lambda d: abs(d.estimate.value) if np.isfinite(d.estimate.value) else -1.0)
            gap = big.verdict.sentence()[:-1] if big.verdict is not None else big.estimate.text()
            out.append(f"{head}: no difference is supported; all {len(decided)} comparisons are inconclusive (every "
                       f"interval contains 0 or none could be made), which does not show the groups are equal. "
                       f"Largest observed gap — {gap}{adj}.")
        if not self.differences:
            out.append(f"{head}: fewer than two groups to compare (groups: "
                       + ("; ".join(_describe(g.group, g.estimate) for g in self.groups) or "none") + ").")
        return out


def _is_binary(v: np.ndarray) -> bool:
    return bool(len(v) and np.all((v == 0) | (v == 1)))


def compare_groups(values: Any, groups: Any, *, weights: Any = None, clusters: Any = None, metric: str = "metric",
                   attribute: str = "group", higher_is_better: bool = True, n_boot: int = 2000, ci: float = 0.95,
                   seed: int = 0, adjust: str = "bonferroni", family: int = 1, min_clusters: int = MIN_PEOPLE,
                   comparable: Callable[[str, str], bool] | None = None, kind: Kind = "auto",
                   planned: Sequence[tuple[str, str]] = (), planned_ci: float = 0.95) -> GroupComparison:
    """Each group's estimate and every pairwise difference, each with its interval and verdict.

    ``kind="proportion"`` (0/1 ``values``, or per-person rates with their trial counts as ``weights``):
    Wilson intervals widened to the person bootstrap, Newcombe differences; ``"mean"``: percentile
    bootstrap over ``clusters``; ``"auto"``: proportion when there are no weights and every value is 0
    or 1. Groups with fewer than ``min_clusters`` people are shown and compared, but every comparison
    they are in is "inconclusive" (listed in ``excluded``; not counted in the Bonferroni family).
    ``comparable(a, b)`` restricts which pairs are compared (race groups of one dataset only).
    ``adjust="bonferroni"`` sets the difference level to ``1 − (1−ci)/m`` for ``m`` comparisons (decided
    pairs × ``family``, the number of metrics tested together); ``"none"`` keeps ``ci``. ``planned``
    pairs (groups absent from the data are skipped) are reported in ``contrasts`` at ``planned_ci``.
    """
    if adjust not in ("bonferroni", "none"):
        raise FaceLensError(f"adjust must be 'bonferroni' or 'none', got {adjust!r}")
    v, w, c = _prepare(values, weights, clusters)
    g_all = np.asarray(groups, dtype=object).ravel()
    if len(g_all) != len(np.asarray(values).ravel()):
        raise FaceLensError(f"{len(g_all)} group labels for {len(np.asarray(values).ravel())} values")
    ok = np.isfinite(np.asarray(values, np.float64).ravel())
    if weights is not None:
        ok &= np.isfinite(np.asarray(weights, np.float64).ravel())
    g = g_all[ok]
    keep = np.array([x is not None and x == x and str(x) != "" for x in g], bool)
    v, w, c, g = v[keep], w[keep], c[keep], g[keep].astype(str)
    if kind == "auto":
        kind = "proportion" if weights is None and _is_binary(v) else "mean"
    if kind not in ("proportion", "mean"):
        raise FaceLensError(f"kind must be 'auto', 'proportion' or 'mean', got {kind!r}")
    wts = weights is not None
    names = sorted(set(g))
    masks = {name: g == name for name in names}
    boots: dict[str, np.ndarray] = {}
    estimates: list[GroupEstimate] = []
    excluded: dict[str, int] = {}
    for k, name in enumerate(names):
        m = masks[name]
        if kind == "proportion":
            e = rate_interval(v[m], c[m], ci=ci, n_boot=n_boot, seed=seed + k, weights=w[m] if wts else None)
        else:
            num, den = _cluster_totals(v[m], w[m], c[m])
            boots[name] = resampled_ratios(num, den, n_boot, np.random.default_rng(seed + k))
            lo, hi = percentile_interval(boots[name], ci)
            value = float(num.sum() / den.sum()) if den.sum() > 0 else float("nan")
            e = Estimate(value, lo, hi, int(m.sum()), len(num), ci, float(den.sum()) if wts else None,
                         "cluster bootstrap")
            if len(num) < 2:
                e = _no_interval(e, "one person, nothing to resample")
            elif not hi > lo:
                e = _no_interval(e, "every resample gave the same value")
        estimates.append(GroupEstimate(name, e))
        if e.n_clusters < min_clusters:
            excluded[name] = e.n_clusters
    by_name = {x.group: x.estimate for x in estimates}
    pairs = [(a, b) for a, b in itertools.combinations(names, 2) if comparable is None or comparable(a, b)]
    decided = [p for p in pairs if p[0] not in excluded and p[1] not in excluded]
    tested = max(len(decided), 1) * max(int(family), 1) if adjust == "bonferroni" else 1
    dci = adjusted_level(ci, tested)

    def diff(a: str, b: str, level: float, s: int) -> GroupDifference:
        ea, eb = by_name[a], by_name[b]
        ma, mb = masks[a], masks[b]
        if kind == "proportion":
            e = proportion_difference(v[ma], v[mb], c[ma], c[mb], ci=level, n_boot=n_boot, seed=s,
                                      weights_a=w[ma] if wts else None, weights_b=w[mb] if wts else None)
            degenerate = False
        else:
            lo, hi = percentile_interval(boots[a] - boots[b], level)
            e = Estimate(ea.value - eb.value, lo, hi, ea.n + eb.n, ea.n_clusters + eb.n_clusters, level, None,
                         "cluster bootstrap (two-sample)")
            degenerate = not (ea.finite and eb.finite)
            if degenerate:
                e = _no_interval(e, "a group's bootstrap cannot vary (one person, or every value the same)")
        verdict = judge_difference(metric, attribute, a, ea, b, eb, e, higher_is_better=higher_is_better,
                                   min_people=min_clusters)
        return GroupDifference(a, b, e, degenerate, verdict)

    diffs = [diff(a, b, dci, seed + 1000 + i) for i, (a, b) in enumerate(pairs)]
    contrasts = [diff(a, b, planned_ci, seed + 5000 + i) for i, (a, b) in enumerate(planned)
                 if a in by_name and b in by_name]
    return GroupComparison(metric, attribute, estimates, diffs, higher_is_better, ci, dci, excluded, kind,
                           min_clusters, tested if adjust == "bonferroni" else 1, contrasts, planned_ci)


def audit_predictions(predictions: Any, labels: Any, groups: Any, clusters: Any = None, *,
                      attribute: str = "group", metric: str = "accuracy", **options: Any) -> GroupComparison:
    """Per-group accuracy of ``predictions`` against ``labels`` (a proportion), with intervals and differences."""
    p = np.asarray(predictions, dtype=object).ravel()
    y = np.asarray(labels, dtype=object).ravel()
    if p.shape != y.shape:
        raise FaceLensError(f"{len(p)} predictions for {len(y)} labels")
    correct = np.array([a == b for a, b in zip(p, y, strict=True)], np.float64)
    options.setdefault("kind", "proportion")
    return compare_groups(correct, groups, clusters=clusters, metric=metric, attribute=attribute, **options)


# -- probe experiment --------------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    """Per-group held-out accuracy of sex probes trained on balanced and unbalanced sets."""

    attribute: str
    majority: str
    groups: list[str]
    train_size: int
    repeats: int
    test: dict[str, dict[str, Estimate]]  # design -> group -> accuracy
    differences: dict[str, Estimate]  # group -> balanced − unbalanced (paired)
    train_counts: dict[str, dict[str, int]]  # design -> group -> photos per training set
    n_test: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for design, per in self.test.items():
            for grp, e in per.items():
                out.append({"design": design, "group": grp, "accuracy": e.value, "ci_low": e.lo, "ci_high": e.hi,
                            "n_test": e.n, "n_test_people": e.n_clusters,
                            "n_train_per_set": self.train_counts[design].get(grp, 0)})
        return out

    def difference_rows(self) -> list[dict[str, Any]]:
        rows = []
        for g, e in self.differences.items():
            v = self.verdict(g)
            rows.append({"group": g, "balanced_minus_unbalanced": e.value, "ci_low": e.lo, "ci_high": e.hi,
                         "ci_level": round(e.ci, 5), "interval": e.method, "n_test": e.n,
                         "n_test_people": e.n_clusters, "supported": v.supported, "status": v.status,
                         "reason": v.reason})
        return rows

    def verdict(self, g: str) -> Verdict:
        """The rule applied to "balancing the training set changes group ``g``'s accuracy" (sign from the data)."""
        e = self.differences[g]
        ub, b = self.test["unbalanced"][g], self.test["balanced"][g]
        word = "lowers" if np.isfinite(e.value) and e.value < 0 else "raises"
        claim = (f"Probe (sex from embeddings), {self.attribute} {g} (n={e.n} held-out photos): unbalanced "
                 f"{ub.text()}, balanced {b.text()}; balancing the training set {word} its accuracy "
                 f"(paired difference balanced − unbalanced)")
        if not e.finite and e.method.startswith("no interval"):
            return Verdict(claim, "inconclusive", e, 0.0, "above", e.method.replace("no interval: ",
                           "the data give no interval: "), MIN_N, "people")
        return decide(claim, e, 0.0, direction="below" if word == "lowers" else "above", unit="people")

    def verdicts(self) -> list[str]:
        return [self.verdict(g).sentence() for g in self.differences]


def probe_experiment(embeddings: np.ndarray, sex: Sequence[str], groups: Sequence[str | None],
                     clusters: Sequence[Hashable], *, attribute: str = "race", majority_share: float = 0.9,
                     test_share: float = 0.3, min_people: int = 20, repeats: int = 20, n_boot: int = 2000,
                     ci: float = 0.95, seed: int = 0, majority: str | None = None) -> ProbeResult:
    """Train a logistic-regression sex probe on an unbalanced and on a balanced training set; test per group.

    Design (after the CAM bias study): groups with at least ``min_people`` people take part; people
    (clusters) are split into train and test per group (``test_share`` of each group's people held
    out, so no person is on both sides). Both training sets have the same size ``N`` and a 50/50 sex
    ratio within each group: *unbalanced* draws ``majority_share`` of ``N`` from the largest group and
    the rest evenly from the others; *balanced* draws ``N/G`` from each of the ``G`` groups. ``N`` is
    the largest size the training pool supports for both designs (``majority`` names the over-represented
    group; default: the one with the most training photos). Each design is drawn ``repeats`` times
    (different photos each time); a held-out photo's score is its share of correct answers over the
    repeats (a proportion over photos: Wilson interval, widened to the person bootstrap), and the
    balanced − unbalanced difference per group is bootstrapped over held-out people with the pairing
    kept (Bonferroni over the groups); a difference that never varies gets no interval, not [0, 0].
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(embeddings, np.float64)
    s = np.asarray(sex, dtype=object)
    grp = np.asarray([g if g else "" for g in groups], dtype=object)
    cl = np.asarray([str(c) for c in clusters], dtype=object)
    usable = np.isin(s, ["female", "male"]) & (grp != "")
    people_per_group = {g: len(set(cl[usable & (grp == g)])) for g in sorted(set(grp[usable]))}
    kept = sorted(g for g, n in people_per_group.items() if n >= min_people)
    notes = [f"{attribute} {g}: {n} people, fewer than {min_people}: not in the probe experiment"
             for g, n in people_per_group.items() if g not in kept]
    if len(kept) < 2:
        raise FaceLensError(f"the probe experiment needs two {attribute} groups with ≥{min_people} people; "
                            f"the data have {people_per_group}")
    rng = np.random.default_rng(seed)
    train_idx: dict[str, dict[str, np.ndarray]] = {}  # group -> sex -> photo indices
    test_mask = np.zeros(len(x), bool)
    for g in kept:
        people = np.array(sorted(set(cl[usable & (grp == g)])), dtype=object)
        rng.shuffle(people)
        n_test = max(1, round(test_share * len(people)))
        test_people = set(people[:n_test])
        in_g = usable & (grp == g)
        is_test = np.array([c in test_people for c in cl], bool)
        test_mask |= in_g & is_test
        train_idx[g] = {sx: np.flatnonzero(in_g & ~is_test & (s == sx)) for sx in ("female", "male")}
    if majority is None:
        majority = max(kept, key=lambda g: sum(len(v) for v in train_idx[g].values()))
    elif majority not in kept:
        raise FaceLensError(f"majority group {majority!r} is not among the probe's groups {kept}")
    minorities = [g for g in kept if g != majority]
    cap = {g: 2 * min(len(train_idx[g]["female"]), len(train_idx[g]["male"])) for g in kept}  # sex-balanced
    # largest N with: balanced N/G ≤ cap[g] for all g; unbalanced share·N ≤ cap[majority], (1−share)N/(G−1) ≤ cap[m]
    G = len(kept)
    limits = [G * min(cap.values()), cap[majority] / majority_share]
    limits += [cap[m] * (G - 1) / (1 - majority_share) for m in minorities] if majority_share < 1 else []
    n_train = int(np.floor(min(limits) / (2 * G))) * 2 * G  # divisible so per-group, per-sex counts are whole
    if n_train < 2 * G:
        raise FaceLensError(f"too few training photos for a sex-balanced probe per {attribute} group: {cap}")
    counts = {"balanced": {g: n_train // G for g in kept}}
    per_minor = round((1 - majority_share) * n_train / (G - 1) / 2) * 2
    while n_train - per_minor * (G - 1) > cap[majority]:
        per_minor += 2
    if per_minor > min(cap[m] for m in minorities):
        raise FaceLensError(f"cannot build a {majority_share:.0%} {majority} training set of {n_train}: {cap}")
    counts["unbalanced"] = {majority: n_train - per_minor * (G - 1), **{m: per_minor for m in minorities}}
    test_ix = np.flatnonzero(test_mask)
    correct = {d: np.zeros(len(test_ix)) for d in counts}
    for design, per_group in counts.items():
        for _ in range(repeats):
            pick = []
            for g, k in per_group.items():
                for sx in ("female", "male"):
                    pick.append(rng.choice(train_idx[g][sx], size=k // 2, replace=False))
            ix = np.concatenate(pick)
            head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            head.fit(x[ix], s[ix].astype(str))
            correct[design] += head.predict(x[test_ix]) == s[test_ix].astype(str)
        correct[design] /= repeats
    test: dict[str, dict[str, Estimate]] = {d: {} for d in counts}
    diffs: dict[str, Estimate] = {}
    dci = adjusted_level(ci, len(kept))
    for k, g in enumerate(kept):
        m = grp[test_ix] == g
        for design in counts:
            # a held-out photo scores its share of correct answers over the repeats: a proportion over photos
            test[design][g] = rate_interval(correct[design][m], cl[test_ix][m], n_boot=n_boot, ci=ci, seed=seed + k)
        d = paired_difference(correct["balanced"][m], correct["unbalanced"][m], cl[test_ix][m],
                              n_boot=n_boot, ci=dci, seed=seed + 100 + k)
        if d.finite and not d.hi > d.lo:  # both heads answered alike on every photo: the bootstrap cannot vary
            d = _no_interval(d, "the two training sets gave the same answers on every held-out photo")
        diffs[g] = d
    return ProbeResult(attribute, majority, kept, n_train, repeats, test, diffs, counts,
                       {g: int((grp[test_ix] == g).sum()) for g in kept}, notes)


# -- per-photo work (map) ----------------------------------------------------------------------------------
class _BiasWorker:
    """Detects each face once and runs the gender, age and recognition models on their own chips."""

    def __init__(self, gender_model: str | None, age_model: str | None, embed_model: str | None) -> None:
        from ..models import load_model

        self.models = {k: load_model(n) for k, n in
                       (("gender", gender_model), ("age", age_model), ("embedding", embed_model)) if n}

    def __call__(self, rows: list[ManifestRow]) -> list[dict[str, Any] | RowFailure]:
        import torch

        from ..faces.detect import pick_face
        from ..image import load_image
        from ..models.dlib_age_gender import expected_age

        out: list[dict[str, Any] | RowFailure] = []
        for row in rows:
            try:
                img = load_image(row.path)
                face = pick_face(img, source=str(row.path))
                rec: dict[str, Any] = {}
                for key, model in self.models.items():
                    logits = model.forward_chips(model.chip(img, face))[0]
                    if key == "embedding":
                        rec[key] = logits.astype(np.float32)
                        continue
                    probs = torch.softmax(torch.from_numpy(logits).double(), 0).numpy()
                    if key == "age":
                        rec["age"] = expected_age(probs)
                    else:
                        rec["gender"] = model.class_names[int(np.argmax(probs))]  # type: ignore[index]
                        rec["gender_p"] = float(probs.max())
                out.append(rec)
            except FaceLensError as exc:
                out.append(RowFailure(str(row.path), str(exc)))
        return out


def _make_bias_worker(gender_model: str | None, age_model: str | None, embed_model: str | None) -> BatchFn:
    return _BiasWorker(gender_model, age_model, embed_model)


class _AttentionWorker:
    """Explains each face with a cheap method; returns region shares and its canonical-face map."""

    def __init__(self, model_name: str, method: str) -> None:
        from ..models import load_model

        self.model = load_model(model_name)
        self.method = method

    def __call__(self, rows: list[ManifestRow]) -> list[dict[str, Any] | RowFailure]:
        from ..explain.api import explain
        from ..explain.face import CanonicalMapAccumulator

        out: list[dict[str, Any] | RowFailure] = []
        for row in rows:
            try:
                e = explain(self.model, row.path, self.method)
                mass = e.region_attention().mass
                shares = {r: float(sum(mass.get(n, 0.0) for n in _ATTENTION_REGIONS[r])) for r in _ATTENTION_REGIONS}
                acc = CanonicalMapAccumulator()
                acc.update(e)
                out.append({"shares": shares, "canonical": acc})
            except FaceLensError as exc:
                out.append(RowFailure(str(row.path), str(exc)))
        return out


_ATTENTION_REGIONS: dict[str, tuple[str, ...]] = {
    "eyes": ("left_eye", "right_eye"), "brows": ("left_brow", "right_brow"), "nose": ("nose",),
    "mouth": ("mouth",), "cheeks": ("left_cheek", "right_cheek"), "forehead": ("forehead",),
    "chin_jaw": ("chin_jaw",), "outside_face": ("hair_background", "neck_clothing"),
}


def _make_attention_worker(model_name: str, method: str) -> BatchFn:
    return _AttentionWorker(model_name, method)


# -- the study ---------------------------------------------------------------------------------------------
def _verification_trials(rows: list[ManifestRow], emb: np.ndarray, threshold: float
                         ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per person: [errors, trials] for genuine pairs (false non-matches) and impostor pairs (false matches).

    An impostor pair counts half for each of its two people, so each person's FMR is over their own
    comparisons, the pooled ratio equals the pair-level FMR and the trials add up to the number of pairs.
    """
    from ..matching import pairwise_scores

    s = pairwise_scores(emb, emb, "l2")
    thr = -float(threshold)
    people = [cluster_of(r) for r in rows]
    gen: dict[str, list[float]] = {}
    imp: dict[str, list[float]] = {}
    for i, j in itertools.combinations(range(len(rows)), 2):
        accept = s[i, j] >= thr
        if people[i] == people[j]:
            rec = gen.setdefault(people[i], [0.0, 0.0])
            rec[0] += float(not accept)
            rec[1] += 1
        else:
            for p in (people[i], people[j]):  # half a comparison each: trials add up to the pair count
                rec = imp.setdefault(p, [0.0, 0.0])
                rec[0] += 0.5 * float(accept)
                rec[1] += 0.5
    return gen, imp


def _rate_comparison(per_person: dict[str, list[float]], attribute: str, metric: str, opts: dict[str, Any],
                     pair_groups: Callable[[str], str | None]) -> GroupComparison:
    """FNMR or FMR per group: each person's error rate weighted by their trial count (a pooled proportion)."""
    keys = sorted(per_person)
    err = np.array([per_person[k][0] for k in keys])
    tri = np.array([per_person[k][1] for k in keys])
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(tri > 0, err / np.where(tri > 0, tri, 1.0), np.nan)  # trials may be halves: no floor at 1
    return compare_groups(rate, [pair_groups(k) for k in keys], weights=tri, clusters=keys, metric=metric,
                          attribute=attribute, higher_is_better=False, kind="proportion", **opts)


def _source(name: str) -> str | None:
    """The dataset a group's race label is qualified by (None when the name carries none)."""
    for part in name.split(CROSS):
        if ":" in part:
            return part.split(":", 1)[0]
    return None


def _same_source(a: str, b: str) -> bool:
    """Race groups, alone or in an intersection, are compared only within one dataset (see :func:`group_of`)."""
    return _source(a) == _source(b)


def _parts(name: str) -> list[str]:
    """A group name's parts, lower-cased and sorted, so ``asian x male`` finds ``male × asian``."""
    return sorted(p.strip().lower() for p in re.split(r"\s+[x×*]\s+|\s*[×*]\s*", name.strip()) if p.strip())


def _bare(part: str) -> str:
    return part.split(":", 1)[1] if ":" in part else part


def resolve_contrast(a: str, b: str, names: dict[str, Sequence[str]]) -> tuple[str, str, str]:
    """The attribute and the exact group names of a planned contrast ``a`` vs ``b``.

    ``names`` maps each attribute to its group names. A name may use ``×``, ``x`` or ``*`` between its
    parts, in any order, and may leave out the dataset of a race label when only one dataset has it.
    Race groups of different datasets are never compared (:func:`group_of`).
    """
    for attr in (*INTERSECTIONS, *ATTRIBUTES):
        have = list(names.get(attr, ()))
        found = []
        for want in (a, b):
            wp = _parts(want)
            exact = [g for g in have if _parts(g) == wp]
            loose = [g for g in have if sorted(_bare(p) for p in _parts(g)) == sorted(_bare(p) for p in wp)]
            found.append(exact or loose)
        if not all(found):
            continue
        if len(found[0]) == 1 or len(found[1]) == 1:  # a bare label in several datasets: take the other's dataset
            one = found[0] if len(found[0]) == 1 else found[1]
            found = [[g for g in f if _same_source(g, one[0])] or f for f in found]
        if any(len(f) > 1 for f in found):
            raise FaceLensError(f"contrast {a!r} vs {b!r} is ambiguous in {attr}: {found}; name the dataset "
                                "(e.g. utkface:asian)")
        ga, gb = found[0][0], found[1][0]
        if ga == gb:
            raise FaceLensError(f"contrast {a!r} vs {b!r}: both name the group {ga!r}")
        if not _same_source(ga, gb):
            raise FaceLensError(f"contrast {ga!r} vs {gb!r}: race groups of different datasets are never compared "
                                "(their labels and photos differ); pick two groups of one dataset")
        return attr, ga, gb
    listing = "; ".join(f"{k}: {', '.join(v)}" for k, v in names.items() if k != "all" and v)
    raise FaceLensError(f"contrast {a!r} vs {b!r}: no attribute has both groups (groups: {listing})")


def _rows_for(args: argparse.Namespace) -> list[ManifestRow]:
    if getattr(args, "rows", None) is not None:  # rows chosen by the caller (the report's identity sample)
        return list(args.rows)
    if not args.manifest:
        raise FaceLensError("--manifest is required (e.g. ../shared/faces/manifest.csv)")
    rows = read_manifest(args.manifest, datasets=args.datasets)
    return rows[: args.limit] if args.limit else rows


#: The forest plot's panels per metric: the overall row and the margins together, each intersection alone
#: (a single panel of 40 rows would be unreadable).
_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("all and by one attribute", ("all", *ATTRIBUTES)), *((a, (a,)) for a in INTERSECTIONS))
_RED, _DARK, _GREY = "#c0392b", "#2c3e50", "#a0a0a0"


def _forest_entries(by: dict[tuple[str, str], GroupComparison], metric: str, attrs: Sequence[str]
                    ) -> list[tuple[str, GroupComparison | None, GroupEstimate | None]]:
    """Rows of one panel, top to bottom: a header per attribute (when a panel holds several), then its groups."""
    out: list[tuple[str, GroupComparison | None, GroupEstimate | None]] = []
    for attr in attrs:
        comp = by.get((metric, attr))
        if comp is None or not comp.groups:
            continue
        if len(attrs) > 1 and attr != "all":
            out.append((f"— by {attr} —", None, None))
        out.extend((g.group, comp, g) for g in comp.groups)
    return out


def _forest_figure(comparisons: list[GroupComparison], contrast_groups: Sequence[tuple[str, str]] = ()) -> np.ndarray:
    """One row of panels per metric: all + margins, then each intersection; the ``all`` value as a dashed line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..explain.render import figure_to_rgb

    metrics = list(dict.fromkeys(c.metric for c in comparisons))
    by = {(c.metric, c.attribute): c for c in comparisons}
    panels = [(t, a) for t, a in _PANELS if any((m, x) in by for m in metrics for x in a)]
    heights = [max(1, *(len(_forest_entries(by, m, a)) for _, a in panels)) for m in metrics]
    fig = plt.figure(figsize=(4.9 * len(panels), sum(0.8 + 0.19 * h for h in heights)))
    grid = fig.add_gridspec(len(metrics), len(panels), height_ratios=[0.8 + 0.19 * h for h in heights])
    marked = set(contrast_groups)
    for i, metric in enumerate(metrics):
        overall = by.get((metric, "all"))
        # one x-range per metric, so that the panels of a row can be read against each other
        ends = [x for c in comparisons if c.metric == metric for g in c.groups
                for x in (g.estimate.lo, g.estimate.value, g.estimate.hi) if np.isfinite(x)]
        span = (min(ends), max(ends)) if ends else (0.0, 1.0)
        pad = 0.04 * (span[1] - span[0]) or 0.05
        for j, (title, attrs) in enumerate(panels):
            ax = fig.add_subplot(grid[i, j])
            rows = _forest_entries(by, metric, attrs)
            if not rows:
                ax.axis("off")
                ax.set_title(f"{metric}, {title}: no data", fontsize=8)
                continue
            ys, labels, heads = [], [], []
            for k, (name, comp, g) in enumerate(rows):
                y = heights[i] - 1 - k
                ys.append(y)
                if comp is None or g is None:
                    labels.append(name)
                    heads.append(True)
                    continue
                e = g.estimate
                flagged = {x for d in comp.differences if d.supported for x in (d.a, d.b)}
                small = e.n_clusters < comp.min_people and comp.attribute != "all"  # 'all' is never compared
                col = _GREY if small else _RED if name in flagged else _DARK
                if e.finite:
                    ax.errorbar([e.value], [y], xerr=[[max(0.0, e.value - e.lo)], [max(0.0, e.hi - e.value)]],
                                fmt="none", ecolor=col, capsize=2.5, lw=1)
                marker = "D" if (comp.attribute, name) in marked else "o"
                ax.scatter([e.value], [y], c=col, s=22 if marker == "D" else 16, marker=marker, zorder=3)
                n = round(e.trials) if e.trials is not None else e.n
                who = "" if e.trials is None and e.n == e.n_clusters else f", {e.n_clusters} ppl"
                labels.append(f"{name} (n={n}{who}){' *' if small else ''}")
                heads.append(False)
            ax.set_yticks(ys, labels, fontsize=7)
            for tick, head in zip(ax.get_yticklabels(), heads, strict=True):
                if head:
                    tick.set_fontweight("bold")
            ax.set_ylim(-0.7, heights[i] - 0.3)
            ax.set_xlim(span[0] - pad, span[1] + pad)
            if overall is not None and overall.groups and np.isfinite(overall.groups[0].estimate.value):
                ax.axvline(overall.groups[0].estimate.value, color="#7f8c8d", ls="--", lw=0.8, zorder=0)
            ax.tick_params(axis="x", labelsize=7)
            ax.set_title(f"{metric}: {title}", fontsize=8)
            ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"95% intervals. Red: in a difference the data support (adjusted interval excludes 0). Grey *: fewer "
                 f"than {min(c.min_people for c in comparisons)} people, not compared. Diamond: a pre-specified "
                 "contrast. Dashed line: the 'all' row.", fontsize=8)
    return figure_to_rgb(fig)


def _contrast_figure(rows: list[dict[str, Any]]) -> np.ndarray:
    """Per metric of a planned contrast: the two groups with their intervals, and the difference against 0."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..explain.render import figure_to_rgb

    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 0.7 + 1.35 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.25, 1]})
    for i, r in enumerate(rows):
        left, right = axes[i]
        for y, key in ((1, "a"), (0, "b")):
            g = r["groups"][r[key]]
            lo, hi = g["ci"]
            if lo is not None and hi is not None:
                left.errorbar([g["value"]], [y], xerr=[[max(0.0, g["value"] - lo)], [max(0.0, hi - g["value"])]],
                              fmt="o", color=_DARK, capsize=3)
            else:
                left.plot([g["value"]], [y], "o", color=_DARK)
        left.set_yticks([1, 0], [f"{r[k]} (n={r['groups'][r[k]]['n']}, {r['groups'][r[k]]['people']} people)"
                                 for k in ("a", "b")], fontsize=7)
        left.set_ylim(-0.6, 1.6)
        left.set_title(f"{r['metric']} (95% intervals)", fontsize=8)
        left.tick_params(axis="x", labelsize=7)
        left.grid(axis="x", alpha=0.3)
        d = r["difference_a_minus_b"]
        col = _RED if r["status"] == "supported" else _DARK
        if d["ci"][0] is not None and d["ci"][1] is not None:
            right.errorbar([d["value"]], [0], xerr=[[max(0.0, d["value"] - d["ci"][0])],
                                                    [max(0.0, d["ci"][1] - d["value"])]], fmt="o", color=col, capsize=3)
        right.axvline(0, color="#7f8c8d", ls="--", lw=0.8)
        right.set_yticks([])
        right.set_title(f"{r['a']} − {r['b']}: {r['status']} ({100 * d['level']:.4g}% interval)", fontsize=8)
        right.tick_params(axis="x", labelsize=7)
        right.grid(axis="x", alpha=0.3)
    return figure_to_rgb(fig)


def _probe_figure(probe: ProbeResult) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..explain.render import figure_to_rgb

    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(probe.groups), 3.2))
    x = np.arange(len(probe.groups))
    for k, (design, color) in enumerate((("unbalanced", "#e67e22"), ("balanced", "#2980b9"))):
        est = [probe.test[design][g] for g in probe.groups]
        v = np.array([e.value for e in est])
        ax.errorbar(x + (k - 0.5) * 0.25, v, yerr=[v - [e.lo for e in est], [e.hi for e in est] - v], fmt="o",
                    color=color, capsize=3, label=f"{design} training set")
    ax.set_xticks(x, [f"{g}\n(test n={probe.n_test[g]})" for g in probe.groups], fontsize=7)
    ax.set_ylabel("held-out sex accuracy", fontsize=8)
    share = round(100 * probe.train_counts["unbalanced"][probe.majority] / probe.train_size)
    ax.set_title(f"Sex probe on embeddings: {probe.majority} is {share}% of the unbalanced set "
                 f"(N={probe.train_size})", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return figure_to_rgb(fig)


def _attention_figure(comps: list[GroupComparison], canon: dict[str, Any]) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..explain.render import figure_to_rgb

    groups = list(canon)
    fig = plt.figure(figsize=(4.6 + 2.6 * (len(groups) + 1), 3.4))
    gs = fig.add_gridspec(1, len(groups) + 2, width_ratios=[2.2] + [1] * (len(groups) + 1))
    ax = fig.add_subplot(gs[0, 0])
    regions = [c.metric.removeprefix("attention share: ") for c in comps]
    width = 0.8 / max(len(groups), 1)
    for k, g in enumerate(groups):
        v, lo, hi = [], [], []
        for c in comps:
            try:
                e = c.group(g)
            except KeyError:
                e = Estimate(np.nan, np.nan, np.nan, 0, 0)
            v.append(e.value)
            lo.append(e.lo)
            hi.append(e.hi)
        v_arr = np.array(v)
        ax.bar(np.arange(len(regions)) + k * width, v_arr, width, label=f"{g} (n={canon[g].count})",
               yerr=[np.nan_to_num(v_arr - lo), np.nan_to_num(np.array(hi) - v_arr)], capsize=2)
    ax.set_xticks(np.arange(len(regions)) + width * (len(groups) - 1) / 2, regions, rotation=45, fontsize=7,
                  ha="right")
    ax.set_ylabel("share of saliency", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title("where the model looks, per group", fontsize=8)
    maps = [canon[g].map for g in groups]
    vmax = max(float(m.max()) for m in maps)
    for k, g in enumerate(groups):
        a = fig.add_subplot(gs[0, k + 1])
        a.imshow(maps[k], cmap="jet", vmin=0, vmax=vmax)
        marks = canon[g].landmarks
        a.plot(marks[:, 0], marks[:, 1], ".", color="white", ms=1.5)
        a.set_title(f"{g}: mean of {canon[g].count}", fontsize=8)
        a.axis("off")
    if len(maps) >= 2:
        a = fig.add_subplot(gs[0, len(groups) + 1])
        d = maps[0] - maps[1]
        lim = float(np.abs(d).max()) or 1.0
        im = a.imshow(d, cmap="RdBu_r", vmin=-lim, vmax=lim)
        a.set_title(f"{groups[0]} − {groups[1]}", fontsize=8)
        a.axis("off")
        fig.colorbar(im, ax=a, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    fig.tight_layout()
    return figure_to_rgb(fig)


def _stats(e: Estimate) -> dict[str, Any]:
    """A group's summary entry: value, ci [low, high], n (photos, or comparisons for FNMR/FMR) and people."""
    weighted = e.trials is not None
    return {"value": e.value if np.isfinite(e.value) else None,
            "ci": [e.lo if np.isfinite(e.lo) else None, e.hi if np.isfinite(e.hi) else None],
            "n": round(e.trials) if weighted else e.n, "people": e.n_clusters,
            "n_unit": "comparisons" if weighted else "photos", "interval": e.method}


def _contrast_entries(comparisons: list[GroupComparison], specs: list[tuple[str, str, str]], level: float,
                      metric_filter: str = "accuracy") -> tuple[list[dict[str, Any]], list[str]]:
    """Each planned contrast on the planned metric (the first whose name contains ``metric_filter``), and a
    note when that metric lacks a group. One contrast on one metric is one comparison: it needs no
    multiplicity correction (several contrasts: Bonferroni over them, applied by the caller)."""
    metrics = [m for m in dict.fromkeys(c.metric for c in comparisons) if metric_filter.lower() in m.lower()][:1]
    if not metrics:
        return [], [f"Contrast: no metric named like {metric_filter!r} was measured; nothing to compare."]
    k = len(specs)
    adjustment = ("none: a single pre-specified contrast on one metric needs no multiplicity correction" if k == 1
                  else f"Bonferroni over the {k} pre-specified contrast × metric comparisons")
    prefix = ("Pre-specified contrast (one planned comparison, so no multiplicity correction)" if k == 1
              else f"Pre-specified contrast (Bonferroni over {k} planned comparisons)")
    entries: list[dict[str, Any]] = []
    notes: list[str] = []
    for attr, a, b in specs:
        for metric in metrics:
            comp = next((c for c in comparisons if c.metric == metric and c.attribute == attr), None)
            d = next((x for x in comp.contrasts if (x.a, x.b) == (a, b)), None) if comp else None
            if comp is None or d is None or d.verdict is None:
                pairs = "FMR" in metric or "FNMR" in metric
                notes.append(f"Contrast {a} vs {b}: {metric} is not defined for it (a group has no such data"
                             f"{', e.g. no identity labels to form pairs of photos' if pairs else ''}).")
                continue
            e = d.estimate
            entries.append({
                "metric": metric, "attribute": attr, "a": a, "b": b,
                "groups": {a: _stats(comp.group(a)), b: _stats(comp.group(b))},
                "difference_a_minus_b": {**{k: v for k, v in _stats(e).items() if k in ("value", "ci")},
                                         "level": level, "interval": e.method},
                "status": d.status, "reason": d.verdict.reason, "adjustment": adjustment,
                "sentence": f"{prefix}: {d.verdict.sentence()}"})
    return entries, notes


def _contrast_rows(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for x in entries:
        row: dict[str, Any] = {"metric": x["metric"], "attribute": x["attribute"]}
        for key in ("a", "b"):
            g = x["groups"][x[key]]
            row.update({key: x[key], f"{key}_value": g["value"], f"{key}_ci_low": g["ci"][0],
                        f"{key}_ci_high": g["ci"][1], f"{key}_n": g["n"], f"{key}_people": g["people"]})
        d = x["difference_a_minus_b"]
        row.update({"difference_a_minus_b": d["value"], "ci_low": d["ci"][0], "ci_high": d["ci"][1],
                    "ci_level": d["level"], "interval": d["interval"], "status": x["status"], "reason": x["reason"],
                    "adjustment": x["adjustment"]})
        rows.append(row)
    return rows


def run_bias(args: argparse.Namespace) -> StudyResult:
    """``facelens audit bias``: see the module docstring."""
    t0 = time.perf_counter()
    rows = _rows_for(args)
    labelled = [r for r in rows if r.sex or r.age is not None or r.race]
    if not labelled:
        raise FaceLensError(f"{args.manifest}: no row has a sex, age or race label; nothing to audit")
    min_people = int(getattr(args, "min_people", MIN_PEOPLE))
    requested = [(str(a), str(b)) for a, b in (getattr(args, "contrast", None) or [])]
    opts: dict[str, Any] = {"n_boot": args.n_boot, "seed": args.seed, "ci": 0.95, "min_clusters": min_people}
    result = StudyResult("bias", args.model, settings={
        "gender_model": args.gender_model, "age_model": args.age_model, "embedding_model": args.model,
        "n_boot": args.n_boot, "ci": 0.95,
        "intervals": "proportions (accuracy, FNMR, FMR): Wilson score widened to the bootstrap over people; "
                     "differences of proportions: Newcombe score widened to the two-sample bootstrap over people; "
                     "MAE and attention shares: percentile bootstrap over people",
        "difference_ci": "Bonferroni-adjusted over the compared pairs of one attribute and metric",
        "min_people_per_group": min_people, "attributes": list(AUDITED),
        "age_bands": [b[0] for b in AGE_BANDS], "attention_method": args.attention_method,
        "attention_per_group": args.attention_n, "probe_attribute": args.probe_attribute,
        "probe_majority_share": args.majority_share, "probe_repeats": args.probe_repeats, "seed": args.seed,
        "contrasts": [list(p) for p in requested]})
    # group names and the planned contrasts come from the labels alone: a wrong name fails before any photo is read
    qualify = race_qualified(labelled)
    result.settings["race_labels"] = ("qualified by dataset (race labels from several datasets)" if qualify
                                      else "bare (race labels from one dataset)")
    group = functools.partial(group_of, qualify=qualify)
    names = {attr: sorted({group(r, attr) for r in labelled} - {None}) for attr in AUDITED}
    specs = [resolve_contrast(a, b, names) for a, b in requested]
    worker = functools.partial(_make_bias_worker, args.gender_model, args.age_model, args.model)
    mapped = map_rows(labelled, worker, executor=args.executor, address=args.address, batch_size=args.batch_size)
    result.failures = [f.as_dict() for f in mapped.failures]
    result.counts = {"rows_in": len(rows), "labelled": len(labelled), "faces": mapped.rows_out,
                     "no_face_or_unreadable": len(mapped.failures)}
    rws, recs = mapped.rows, mapped.records
    people = [cluster_of(r) for r in rws]
    planned: dict[str, list[tuple[str, str]]] = {}
    for attr, a, b in specs:
        planned.setdefault(attr, []).append((a, b))
    contrast_metric = str(getattr(args, "contrast_metric", "accuracy") or "accuracy")
    contrast_ci = adjusted_level(0.95, len(specs))

    def options(attr: str) -> dict[str, Any]:
        return dict(opts, comparable=_same_source if "race" in attr else None, planned=planned.get(attr, ()),
                    planned_ci=contrast_ci)

    comparisons: list[GroupComparison] = []
    # 1. gender accuracy and 2. age error, overall, per attribute and per intersection
    for attr in AUDITED:
        groups = [group(r, attr) for r in rws]
        if args.gender_model:
            correct = [float(rec["gender"] == r.sex) if r.sex in ("female", "male") else np.nan
                       for r, rec in zip(rws, recs, strict=True)]
            comparisons.append(compare_groups(correct, groups, clusters=people, metric=f"{args.gender_model} accuracy",
                                              attribute=attr, kind="proportion", **options(attr)))
        if args.age_model:
            err = [abs(rec["age"] - r.age) if r.age is not None else np.nan for r, rec in zip(rws, recs, strict=True)]
            comparisons.append(compare_groups(err, groups, clusters=people, metric=f"{args.age_model} MAE (years)",
                                              attribute=attr, higher_is_better=False, kind="mean", **options(attr)))
    # 3. verification at one global threshold, pairs within a group
    from ..models import load_model

    model = load_model(args.model)
    with_id = [(r, rec) for r, rec in zip(rws, recs, strict=True) if r.identity]
    threshold = model.match_threshold
    if with_id and model.task == "embedding":
        vr = [r for r, _ in with_id]
        emb = np.stack([rec["embedding"] for _, rec in with_id])
        if threshold is None:
            raise FaceLensError(f"{args.model} has no calibrated threshold; the bias audit needs one global threshold")
        for attr in AUDITED:
            # pairs within a group: score each group's photos among themselves
            gen_all: dict[str, list[float]] = {}
            imp_all: dict[str, list[float]] = {}
            labels = {}
            for grp in sorted({group(r, attr) for r in vr} - {None}):
                idx = [i for i, r in enumerate(vr) if group(r, attr) == grp]
                gen, imp = _verification_trials([vr[i] for i in idx], emb[idx], threshold)
                for k, v in gen.items():
                    gen_all[f"{grp}|{k}"] = v
                    labels[f"{grp}|{k}"] = grp
                for k, v in imp.items():
                    imp_all[f"{grp}|{k}"] = v
                    labels[f"{grp}|{k}"] = grp
            if gen_all:
                comparisons.append(_rate_comparison(gen_all, attr, f"{args.model} FNMR", options(attr), labels.get))
            if imp_all:
                comparisons.append(_rate_comparison(imp_all, attr, f"{args.model} FMR", options(attr), labels.get))
        result.notes.append(f"Verification: one global threshold, L2 distance < {threshold} (the model's own); "
                            "genuine pairs = every pair of photos of one person; impostor pairs = every pair of "
                            "photos of two different people of the same group (for the 'all' row: of any two "
                            "people); rows without an identity (UTKFace) are left out because two of their photos "
                            "may show one person.")
    elif not with_id:
        result.notes.append("FNMR and FMR are not measured: no audited photo has an identity label, so genuine and "
                            "impostor pairs cannot be formed.")
    result.tables["group_metrics"] = [row for c in comparisons for row in c.group_rows()]
    result.tables["group_differences"] = [row for c in comparisons for row in c.difference_rows()]
    summary: dict[str, Any] = {}
    for c in comparisons:
        summary[f"{c.metric} | {c.attribute}"] = {g.group: _stats(g.estimate) for g in c.groups}
    if specs:
        entries, missing = _contrast_entries(comparisons, specs, contrast_ci, contrast_metric)
        summary["contrasts"] = entries
        result.tables["contrasts"] = _contrast_rows(entries)
        result.verdicts.extend(x["sentence"] for x in entries)
        result.notes.extend(missing)
        if entries:
            result.add_figure("contrast", _contrast_figure(entries),
                              "The pre-specified contrast, one row per metric. Left: each group's score with its 95% "
                              "interval (n = photos, or comparisons for FNMR/FMR). Right: the difference of the "
                              f"first group minus the second with its {100 * contrast_ci:.4g}% interval; the dashed "
                              "line is no difference. Red: the interval excludes 0, so the difference is supported.")
    for c in comparisons:
        result.verdicts.extend(c.verdicts())
    if comparisons:
        result.add_figure("groups", _forest_figure(comparisons, [(attr, g) for attr, a, b in specs for g in (a, b)]),
                          "Each dot is a group's score (accuracy: higher is better; age error, FNMR and FMR: lower "
                          "is better) with its 95% interval (proportions: Wilson score widened to the bootstrap over "
                          "people; MAE: bootstrap over people); n = photos (FNMR/FMR: comparisons), ppl = people when "
                          "they differ. Per metric: the overall 'all' row and the single attributes, then each "
                          "intersection in its own panel; the dashed line is the 'all' value. Red: a group in a "
                          "difference the data support (the Bonferroni-adjusted interval of the difference excludes "
                          f"0). Grey with *: fewer than {min_people} people, shown but not compared. Diamonds: the "
                          "groups of a pre-specified contrast. Overlapping bars alone prove nothing.")
    # 4. attention per group (small sample)
    if args.attention_n > 0:
        _attention(result, args, rws, opts, qualify)
    # 5. probe experiment
    if model.task == "embedding" and args.probe_attribute != "none":
        try:
            sel, majority = _probe_selection(rws, args.probe_attribute, args.probe_majority, args.probe_min_people)
            if not sel:
                raise FaceLensError(f"no photo has both sex and {args.probe_attribute} labels")
            emb_sel = np.stack([recs[i]["embedding"] for i in sel])
            probe = probe_experiment(emb_sel, [rws[i].sex for i in sel],
                                     [group_of(rws[i], args.probe_attribute) for i in sel], [people[i] for i in sel],
                                     attribute=args.probe_attribute, majority_share=args.majority_share,
                                     repeats=args.probe_repeats, n_boot=args.n_boot, seed=args.seed,
                                     min_people=args.probe_min_people, majority=majority)
        except FaceLensError as exc:
            result.notes.append(f"Probe experiment not run: {exc}")
        else:
            result.tables["probe"] = probe.rows()
            result.tables["probe_differences"] = probe.difference_rows()
            result.verdicts.extend(probe.verdicts())
            result.notes.extend(probe.notes)
            summary["probe"] = {"majority": probe.majority, "train_size": probe.train_size,
                                "train_counts": probe.train_counts, "n_test": probe.n_test,
                                "difference_balanced_minus_unbalanced": {
                                    g: {"value": e.value, "ci": [e.lo, e.hi], "status": probe.verdict(g).status}
                                    for g, e in probe.differences.items()}}
            result.add_figure("probe", _probe_figure(probe),
                              f"A simple classifier (logistic regression) reads sex from {args.model}'s face "
                              f"embeddings. Orange: trained on {probe.train_size} photos, "
                              f"{probe.train_counts['unbalanced'][probe.majority]} of them {probe.majority}; blue: the "
                              "same number of photos, equal from every "
                              f"{args.probe_attribute} group. Dots are accuracy on people never seen in training, "
                              "bars 95% intervals; a group whose blue dot is clearly above its orange "
                              "one is hurt by being under-represented.")
    result.summary = summary
    recognizer_used = (with_id and model.task == "embedding") or "probe" in summary or "attention" in result.tables
    result.model = ", ".join(m for m in (args.gender_model, args.age_model, args.model if recognizer_used else "")
                             if m)
    without_id = sum(1 for r in rws if not r.identity)
    if without_id:
        result.notes.insert(0, f"{without_id} audited photos have no identity labels (e.g. UTKFace): each counts as "
                               "its own person, so where one person appears twice the intervals are a little narrow "
                               "and 'people' counts photos.")
    result.seconds = time.perf_counter() - t0
    return result


def _probe_selection(rws: list[ManifestRow], attribute: str, majority: str | None,
                     min_people: int) -> tuple[list[int], str | None]:
    """The photos of the probe experiment, and its majority group.

    For race the experiment stays inside the one dataset with the most race groups of at least
    ``min_people`` people (labels of different sources do not mix, see :func:`group_of`); ``majority``
    may name the bare label (``white``).
    """
    idx = [i for i, r in enumerate(rws) if r.sex in ("female", "male") and group_of(r, attribute)]
    if attribute == "race" and idx:
        people: dict[str, dict[str, set[str]]] = {}
        for i in idx:
            people.setdefault(str(rws[i].dataset), {}).setdefault(str(rws[i].race), set()).add(cluster_of(rws[i]))
        best = max(sorted(people), key=lambda d: (sum(len(p) >= min_people for p in people[d].values()),
                                                  sum(len(p) for p in people[d].values())))
        idx = [i for i in idx if str(rws[i].dataset) == best]
        if majority and ":" not in majority:
            majority = f"{best}:{majority}"
    return idx, majority or None


def _attention(result: StudyResult, args: argparse.Namespace, rws: list[ManifestRow], opts: dict[str, Any],
               qualify: bool = True) -> None:
    """Region attention and canonical maps per group of ``--attention-attribute`` (small seeded sample)."""
    attr = args.attention_attribute
    rng = np.random.default_rng(args.seed)
    chosen: list[ManifestRow] = []
    for grp in sorted({group_of(r, attr, qualify=qualify) for r in rws} - {None}):
        cand = [r for r in rws if group_of(r, attr, qualify=qualify) == grp]
        # one photo per person, so no face counts twice
        seen: dict[str, ManifestRow] = {}
        for r in cand:
            seen.setdefault(cluster_of(r), r)
        pool = list(seen.values())
        pick = rng.choice(len(pool), size=min(args.attention_n, len(pool)), replace=False)
        chosen.extend(pool[i] for i in sorted(pick))
    if not chosen:
        return
    worker = functools.partial(_make_attention_worker, args.model, args.attention_method)
    mapped = map_rows(chosen, worker, executor=args.executor, address=args.address, batch_size=args.batch_size)
    result.failures.extend(f.as_dict() for f in mapped.failures)
    groups = [group_of(r, attr, qualify=qualify) for r in mapped.rows]
    comps = []
    regions = list(_ATTENTION_REGIONS)
    m = len(regions)
    for region in regions:
        vals = [rec["shares"][region] for rec in mapped.records]
        comps.append(compare_groups(vals, groups, clusters=[cluster_of(r) for r in mapped.rows],
                                    metric=f"attention share: {region}", attribute=attr, family=m, kind="mean",
                                    **opts))
    canon: dict[str, Any] = {}
    for grp in sorted(set(groups)):
        from ..explain.face import CanonicalMapAccumulator

        acc = CanonicalMapAccumulator()
        for g, rec in zip(groups, mapped.records, strict=True):
            if g == grp:
                acc.merge(rec["canonical"])
        if acc.count:
            canon[grp] = acc.compute()
    result.tables["attention"] = [row for c in comps for row in c.group_rows()]
    result.tables["attention_differences"] = [row for c in comps for row in c.difference_rows()]
    supported = [d.verdict for c in comps for d in c.differences if d.supported and d.verdict is not None]
    decided = [d for c in comps for d in c.differences if d.a not in c.excluded and d.b not in c.excluded]
    n_by = {g: groups.count(g) for g in sorted(set(groups))}
    if supported:
        result.verdicts.extend(v.sentence().replace("is better than", "gets a larger share than")
                               .replace("is worse than", "gets a smaller share than") for v in supported)
    elif not decided:
        result.verdicts.append(f"Attention ({args.attention_method} on {args.model}) by {attr}: inconclusive, too few "
                               f"people per group to compare (n per group: {n_by}; at least {opts['min_clusters']} "
                               "needed).")
    else:
        result.verdicts.append(f"Attention ({args.attention_method} on {args.model}) by {attr}: no difference in any "
                               f"region's share is supported; every interval contains 0 or none could be made "
                               f"(inconclusive, n per group: {n_by}; intervals adjusted over {m} regions and every "
                               "pair).")
    result.notes.append(f"Attention: {args.attention_method} on {args.model}, one photo per person, "
                        f"up to {args.attention_n} people per {attr} group (seed {args.seed}); region shares of "
                        "positive saliency, group intervals at 95%, differences Bonferroni-adjusted "
                        "over regions × pairs.")
    if len(canon) >= 1:
        result.add_figure("attention", _attention_figure(comps, canon),
                          f"Left: the share of the explanation ({args.attention_method}) that falls on each face "
                          f"region, averaged over each {attr} group, with bootstrap intervals. Right: the average "
                          "map on a common face shape (canonical face) per group, and the difference of the first "
                          "two groups (red: more attention in the first). A visible difference in the maps is not "
                          "a finding unless the bars' interval test supports it (see the verdicts).")


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gender-model", default="dlib-gender", help="classifier with female/male classes ('' to skip)")
    p.add_argument("--age-model", default="dlib-age", help="age model with expected_age bins ('' to skip)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (percentile intervals)")
    p.add_argument("--attention-n", type=int, default=20, help="people per group for attention maps (0: skip)")
    p.add_argument("--attention-attribute", default="sex", choices=ATTRIBUTES)
    p.add_argument("--attention-method", default="gradcam", help="a cheap facelens.explain method")
    p.add_argument("--probe-attribute", default="race", choices=(*ATTRIBUTES, "none"),
                   help="groups the sex probe's training set is unbalanced over ('none' to skip)")
    p.add_argument("--majority-share", type=float, default=0.9, help="majority share of the unbalanced set")
    p.add_argument("--probe-majority", default="white",
                   help="the over-represented group of the unbalanced set ('': the largest)")
    p.add_argument("--probe-repeats", type=int, default=20, help="training draws per design")
    p.add_argument("--probe-min-people", type=int, default=20, help="people a group needs to join the probe")
    p.add_argument("--min-people", type=int, default=MIN_PEOPLE,
                   help="people a group needs before its differences are decided (smaller: shown, inconclusive)")
    p.add_argument("--contrast", nargs=2, action="append", metavar=("GROUP_A", "GROUP_B"), default=None,
                   help="a pre-specified comparison, e.g. --contrast 'male × asian' 'female × white' (× or x); "
                        "decided on one metric (--contrast-metric) at the unadjusted 95%% level (repeated: "
                        "Bonferroni over the contrasts)")
    p.add_argument("--contrast-metric", default="accuracy",
                   help="the one metric a planned contrast is decided on: part of its name (accuracy, MAE, FNMR, "
                        "FMR; default: accuracy)")



register_study(StudySpec("bias", "demographic bias audit: overall, per-group and intersectional accuracy, age error, "
                         "FNMR/FMR, attention, planned contrasts and the sex-probe experiment, with intervals",
                         run_bias, _add_args))
