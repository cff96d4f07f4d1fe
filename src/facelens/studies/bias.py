"""Demographic bias audit: per-group error rates with bootstrap intervals, and nothing claimed beyond them.

Groups come from the manifest's labels, exactly as each source gives them: ``sex``, an **age band**
(see :data:`AGE_BANDS`) and ``race`` (``race_or_skin``: London's self-reported ethnicity and UTKFace's
file-name race code use different vocabularies; we keep both as given, qualified by their dataset, and
compare race groups only within one dataset).

The statistics core works on plain arrays so that it can be checked on synthetic data:

- :func:`cluster_bootstrap` — a ratio of sums (accuracy, mean error, FNMR, FMR) with a **percentile
  bootstrap over clusters**. A cluster is one person: the two London photos of a subject, or the
  impostor comparisons of one subject, are not independent trials, and resampling photos as if they
  were would give intervals that are too narrow. Photos without an identity (UTKFace) are their own
  cluster (one person may recur there, so those intervals may be slightly narrow).
- :func:`compare_groups` — every group's estimate and every pairwise difference, each difference
  bootstrapped by resampling clusters within each group (groups are disjoint, so the two resamples are
  independent). Difference intervals are Bonferroni-adjusted over the comparisons of one attribute and
  metric; a difference is **claimed only when its interval excludes 0**, and the verdict sentences are
  written from those numbers.
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
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..datasets import ManifestRow, read_manifest
from ..errors import FaceLensError
from ..evaluate.bootstrap import percentile_interval, resampled_ratios
from ..executors import BatchFn, RowFailure, map_rows
from .base import StudyResult, StudySpec, register_study

__all__ = [
    "AGE_BANDS",
    "ATTRIBUTES",
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
    "paired_difference",
    "probe_experiment",
    "run_bias",
]

#: Age bands (inclusive years). Children are a band of their own because their faces differ in shape;
#: 65+ is one band because few photos are older and dlib-age's top bin is 80.
AGE_BANDS: tuple[tuple[str, int, int], ...] = (
    ("0-14", 0, 14), ("15-24", 15, 24), ("25-34", 25, 34), ("35-49", 35, 49), ("50-64", 50, 64), ("65+", 65, 10**6),
)
ATTRIBUTES: tuple[str, ...] = ("sex", "age", "race")


def age_band(age: int | float | None) -> str | None:
    """The :data:`AGE_BANDS` label of an age in years (None when unknown)."""
    if age is None or not np.isfinite(age):
        return None
    for name, lo, hi in AGE_BANDS:
        if lo <= age <= hi:
            return name
    return None


def group_of(row: ManifestRow, attribute: str) -> str | None:
    """A photo's group for ``sex``, ``age`` (band) or ``race``, None when unlabelled.

    Race is ``"<dataset>:<label>"``: each source labels race in its own vocabulary and photographs people
    in its own way (studio photos in London, web crops in UTKFace), so race groups are compared only
    within one source; comparing across sources would measure the sources.
    """
    if attribute == "sex":
        return row.sex
    if attribute == "age":
        return age_band(row.age)
    if attribute == "race":
        if not row.race:
            return None
        return f"{row.dataset}:{row.race}" if row.dataset else row.race
    raise FaceLensError(f"unknown attribute {attribute!r}; use one of {', '.join(ATTRIBUTES)}")


def cluster_of(row: ManifestRow) -> str:
    """The resampling unit: the person when the manifest names one, else the photo itself."""
    return f"{row.dataset}:{row.identity}" if row.identity else str(row.path)


# -- statistics core -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A ratio of sums with its percentile-bootstrap interval; ``n`` trials in ``n_clusters`` clusters."""

    value: float
    lo: float
    hi: float
    n: int
    n_clusters: int
    ci: float = 0.95
    trials: float | None = None  # Σ weights when they count trials (e.g. comparisons per person)

    def excludes(self, x: float = 0.0) -> bool:
        return bool(np.isfinite(self.lo) and np.isfinite(self.hi) and (self.lo > x or self.hi < x))

    def text(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


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

    With 0/1 ``values`` and no weights this is a rate (accuracy, FNMR); with errors it is a mean error;
    with ``values`` = per-person error rates and ``weights`` = their trial counts it is a pooled rate.
    ``clusters`` (one label per value) is the resampling unit; None resamples values independently.
    """
    v, w, c = _prepare(values, weights, clusters)
    num, den = _cluster_totals(v, w, c)
    value = float(num.sum() / den.sum()) if den.sum() > 0 else float("nan")
    lo, hi = percentile_interval(resampled_ratios(num, den, n_boot, np.random.default_rng(seed)), ci)
    return Estimate(value, lo, hi, len(v), len(num), ci, None if weights is None else float(w.sum()))


def paired_difference(values_a: Any, values_b: Any, clusters: Any = None, *, n_boot: int = 2000, ci: float = 0.95,
                      seed: int = 0) -> Estimate:
    """Mean of ``a − b`` over the same trials, bootstrapped over clusters (the pairing is kept)."""
    a = np.asarray(values_a, np.float64).ravel()
    b = np.asarray(values_b, np.float64).ravel()
    if a.shape != b.shape:
        raise FaceLensError(f"paired values differ in length: {len(a)} and {len(b)}")
    return cluster_bootstrap(a - b, None, clusters, n_boot=n_boot, ci=ci, seed=seed)


@dataclass(frozen=True)
class GroupEstimate:
    group: str
    estimate: Estimate


@dataclass(frozen=True)
class GroupDifference:
    """``a − b`` with its (adjusted) interval; ``supported`` only when the interval excludes 0.

    ``degenerate`` marks a pair where a group's bootstrap never varied (e.g. every photo correct): its
    zero-width interval says nothing about the true rate (with 0 errors in n trials the error rate may
    still be up to 3/n, the rule of three), so such a difference is never claimed.
    """

    a: str
    b: str
    estimate: Estimate
    degenerate: bool = False

    @property
    def supported(self) -> bool:
        return self.estimate.excludes(0.0) and not self.degenerate


@dataclass
class GroupComparison:
    """Per-group estimates of one metric over one attribute, and every pairwise difference."""

    metric: str
    attribute: str
    groups: list[GroupEstimate]
    differences: list[GroupDifference]
    higher_is_better: bool = True
    ci: float = 0.95
    difference_ci: float = 0.95
    excluded: dict[str, int] = field(default_factory=dict)  # groups too small to compare: clusters

    def group(self, name: str) -> Estimate:
        for g in self.groups:
            if g.group == name:
                return g.estimate
        raise KeyError(name)

    def difference(self, a: str, b: str) -> GroupDifference:
        for d in self.differences:
            if (d.a, d.b) == (a, b):
                return d
            if (d.b, d.a) == (a, b):
                e = d.estimate
                return GroupDifference(a, b, Estimate(-e.value, -e.hi, -e.lo, e.n, e.n_clusters, e.ci), d.degenerate)
        raise KeyError((a, b))

    def _constant(self, name: str) -> bool:
        e = self.group(name)
        return bool(e.lo == e.hi)

    def group_rows(self) -> list[dict[str, Any]]:
        return [{"metric": self.metric, "attribute": self.attribute, "group": g.group, "value": g.estimate.value,
                 "ci_low": g.estimate.lo, "ci_high": g.estimate.hi,
                 "n": int(g.estimate.trials) if g.estimate.trials is not None else g.estimate.n,
                 "n_unit": "comparisons" if g.estimate.trials is not None else "photos",
                 "n_people": g.estimate.n_clusters} for g in self.groups]

    def difference_rows(self) -> list[dict[str, Any]]:
        return [{"metric": self.metric, "attribute": self.attribute, "a": d.a, "b": d.b,
                 "difference_a_minus_b": d.estimate.value, "ci_low": d.estimate.lo, "ci_high": d.estimate.hi,
                 "ci_level": round(self.difference_ci, 5), "degenerate": d.degenerate, "supported": d.supported}
                for d in self.differences]

    def verdicts(self) -> list[str]:
        """One sentence per supported difference, or one saying that none is supported (from the numbers)."""
        def describe(name: str) -> str:
            e = self.group(name)
            n = f"{int(e.trials)} comparisons" if e.trials is not None else f"{e.n} photos"
            return f"{name} {e.text()} (n={n}, {e.n_clusters} people)"

        out = []
        level = f"{100 * self.difference_ci:.4g}% interval"
        for d in self.differences:
            if not d.supported:
                continue
            better = (d.estimate.value > 0) == self.higher_is_better
            word = "better" if better else "worse"
            out.append(f"{self.metric} by {self.attribute}: {describe(d.a)} is {word} than {describe(d.b)}; "
                       f"difference {d.estimate.text()} ({level} excludes 0).")
        stuck = sorted({g for d in self.differences if d.degenerate and d.estimate.excludes(0.0)
                        for g in (d.a, d.b) if self._constant(g)})
        if stuck:
            out.append(f"{self.metric} by {self.attribute}: not claimed for {', '.join(stuck)}: every photo there "
                       "scored the same, so the bootstrap cannot bound the rate (rule of three: up to 3/n).")
        if self.differences and not out:
            big = max(self.differences, key=lambda d: abs(d.estimate.value))
            out.append(f"{self.metric} by {self.attribute}: no difference is supported — every {level} of a "
                       f"difference covers 0 (largest observed gap {big.a} − {big.b} = {big.estimate.text()}, "
                       f"groups: " + "; ".join(describe(g.group) for g in self.groups) + ").")
        if not self.differences:
            out.append(f"{self.metric} by {self.attribute}: fewer than two groups large enough to compare "
                       f"(groups: " + ("; ".join(describe(g.group) for g in self.groups) or "none") + ").")
        return out


def compare_groups(values: Any, groups: Any, *, weights: Any = None, clusters: Any = None, metric: str = "metric",
                   attribute: str = "group", higher_is_better: bool = True, n_boot: int = 2000, ci: float = 0.95,
                   seed: int = 0, adjust: str = "bonferroni", family: int = 1, min_clusters: int = 10,
                   comparable: Callable[[str, str], bool] | None = None) -> GroupComparison:
    """Each group's ratio-of-sums estimate and every pairwise difference with a bootstrap interval.

    Groups with fewer than ``min_clusters`` people get an estimate but no comparison (listed in
    ``excluded``): a bootstrap over a handful of people under-covers. ``comparable(a, b)`` restricts
    which pairs are compared (e.g. race groups of one dataset only). ``adjust="bonferroni"`` widens the
    difference intervals to level ``1 − (1−ci)/m`` for ``m`` comparisons (pairs × ``family``, the number
    of metrics tested together); ``"none"`` keeps ``ci``.
    """
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
    names = sorted(set(g))
    rng = np.random.default_rng(seed)
    boots: dict[str, np.ndarray] = {}
    estimates: list[GroupEstimate] = []
    excluded: dict[str, int] = {}
    for name in names:
        m = g == name
        num, den = _cluster_totals(v[m], w[m], c[m])
        boots[name] = resampled_ratios(num, den, n_boot, rng)
        lo, hi = percentile_interval(boots[name], ci)
        value = float(num.sum() / den.sum()) if den.sum() > 0 else float("nan")
        estimates.append(GroupEstimate(name, Estimate(value, lo, hi, int(m.sum()), len(num), ci,
                                                      None if weights is None else float(den.sum()))))
        if len(num) < min_clusters:
            excluded[name] = len(num)
    comparable_groups = [e for e in estimates if e.group not in excluded]
    pairs = [(a, b) for a, b in itertools.combinations(comparable_groups, 2)
             if comparable is None or comparable(a.group, b.group)]
    m_adj = max(len(pairs), 1) * max(int(family), 1) if adjust == "bonferroni" else 1
    if adjust not in ("bonferroni", "none"):
        raise FaceLensError(f"adjust must be 'bonferroni' or 'none', got {adjust!r}")
    dci = 1.0 - (1.0 - ci) / m_adj
    diffs = []
    for ea, eb in pairs:
        lo, hi = percentile_interval(boots[ea.group] - boots[eb.group], dci)
        a, b = ea.estimate, eb.estimate
        degenerate = bool(np.nanstd(boots[ea.group]) == 0 or np.nanstd(boots[eb.group]) == 0)
        diffs.append(GroupDifference(ea.group, eb.group, Estimate(a.value - b.value, lo, hi, a.n + b.n,
                                                                  a.n_clusters + b.n_clusters, dci), degenerate))
    return GroupComparison(metric, attribute, estimates, diffs, higher_is_better, ci, dci, excluded)


def audit_predictions(predictions: Any, labels: Any, groups: Any, clusters: Any = None, *,
                      attribute: str = "group", metric: str = "accuracy", **options: Any) -> GroupComparison:
    """Per-group accuracy of ``predictions`` against ``labels`` with bootstrap intervals and differences."""
    p = np.asarray(predictions, dtype=object).ravel()
    y = np.asarray(labels, dtype=object).ravel()
    if p.shape != y.shape:
        raise FaceLensError(f"{len(p)} predictions for {len(y)} labels")
    correct = np.array([a == b for a, b in zip(p, y, strict=True)], np.float64)
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
        return [{"group": g, "balanced_minus_unbalanced": e.value, "ci_low": e.lo, "ci_high": e.hi,
                 "ci_level": round(e.ci, 5), "n_test": e.n, "supported": e.excludes(0.0)}
                for g, e in self.differences.items()]

    def verdicts(self) -> list[str]:
        out = []
        for g, e in self.differences.items():
            ub, b = self.test["unbalanced"][g], self.test["balanced"][g]
            head = (f"Probe (sex from embeddings), {self.attribute} {g} (n={e.n} held-out photos): "
                    f"unbalanced {ub.text()}, balanced {b.text()}")
            if e.excludes(0.0):
                word, mag = ("raises", e) if e.value > 0 else \
                    ("lowers", Estimate(-e.value, -e.hi, -e.lo, e.n, e.n_clusters, e.ci))
                out.append(f"{head}; balancing the training set {word} its accuracy by {mag.text()} "
                           f"({100 * e.ci:.4g}% interval excludes 0).")
            else:
                out.append(f"{head}; no effect of balancing is supported (difference {e.text()} covers 0).")
        return out


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
    repeats, and the balanced − unbalanced difference per group is bootstrapped over held-out people
    with the pairing kept (Bonferroni over the groups).
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
    dci = 1.0 - (1.0 - ci) / len(kept)
    for k, g in enumerate(kept):
        m = grp[test_ix] == g
        for design in counts:
            test[design][g] = cluster_bootstrap(correct[design][m], None, cl[test_ix][m], n_boot=n_boot, ci=ci,
                                                seed=seed + k)
        diffs[g] = paired_difference(correct["balanced"][m], correct["unbalanced"][m], cl[test_ix][m],
                                     n_boot=n_boot, ci=dci, seed=seed + 100 + k)
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
    keys = sorted(per_person)
    err = np.array([per_person[k][0] for k in keys])
    tri = np.array([per_person[k][1] for k in keys])
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(tri > 0, err / np.maximum(tri, 1), np.nan)
    return compare_groups(rate, [pair_groups(k) for k in keys], weights=tri, clusters=keys, metric=metric,
                          attribute=attribute, higher_is_better=False, **opts)


def _same_source(a: str, b: str) -> bool:
    """Race groups are compared only within one dataset (see :func:`group_of`)."""
    return a.split(":", 1)[0] == b.split(":", 1)[0]


def _rows_for(args: argparse.Namespace) -> list[ManifestRow]:
    if getattr(args, "rows", None) is not None:  # rows chosen by the caller (the report's identity sample)
        return list(args.rows)
    if not args.manifest:
        raise FaceLensError("--manifest is required (e.g. ../shared/faces/manifest.csv)")
    rows = read_manifest(args.manifest, datasets=args.datasets)
    return rows[: args.limit] if args.limit else rows


def _forest_figure(comparisons: list[GroupComparison]) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..explain.render import figure_to_rgb

    metrics = list(dict.fromkeys(c.metric for c in comparisons))
    attrs = list(dict.fromkeys(c.attribute for c in comparisons))
    fig, axes = plt.subplots(len(metrics), len(attrs), figsize=(4.2 * len(attrs), 0.5 + 2.1 * len(metrics)),
                             squeeze=False)
    for i, metric in enumerate(metrics):
        for j, attr in enumerate(attrs):
            ax = axes[i, j]
            comp = next((c for c in comparisons if c.metric == metric and c.attribute == attr), None)
            if comp is None or not comp.groups:
                ax.axis("off")
                ax.set_title(f"{metric} by {attr}: no data", fontsize=8)
                continue
            ys = np.arange(len(comp.groups))
            vals = np.array([g.estimate.value for g in comp.groups])
            lo = np.array([g.estimate.lo for g in comp.groups])
            hi = np.array([g.estimate.hi for g in comp.groups])
            flagged = {d.a for d in comp.differences if d.supported} | {d.b for d in comp.differences if d.supported}
            colors = ["#c0392b" if g.group in flagged else "#2c3e50" for g in comp.groups]
            for y, v, a, b, col in zip(ys, vals, lo, hi, colors, strict=True):
                ax.errorbar([v], [y], xerr=[[np.nan_to_num(v - a)], [np.nan_to_num(b - v)]], fmt="none", ecolor=col,
                            capsize=3)
            ax.scatter(vals, ys, c=colors, zorder=3, s=18)
            ax.set_yticks(ys, [f"{g.group} (n={g.estimate.n if g.estimate.trials is None else int(g.estimate.trials)})"
                               for g in comp.groups], fontsize=7)
            ax.tick_params(axis="x", labelsize=7)
            ax.set_title(f"{metric} by {attr}", fontsize=8)
            ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
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


def run_bias(args: argparse.Namespace) -> StudyResult:
    """``facelens audit bias``: see the module docstring."""
    t0 = time.perf_counter()
    rows = _rows_for(args)
    labelled = [r for r in rows if r.sex or r.age is not None or r.race]
    if not labelled:
        raise FaceLensError(f"{args.manifest}: no row has a sex, age or race label; nothing to audit")
    opts = {"n_boot": args.n_boot, "seed": args.seed, "ci": 0.95}
    result = StudyResult("bias", args.model, settings={
        "gender_model": args.gender_model, "age_model": args.age_model, "embedding_model": args.model,
        "n_boot": args.n_boot, "ci": 0.95, "difference_ci": "Bonferroni-adjusted over the pairs of one attribute",
        "age_bands": [b[0] for b in AGE_BANDS], "attention_method": args.attention_method,
        "attention_per_group": args.attention_n, "probe_attribute": args.probe_attribute,
        "probe_majority_share": args.majority_share, "probe_repeats": args.probe_repeats, "seed": args.seed})
    worker = functools.partial(_make_bias_worker, args.gender_model, args.age_model, args.model)
    mapped = map_rows(labelled, worker, executor=args.executor, address=args.address, batch_size=args.batch_size)
    result.failures = [f.as_dict() for f in mapped.failures]
    result.counts = {"rows_in": len(rows), "labelled": len(labelled), "faces": mapped.rows_out,
                     "no_face_or_unreadable": len(mapped.failures)}
    rws, recs = mapped.rows, mapped.records
    people = [cluster_of(r) for r in rws]
    comparisons: list[GroupComparison] = []
    # 1. gender accuracy and 2. age error
    for attr in ATTRIBUTES:
        groups = [group_of(r, attr) for r in rws]
        opts["comparable"] = _same_source if attr == "race" else None
        if args.gender_model:
            correct = [float(rec["gender"] == r.sex) if r.sex in ("female", "male") else np.nan
                       for r, rec in zip(rws, recs, strict=True)]
            comparisons.append(compare_groups(correct, groups, clusters=people, metric=f"{args.gender_model} accuracy",
                                              attribute=attr, **opts))
        if args.age_model:
            err = [abs(rec["age"] - r.age) if r.age is not None else np.nan for r, rec in zip(rws, recs, strict=True)]
            comparisons.append(compare_groups(err, groups, clusters=people, metric=f"{args.age_model} MAE (years)",
                                              attribute=attr, higher_is_better=False, **opts))
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
        for attr in ATTRIBUTES:
            opts["comparable"] = _same_source if attr == "race" else None
            # pairs within a group: score each group's photos among themselves
            gen_all: dict[str, list[float]] = {}
            imp_all: dict[str, list[float]] = {}
            labels = {}
            for grp in sorted({group_of(r, attr) for r in vr} - {None}):
                idx = [i for i, r in enumerate(vr) if group_of(r, attr) == grp]
                gen, imp = _verification_trials([vr[i] for i in idx], emb[idx], threshold)
                for k, v in gen.items():
                    gen_all[f"{grp}|{k}"] = v
                    labels[f"{grp}|{k}"] = grp
                for k, v in imp.items():
                    imp_all[f"{grp}|{k}"] = v
                    labels[f"{grp}|{k}"] = grp
            if gen_all:
                comparisons.append(_rate_comparison(gen_all, attr, f"{args.model} FNMR", opts, labels.get))
            if imp_all:
                comparisons.append(_rate_comparison(imp_all, attr, f"{args.model} FMR", opts, labels.get))
        result.notes.append(f"Verification: one global threshold, L2 distance < {threshold} (the model's own); "
                            "genuine pairs = every pair of photos of one person; impostor pairs = every pair of "
                            "photos of two different people of the same group; rows without an identity "
                            "(UTKFace) are left out because two of their photos may show one person.")
    opts.pop("comparable", None)
    result.tables["group_metrics"] = [row for c in comparisons for row in c.group_rows()]
    result.tables["group_differences"] = [row for c in comparisons for row in c.difference_rows()]
    for c in comparisons:
        result.verdicts.extend(c.verdicts())
        if c.excluded:
            result.notes.append(f"{c.metric} by {c.attribute}: groups with fewer than 10 people are shown but not "
                                f"compared: " + ", ".join(f"{g} ({n})" for g, n in c.excluded.items()))
    summary: dict[str, Any] = {}
    for c in comparisons:
        summary[f"{c.metric} | {c.attribute}"] = {g.group: {"value": g.estimate.value, "ci": [g.estimate.lo,
                                                  g.estimate.hi], "n": g.estimate.n, "people": g.estimate.n_clusters}
                                                  for g in c.groups}
    if comparisons:
        result.add_figure("groups", _forest_figure(comparisons),
                          "Each dot is a group's score (accuracy: higher is better; age error, FNMR and FMR: lower "
                          "is better) with its 95% bootstrap interval (resampled by person); n = photos "
                          "(FNMR/FMR: comparisons). Red marks a group in a difference the data support (the "
                          "interval of the difference excludes 0); overlapping bars alone prove nothing.")
    # 4. attention per group (small sample)
    if args.attention_n > 0:
        _attention(result, args, rws, opts)
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
                                    g: {"value": e.value, "ci": [e.lo, e.hi]} for g, e in probe.differences.items()}}
            result.add_figure("probe", _probe_figure(probe),
                              f"A simple classifier (logistic regression) reads sex from {args.model}'s face "
                              f"embeddings. Orange: trained on {probe.train_size} photos, "
                              f"{probe.train_counts['unbalanced'][probe.majority]} of them {probe.majority}; blue: the "
                              "same number of photos, equal from every "
                              f"{args.probe_attribute} group. Dots are accuracy on people never seen in training, "
                              "bars 95% bootstrap intervals; a group whose blue dot is clearly above its orange "
                              "one is hurt by being under-represented.")
    result.summary = summary
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


def _attention(result: StudyResult, args: argparse.Namespace, rws: list[ManifestRow], opts: dict[str, Any]) -> None:
    """Region attention and canonical maps per group of ``--attention-attribute`` (small seeded sample)."""
    attr = args.attention_attribute
    rng = np.random.default_rng(args.seed)
    chosen: list[ManifestRow] = []
    for grp in sorted({group_of(r, attr) for r in rws} - {None}):
        cand = [r for r in rws if group_of(r, attr) == grp]
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
    groups = [group_of(r, attr) for r in mapped.rows]
    comps = []
    regions = list(_ATTENTION_REGIONS)
    m = len(regions)
    for region in regions:
        vals = [rec["shares"][region] for rec in mapped.records]
        comps.append(compare_groups(vals, groups, clusters=[cluster_of(r) for r in mapped.rows],
                                    metric=f"attention share: {region}", attribute=attr, family=m, **opts))
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
    supported = [v for c in comps for v in c.verdicts() if "is better" in v or "is worse" in v]
    n_by = {g: groups.count(g) for g in sorted(set(groups))}
    if supported:
        result.verdicts.extend(s.replace("is better than", "gets a larger share than")
                               .replace("is worse than", "gets a smaller share than") for s in supported)
    elif not any(c.differences for c in comps):
        result.verdicts.append(f"Attention ({args.attention_method} on {args.model}) by {attr}: too few people per "
                               f"group to compare (n per group: {n_by}; at least 10 needed).")
    else:
        result.verdicts.append(f"Attention ({args.attention_method} on {args.model}) by {attr}: no region's share "
                               f"differs between groups beyond its interval (n per group: {n_by}; intervals "
                               f"adjusted over {m} regions and every pair).")
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


register_study(StudySpec("bias", "demographic bias audit: per-group accuracy, age error, FNMR/FMR, attention, "
                         "and the sex-probe experiment, with bootstrap intervals", run_bias, _add_args))
