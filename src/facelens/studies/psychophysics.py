"""Visual psychophysics for face models: item-response curves and the biometric zoo.

After RichardWebster et al. (ECCV 2018, "Visual Psychophysics for Making Face Recognition Algorithms
More Explainable"): degrade the probe photo step by step (blur, noise, contrast, brightness,
occlusion, JPEG, rotation; see :mod:`facelens.studies.perturbations`) and record how often the model
still gets it right. The result per perturbation is an **item-response curve** (rate vs level).

What "right" means depends on the model:

- recognizer, ``identification`` (default): rank-1 of the perturbed probe against an **unperturbed**
  gallery holding one *other* photo of every identity (closed set). Chance = 1 / gallery size.
- recognizer, ``verification``: the share of genuine pairs (perturbed probe vs its own gallery photo)
  accepted at the model's threshold. Chance = the clean impostor accept rate (FMR) at that threshold,
  i.e. what a matcher that saw no face would still accept.
- classifier: agreement of the perturbed top-1 with the unperturbed top-1. Chance = the share of the
  most frequent clean answer (what a constant answer would agree with).

Two numbers summarize a curve: the **criterion level**, where the rate first falls below the criterion
(default: half-way between the clean rate and chance), linearly interpolated between sweep levels
(NaN when the sweep never gets there); and the **normalized area under the curve**, the trapezoidal
area over the sweep's level range divided by that range (1 = perfect at every level). The band is the
95% interval of each rate (:func:`facelens.evaluate.stats.rate_interval`: Wilson, widened to the
identity bootstrap when a person has several probes; never of zero width).

The crossing gets a 95% interval too (:func:`crossing_interval`): identities are resampled, the whole
curve is recomputed and the crossing found again, with the criterion held at its full-sample value; its
upper end is "beyond the sweep" when too many resamples never cross. The verdict per perturbation is
decided on the rate at the **last level** (:func:`facelens.evaluate.verdict.decide`): "still above the
criterion at the end of the sweep" is *supported* only when that rate's whole interval lies above the
criterion, *not supported* when it lies below (the curve does cross it, and the crossing is quoted with its
interval), and *inconclusive* when the interval contains the criterion or rests on fewer than 8 identities.

**Herding** (Doddington's zoo, on clean probes vs the gallery): with per-identity means of genuine
scores (its probes vs its own gallery photo), of impostor scores *against* it (other identities'
probes vs its gallery photo) and of impostor scores *as a probe* (its probes vs others' gallery
photos), an identity is a **goat** when its mean genuine score is in the lowest ``quantile``, a **lamb**
when its mean impostor-against score is in the highest ``quantile`` (easily imitated), a **wolf** when
its mean impostor-as-probe score is in the highest ``quantile`` (imitates others), and a **sheep**
otherwise. An identity in several tails takes the first of goat, lamb, wolf as its category (so the
categories partition the identities) and keeps all its flags.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..datasets import ManifestRow, read_manifest
from ..errors import FaceLensError
from ..evaluate.stats import CI, Estimate, rate_interval
from ..evaluate.verdict import Verdict, decide
from .base import StudyResult, StudySpec, register_study
from .bias import cluster_of
from .perturbations import PERTURBATIONS, Perturbation, get_perturbation

__all__ = [
    "DEFAULT_DATASETS",
    "Curve",
    "HerdMember",
    "PsychophysicsResult",
    "criterion_level",
    "crossing_interval",
    "curve_verdict",
    "format_level",
    "herding",
    "item_response_curve",
    "item_response_curves",
    "normalized_auc",
    "run_psychophysics",
    "split_gallery_probes",
]

Mode = Literal["auto", "identification", "verification"]
#: datasets of the shared bundle used when none are named: several photos per identity, and no two
#: identities that are the same person (the README warns that frl_lisa and frl_zoom probably are).
DEFAULT_DATASETS: tuple[str, ...] = ("frl_london", "orl")
HERD_ORDER: tuple[str, ...] = ("goat", "lamb", "wolf", "sheep")
_PLURAL = {"goat": "goats", "lamb": "lambs", "wolf": "wolves", "sheep": "sheep"}


def criterion_level(levels: Sequence[float] | np.ndarray, rates: Sequence[float] | np.ndarray,
                    criterion: float) -> float:
    """The level where ``rates`` first drop below ``criterion``, linearly interpolated along the sweep.

    ``levels`` are in sweep order (from none to destroyed, increasing or decreasing). Returns the first
    level when the rate starts below the criterion and NaN when it never falls below it.
    """
    lv = np.asarray(levels, np.float64)
    r = np.asarray(rates, np.float64)
    below = np.flatnonzero(r < criterion)
    if len(below) == 0:
        return float("nan")
    k = int(below[0])
    if k == 0:
        return float(lv[0])
    r0, r1 = r[k - 1], r[k]
    t = (r0 - criterion) / (r0 - r1) if r0 != r1 else 0.0
    return float(lv[k - 1] + t * (lv[k] - lv[k - 1]))


def normalized_auc(levels: Sequence[float] | np.ndarray, rates: Sequence[float] | np.ndarray) -> float:
    """Trapezoidal area under rate vs level, divided by the level range (so a constant rate r gives r)."""
    lv = np.asarray(levels, np.float64)
    r = np.asarray(rates, np.float64)
    if len(lv) < 2 or lv[-1] == lv[0]:
        return float(r[0]) if len(r) else float("nan")
    return float(np.sum((r[1:] + r[:-1]) / 2 * np.diff(lv)) / (lv[-1] - lv[0]))


def _crossing_positions(rates: np.ndarray, criterion: float) -> np.ndarray:
    """Per row of ``rates`` (replicates × levels): the fractional sweep position where the rate first falls
    below ``criterion`` (as :func:`criterion_level`), +inf when it never does."""
    r = np.atleast_2d(np.asarray(rates, np.float64))
    below = r < criterion
    crossed = below.any(1)
    k = np.where(crossed, below.argmax(1), 0)
    rows = np.arange(len(r))
    r0 = r[rows, np.maximum(k - 1, 0)]
    r1 = r[rows, k]
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(r0 != r1, (r0 - criterion) / (r0 - r1), 0.0)
    pos = np.where(k == 0, 0.0, k - 1 + t)
    return np.where(crossed, pos, np.inf)


def _level_at(levels: np.ndarray, pos: float) -> float:
    """The level at a fractional sweep position (linear between neighbouring levels)."""
    k = int(np.clip(np.floor(pos), 0, len(levels) - 1))
    if k >= len(levels) - 1:
        return float(levels[-1])
    return float(levels[k] + (pos - k) * (levels[k + 1] - levels[k]))


def crossing_interval(levels: Sequence[float] | np.ndarray, hits: np.ndarray, clusters: Sequence[str] | np.ndarray,
                      criterion: float, *, n_boot: int = 1000, seed: int = 0,
                      ci: float = CI) -> tuple[float, float, bool]:
    """The ``ci`` interval of the criterion level: a percentile bootstrap over identities.

    ``hits`` is probes × levels (1 = right). Each replicate resamples identities with their probes,
    recomputes the rate at every level and finds the crossing again (criterion held fixed). Returns
    ``(low, high, beyond)`` in sweep order (for decreasing levels such as JPEG quality ``low`` is the larger
    number): ``beyond`` is True when the far end lies past the sweep (too many replicates never fall below
    the criterion), and ``high`` is then NaN. When every replicate crosses at the same point (the rate jumps
    across the criterion between two levels for everyone), the interval is the two sweep levels around it:
    the sweep resolves no finer than its grid. ``(NaN, NaN, True)`` when no replicate crosses at all.
    """
    lv = np.asarray(levels, np.float64)
    h = np.asarray(hits, np.float64)
    _, inv = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    per_hits = np.stack([np.bincount(inv, weights=h[:, j]) for j in range(h.shape[1])], axis=1)
    per_n = np.bincount(inv).astype(np.float64)
    idx = np.random.default_rng(seed).integers(0, len(per_n), size=(n_boot, len(per_n)))
    rates = per_hits[idx].sum(1) / per_n[idx].sum(1)[:, None]
    pos = _crossing_positions(rates, criterion)
    a = (1.0 - ci) / 2
    lo_pos = float(np.quantile(pos, a, method="inverted_cdf"))
    hi_pos = float(np.quantile(pos, 1 - a, method="inverted_cdf"))
    if not np.isfinite(lo_pos):
        return float("nan"), float("nan"), True
    if hi_pos == lo_pos:  # no spread: the grid is the resolution
        lo_pos, hi_pos = (lo_pos - 1, lo_pos + 1) if lo_pos == np.floor(lo_pos) else \
            (float(np.floor(lo_pos)), float(np.ceil(lo_pos)))
        lo_pos, hi_pos = max(lo_pos, 0.0), min(hi_pos, len(lv) - 1.0)
    if not np.isfinite(hi_pos):
        return _level_at(lv, lo_pos), float("nan"), True
    return _level_at(lv, lo_pos), _level_at(lv, hi_pos), False


def format_level(x: float) -> str:
    """A sweep level to two significant figures (whole numbers from 10 up): the crossing is interpolated
    between sweep levels and rests on a few dozen people, so a third figure would be noise."""
    if not np.isfinite(x):
        return "n/a"
    if abs(x) >= 10:
        return f"{x:.0f}"
    return f"{float(f'{x:.2g}'):g}"


@dataclass
class Curve:
    """One item-response curve: the rate (with its 95% interval) at each level of one perturbation, the
    criterion crossing with its interval, and the verdict on the last level (see the module docstring)."""

    perturbation: str
    unit: str
    levels: np.ndarray
    rates: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n: int
    clean_rate: float
    chance: float
    criterion: float
    criterion_level: float
    auc: float
    n_identities: int = 0
    crossing_from: float = float("nan")  # the crossing's 95% interval in sweep order (JPEG: from ≥ to)
    crossing_to: float = float("nan")
    crossing_beyond: bool = False
    verdict: Verdict | None = None
    clean_ci: tuple[float, float] = (float("nan"), float("nan"))  # the clean rate's 95% interval

    def rows(self) -> list[dict[str, Any]]:
        return [{"perturbation": self.perturbation, "level": float(lv), "unit": self.unit, "rate": float(r),
                 "ci_low": float(a), "ci_high": float(b), "n": self.n, "identities": self.n_identities}
                for lv, r, a, b in zip(self.levels, self.rates, self.lo, self.hi, strict=True)]

    def summary(self) -> dict[str, Any]:
        """Flat (CSV-friendly): a crossing whose upper end lies past the sweep has ``criterion_level_ci_high``
        NaN and ``crossing_beyond_sweep`` True."""
        return {"perturbation": self.perturbation, "unit": self.unit, "criterion": self.criterion,
                "criterion_level": self.criterion_level, **self._crossing_bounds(),
                "crossing_beyond_sweep": self.crossing_beyond,
                "auc": self.auc, "clean_rate": self.clean_rate, "clean_rate_ci_low": float(self.clean_ci[0]),
                "clean_rate_ci_high": float(self.clean_ci[1]), "chance": self.chance,
                "rate_at_last_level": float(self.rates[-1]), "rate_at_last_level_ci_low": float(self.lo[-1]),
                "rate_at_last_level_ci_high": float(self.hi[-1]), "last_level": float(self.levels[-1]),
                "n": self.n, "identities": self.n_identities,
                "still_above_at_last_level": self.verdict.status if self.verdict else None}

    def _crossing_bounds(self) -> dict[str, float]:
        """The crossing interval as numeric low/high (the side past the sweep's end is NaN)."""
        ends = [self.crossing_from, self.levels[-1] if self.crossing_beyond else self.crossing_to]
        lo, hi = min(ends), max(ends)
        increasing = self.levels[-1] >= self.levels[0]
        if self.crossing_beyond:
            lo, hi = (lo, float("nan")) if increasing else (float("nan"), hi)
        return {"criterion_level_ci_low": float(lo), "criterion_level_ci_high": float(hi)}

    def crossing_text(self) -> str:
        """``0.14 (95% interval 0.13 to 0.16)`` in numeric order, or ``… from 6 to beyond the end of the sweep``,
        at two significant figures."""
        x = format_level(self.criterion_level)
        if not np.isfinite(self.crossing_from):
            return x
        if self.crossing_beyond:
            return f"{x} (95% interval from {format_level(self.crossing_from)} to beyond the end of the sweep)"
        lo, hi = sorted((self.crossing_from, self.crossing_to))
        return f"{x} (95% interval {format_level(lo)} to {format_level(hi)})"

    def sentence(self) -> str:
        """The verdict sentence, then plain words that follow from its status alone, then the AUC."""
        if self.verdict is None:
            return f"{self.perturbation}: no verdict."
        status = self.verdict.status
        if status == "supported" and np.isfinite(self.criterion_level):  # a curve that dips and recovers
            words = (f"The rate is above the criterion at the end of the sweep, though its point estimate dips "
                     f"below it on the way, at {self.unit} = {format_level(self.criterion_level)}.")
        elif status == "supported":
            words = (f"The rate stays above the criterion over the whole sweep, to {self.unit} = "
                     f"{format_level(self.levels[-1])}.")
        elif status == "not supported":
            words = f"It falls below the criterion at {self.unit} = {self.crossing_text()}."
        else:
            words = "Whether it falls below the criterion within the sweep cannot be told from these photos"
            words += (f"; the point estimate crosses at {self.unit} = {self.crossing_text()}."
                      if np.isfinite(self.criterion_level) else ".")
        return f"{self.verdict.sentence()} {words} Normalized AUC {self.auc:.2f}."


def curve_verdict(perturbation: str, last: Estimate, criterion: float, last_level: float, unit: str,
                  what: str = "rate") -> Verdict:
    """The claim "the rate is still above the criterion at the end of the sweep", decided on its interval."""
    return decide(f"{perturbation}: the {what} is still above the criterion {criterion:.3f} at the end of the "
                  f"sweep ({unit} = {format_level(last_level)})", last, criterion, unit="identities")


@dataclass(frozen=True)
class HerdMember:
    """An identity's place in the zoo (see the module docstring for the definition)."""

    identity: str
    category: str
    mean_genuine: float
    mean_impostor_against: float
    mean_impostor_as_probe: float
    goat: bool
    lamb: bool
    wolf: bool

    def as_dict(self) -> dict[str, Any]:
        return {"identity": self.identity, "category": self.category, "mean_genuine": self.mean_genuine,
                "mean_impostor_against": self.mean_impostor_against,
                "mean_impostor_as_probe": self.mean_impostor_as_probe, "goat": self.goat, "lamb": self.lamb,
                "wolf": self.wolf}


def herding(scores: np.ndarray, probe_ids: Sequence[str], gallery_ids: Sequence[str],
            quantile: float = 0.25) -> list[HerdMember]:
    """Goats, lambs, wolves and sheep from a probes × gallery score matrix (higher = more alike).

    Every gallery identity needs at least one probe; see the module docstring for the definition.
    """
    s = np.asarray(scores, np.float64)
    pid = np.asarray(probe_ids, dtype=object)
    gid = list(gallery_ids)
    if s.shape != (len(pid), len(gid)):
        raise FaceLensError(f"scores are {s.shape}, expected {len(pid)} probes × {len(gid)} gallery identities")
    if len(set(gid)) != len(gid) or len(gid) < 2:
        raise FaceLensError("herding needs at least two distinct gallery identities, one photo each")
    if not 0 < quantile < 0.5:
        raise FaceLensError(f"the herding quantile must lie in (0, 0.5), got {quantile}")
    same = pid[:, None] == np.asarray(gid, dtype=object)[None, :]
    if not same.any(0).all():
        missing = [g for g, ok in zip(gid, same.any(0), strict=True) if not ok]
        raise FaceLensError(f"gallery identities without a probe: {missing[:5]}")
    genuine = np.array([s[same[:, j], j].mean() for j in range(len(gid))])
    against = np.array([s[~same[:, j], j].mean() for j in range(len(gid))])
    as_probe = np.array([s[same[:, j]][:, np.arange(len(gid)) != j].mean() for j in range(len(gid))])
    goat = genuine <= np.quantile(genuine, quantile)
    lamb = against >= np.quantile(against, 1 - quantile)
    wolf = as_probe >= np.quantile(as_probe, 1 - quantile)
    out = []
    for j, name in enumerate(gid):
        cat = "goat" if goat[j] else "lamb" if lamb[j] else "wolf" if wolf[j] else "sheep"
        out.append(HerdMember(str(name), cat, float(genuine[j]), float(against[j]), float(as_probe[j]),
                              bool(goat[j]), bool(lamb[j]), bool(wolf[j])))
    return out


@dataclass
class PsychophysicsResult:
    """Curves per perturbation, the zoo (recognizers), and how the rates were defined."""

    model: str
    mode: str
    curves: dict[str, Curve]
    herd: list[HerdMember] | None
    n_gallery: int
    n_probes: int
    threshold: float | None = None
    failures: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def split_gallery_probes(rows: Sequence[ManifestRow], probes_per_identity: int = 1, max_identities: int | None = None,
                         seed: int = 0) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """One gallery photo per identity (the first by path) and up to ``probes_per_identity`` other photos.

    Identities are keyed by dataset and identity label; those with a single photo are left out.
    ``max_identities`` keeps a seeded random subset.
    """
    by_id: dict[str, list[ManifestRow]] = {}
    for r in rows:
        if r.identity:
            by_id.setdefault(cluster_of(r), []).append(r)
    keys = sorted(k for k, v in by_id.items() if len(v) >= 2)
    if max_identities and len(keys) > max_identities:
        rng = np.random.default_rng(seed)
        keys = sorted(rng.choice(keys, size=max_identities, replace=False).tolist())
    gallery, probes = [], []
    for k in keys:
        photos = sorted(by_id[k], key=lambda r: str(r.path))
        gallery.append(photos[0])
        probes.extend(photos[1:1 + probes_per_identity])
    return gallery, probes


def _sweeps(perturbations: Mapping[str, Sequence[float]] | Sequence[str] | None) -> dict[str, tuple[float, ...]]:
    if perturbations is None:
        return {name: p.levels for name, p in PERTURBATIONS.items()}
    if isinstance(perturbations, Mapping):
        return {name: tuple(float(x) for x in (lv if lv is not None else get_perturbation(name).levels))
                for name, lv in perturbations.items() if get_perturbation(name)}
    return {name: get_perturbation(name).levels for name in perturbations}


def _variants(sweeps: dict[str, tuple[float, ...]], occlusion_mode: str, seed: int) -> list[tuple[str, Any]]:
    variants: list[tuple[str, Any]] = [("original", None)]
    for name, levels in sweeps.items():
        p = PERTURBATIONS[name]
        opts: dict[str, object] = {}
        if name == "noise":
            opts = {"seed": seed}
        elif name == "occlusion":
            opts = {"mode": occlusion_mode, "seed": seed}
        for lv in levels:
            if lv == p.none and p.is_identity_at_none:
                continue  # the unperturbed chip: the "original" variant
            variants.append((p.label(lv), p.at(lv, **opts)))
    return variants


def item_response_curve(p: Perturbation, levels: Sequence[float], correct: dict[str, np.ndarray],
                        clusters: np.ndarray, chance: float, criterion: float | None, n_boot: int, seed: int,
                        what: str = "rate") -> Curve:
    """One perturbation's curve from per-probe hits (``correct[variant]``, 1 = right) and each probe's identity:
    rates with intervals, the criterion (default half-way from the clean rate to ``chance``), the crossing with
    its interval, and the verdict on the last level."""
    estimates: list[Estimate] = []
    keys = ["original" if (lv == p.none and p.is_identity_at_none) else p.label(lv) for lv in levels]
    for k, key in enumerate(keys):
        estimates.append(rate_interval(correct[key], clusters, n_boot=n_boot, seed=seed + k))
    clean_e = rate_interval(correct["original"], clusters, n_boot=n_boot, seed=seed)
    clean = clean_e.value
    crit = chance + 0.5 * (clean - chance) if criterion is None else float(criterion)
    lv = np.asarray(levels, np.float64)
    r = np.asarray([e.value for e in estimates])
    hits = np.stack([np.asarray(correct[key], np.float64) for key in keys], axis=1)
    lo, hi, beyond = crossing_interval(lv, hits, clusters, crit, n_boot=n_boot, seed=seed)
    return Curve(p.name, p.unit, lv, r, np.asarray([e.lo for e in estimates]), np.asarray([e.hi for e in estimates]),
                 len(clusters), clean, float(chance), crit, criterion_level(lv, r, crit), normalized_auc(lv, r),
                 estimates[-1].n_clusters, lo, hi, beyond,
                 curve_verdict(p.name, estimates[-1], crit, float(lv[-1]), p.unit, what), (clean_e.lo, clean_e.hi))


def item_response_curves(rows: Sequence[ManifestRow], model_name: str, *,
                         perturbations: Mapping[str, Sequence[float]] | Sequence[str] | None = None,
                         mode: Mode = "auto", criterion: float | None = None, probes_per_identity: int = 1,
                         max_identities: int | None = None, occlusion_mode: str = "random",
                         herd_quantile: float = 0.25, n_boot: int = 1000, seed: int = 0, executor: str = "local",
                         address: str | None = None, batch_size: int = 16) -> PsychophysicsResult:
    """Sweep every perturbation's levels and measure the rate at each (see the module docstring)."""
    from ..matching import Matcher, pairwise_scores
    from ..models import load_model
    from .features import extract

    t0 = time.perf_counter()
    model = load_model(model_name)
    sweeps = _sweeps(perturbations)
    variants = _variants(sweeps, occlusion_mode, seed)
    failures: list[dict[str, str]] = []
    if model.task == "classification":
        if mode not in ("auto",):
            raise FaceLensError(f"{model_name} is a classifier: its curves measure agreement with its clean answer; "
                                f"mode {mode!r} applies to recognizers")
        photos = list(rows)
        if max_identities:
            photos = photos[:max_identities]
        res = extract(photos, model_name, variants, executor=executor, address=address,
                      batch_size=max(1, min(batch_size, 64 // len(variants))))
        failures = [f.as_dict() for f in res.failures]
        if not res.records:
            raise FaceLensError("no usable face among the rows")
        top = {k: np.array([int(np.argmax(r.outputs[k])) for r in res.records]) for k, _ in variants}
        correct = {k: (v == top["original"]).astype(float) for k, v in top.items()}
        chance = float(np.bincount(top["original"]).max() / len(top["original"]))
        clusters = np.array([cluster_of(r) for r in res.rows], dtype=object)
        curves = {n: item_response_curve(PERTURBATIONS[n], lv, correct, clusters, chance, criterion, n_boot, seed,
                                         "agreement with the clean answer")
                  for n, lv in sweeps.items()}
        return PsychophysicsResult(model_name, "agreement", curves, None, 0, len(res.records), None, failures,
                                   time.perf_counter() - t0)
    mode = "identification" if mode == "auto" else mode
    if mode not in ("identification", "verification"):
        raise FaceLensError(f"mode must be 'identification' or 'verification', got {mode!r}")
    gallery_rows, probe_rows = split_gallery_probes(rows, probes_per_identity, max_identities, seed)
    if len(gallery_rows) < 2:
        raise FaceLensError("psychophysics needs at least two identities with two or more photos each "
                            f"(the rows have {len(gallery_rows)})")
    g_res = extract(gallery_rows, model_name, [("original", None)], executor=executor, address=address,
                    batch_size=batch_size)
    # the worker runs one forward over rows × variants; keep that near 64 chips (a 960-chip batch ran 3× slower)
    rows_per_batch = max(1, min(batch_size, 64 // len(variants)))
    p_res = extract(probe_rows, model_name, variants, executor=executor, address=address, batch_size=rows_per_batch)
    failures = [f.as_dict() for f in (*g_res.failures, *p_res.failures)]
    g_ids = [cluster_of(r) for r in g_res.rows]
    keep = [i for i, r in enumerate(p_res.rows) if cluster_of(r) in set(g_ids)]
    if len(g_ids) < 2 or not keep:
        raise FaceLensError("too few usable faces: need two gallery identities and probes of them")
    p_ids = np.array([cluster_of(p_res.rows[i]) for i in keep], dtype=object)
    gallery = np.stack([r.outputs["original"] for r in g_res.records])
    matcher = Matcher.for_model(model)
    own = np.array([g_ids.index(p) for p in p_ids])
    correct: dict[str, np.ndarray] = {}
    threshold = matcher.score_threshold
    if mode == "verification" and threshold is None:
        clean = pairwise_scores(np.stack([p_res.records[i].outputs["original"] for i in keep]), gallery,
                                matcher.metric)
        from ..evaluate.verification import roc

        far, tar, thr = roc(clean[np.arange(len(keep)), own], clean[p_ids[:, None] != np.array(g_ids)[None, :]])
        threshold = float(thr[int(np.argmin(np.abs(far - (1 - tar))))])
    clean_scores = None
    for name, _ in variants:
        q = np.stack([p_res.records[i].outputs[name] for i in keep])
        s = pairwise_scores(q, gallery, matcher.metric)
        if name == "original":
            clean_scores = s
        if mode == "identification":
            correct[name] = (s.argmax(1) == own).astype(float)
        else:
            correct[name] = (s[np.arange(len(keep)), own] >= threshold).astype(float)
    assert clean_scores is not None
    if mode == "identification":
        chance = 1.0 / len(g_ids)
    else:
        impostor = clean_scores[p_ids[:, None] != np.array(g_ids, dtype=object)[None, :]]
        chance = float(np.mean(impostor >= threshold))
    what = "rank-1 rate" if mode == "identification" else "genuine accept rate"
    curves = {n: item_response_curve(PERTURBATIONS[n], lv, correct, p_ids, chance, criterion, n_boot, seed, what)
              for n, lv in sweeps.items()}
    with_probe = [j for j, g in enumerate(g_ids) if g in set(p_ids)]
    herd = herding(clean_scores[:, with_probe], list(p_ids), [g_ids[j] for j in with_probe], herd_quantile) \
        if len(with_probe) >= 4 else None
    return PsychophysicsResult(model_name, mode, curves, herd, len(g_ids), len(keep), threshold, failures,
                               time.perf_counter() - t0)


# -- figures and the study ------------------------------------------------------------------------------------
def _curves_figure(res: PsychophysicsResult) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..explain.render import figure_to_rgb

    curves = list(res.curves.values())
    cols = 4
    rows = (len(curves) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.8 * rows), squeeze=False)
    for ax, c in zip(axes.flat, curves, strict=False):
        ax.fill_between(c.levels, c.lo, c.hi, color="#3498db", alpha=0.25, lw=0)
        ax.plot(c.levels, c.rates, "o-", color="#1f4e79", ms=3)
        ax.axhline(c.chance, color="grey", ls=":", lw=1)
        ax.axhline(c.criterion, color="#c0392b", ls="--", lw=1)
        if np.isfinite(c.criterion_level):
            ax.axvline(c.criterion_level, color="#c0392b", lw=1, alpha=0.6)
            if np.isfinite(c.crossing_from):  # the crossing's interval, to the sweep's end when it lies beyond
                ax.axvspan(c.crossing_from, c.levels[-1] if c.crossing_beyond else c.crossing_to, color="#c0392b",
                           alpha=0.12, lw=0)
        if c.levels[-1] < c.levels[0]:
            ax.invert_xaxis()  # destruction always grows to the right
        status = c.verdict.status if c.verdict else "inconclusive"
        lvl = {"supported": "above criterion at the end",
               "not supported": f"crosses at {format_level(c.criterion_level)}"}.get(status, "crossing undecided")
        ax.set_title(f"{c.perturbation}: {lvl}, AUC {c.auc:.2f}", fontsize=8)
        ax.set_xlabel(c.unit, fontsize=7)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    if len(curves) < rows * cols:
        ax = list(axes.flat)[len(curves)]
        ax.plot([], [], "o-", color="#1f4e79", label=f"{res.mode} rate")
        ax.fill_between([], [], [], color="#3498db", alpha=0.25, label="95% interval of each rate")
        ax.plot([], [], ls="--", color="#c0392b", label="criterion")
        ax.fill_between([], [], [], color="#c0392b", alpha=0.12, label="95% interval of the crossing")
        ax.plot([], [], ls=":", color="grey", label="chance")
        ax.legend(loc="center", fontsize=8, frameon=False)
    axes.flat[0].set_ylabel(f"{res.mode} rate", fontsize=8)
    fig.tight_layout()
    return figure_to_rgb(fig)


def _examples_figure(model_name: str, row: ManifestRow, sweeps: dict[str, tuple[float, ...]], occlusion_mode: str,
                     seed: int) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..explain.render import figure_to_rgb
    from ..models import load_model

    chip = load_model(model_name).chip(row.path)
    if chip.face is None:
        raise FaceLensError(f"{row.path}: no face for the example strip")
    cols = max(len(v) for v in sweeps.values())
    fig, axes = plt.subplots(len(sweeps), cols, figsize=(1.05 * cols, 1.15 * len(sweeps)), squeeze=False)
    for i, (name, levels) in enumerate(sweeps.items()):
        opts: dict[str, object] = {"seed": seed} if name == "noise" else \
            {"mode": occlusion_mode, "seed": seed} if name == "occlusion" else {}
        for j in range(cols):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(levels):
                ax.imshow(PERTURBATIONS[name].at(levels[j], **opts)(chip.image, chip.landmarks))
                ax.set_title(f"{name} {levels[j]:g}", fontsize=6)
    fig.tight_layout(pad=0.2)
    return figure_to_rgb(fig)


def _herd_figure(herd: list[HerdMember]) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..explain.render import figure_to_rgb

    colors = {"goat": "#e67e22", "lamb": "#8e44ad", "wolf": "#c0392b", "sheep": "#95a5a6"}
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4))
    for cat in HERD_ORDER:
        ms = [m for m in herd if m.category == cat]
        if not ms:
            continue
        label = f"{cat} ({len(ms)})"
        axes[0].scatter([m.mean_genuine for m in ms], [m.mean_impostor_against for m in ms], c=colors[cat], s=16,
                        label=label)
        axes[1].scatter([m.mean_genuine for m in ms], [m.mean_impostor_as_probe for m in ms], c=colors[cat], s=16,
                        label=label)
    axes[0].set_ylabel("mean impostor score against it", fontsize=8)
    axes[1].set_ylabel("mean impostor score as a probe", fontsize=8)
    for ax in axes:
        ax.set_xlabel("mean genuine score (higher = more alike)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return figure_to_rgb(fig)


def run_psychophysics(args: argparse.Namespace) -> StudyResult:
    """``facelens audit psychophysics``: curves, criterion levels, AUCs and the zoo as a :class:`StudyResult`."""
    if not args.manifest:
        raise FaceLensError("--manifest is required (e.g. ../shared/faces/manifest.csv)")
    datasets = args.datasets
    note = None
    if datasets is None:
        present = {r.dataset for r in read_manifest(args.manifest)}
        if present & set(DEFAULT_DATASETS):
            datasets = [d for d in DEFAULT_DATASETS if d in present]
            note = (f"No --datasets given: used {', '.join(datasets)} (several photos per person, and no two "
                    "identities known to be one person).")
    rows = read_manifest(args.manifest, datasets=datasets)
    rows = rows[: args.limit] if args.limit else rows
    names = [n.strip() for n in args.perturbations.split(",") if n.strip()] if args.perturbations else None
    res = item_response_curves(rows, args.model, perturbations=names, mode=args.mode, criterion=args.criterion,
                               probes_per_identity=args.probes_per_identity, max_identities=args.max_identities or None,
                               occlusion_mode=args.occlusion, herd_quantile=args.herd_quantile, n_boot=args.n_boot,
                               seed=args.seed, executor=args.executor, address=args.address,
                               batch_size=args.batch_size)
    out = StudyResult("psychophysics", args.model, settings={
        "mode": res.mode, "criterion": args.criterion if args.criterion is not None else "half-way clean→chance",
        "perturbations": {n: c.levels.tolist() for n, c in res.curves.items()}, "probes_per_identity":
        args.probes_per_identity, "max_identities": args.max_identities, "occlusion": args.occlusion,
        "herd_quantile": args.herd_quantile, "n_boot": args.n_boot, "seed": args.seed, "datasets": datasets,
        "threshold_score": res.threshold})
    out.failures = res.failures
    out.counts = {"rows": len(rows), "gallery": res.n_gallery, "probes": res.n_probes, "skipped": len(res.failures)}
    out.summary = {"mode": res.mode, "curves": {n: c.summary() for n, c in res.curves.items()}}
    out.tables["curves"] = [r for c in res.curves.values() for r in c.rows()]
    out.tables["criterion"] = [c.summary() for c in res.curves.values()]
    clean = next(iter(res.curves.values()))
    what = {"identification": f"rank-1 identification against a clean gallery of {res.n_gallery} people",
            "verification": "genuine pairs accepted at the model's threshold",
            "agreement": "agreement with the model's answer on the clean photo"}[res.mode]
    clean_ci = f" [{clean.clean_ci[0]:.3f}, {clean.clean_ci[1]:.3f}]"
    out.verdicts.append(f"{args.model}, {what}: clean rate {clean.clean_rate:.3f}{clean_ci} on {res.n_probes} probes "
                        f"of {clean.n_identities} identities, chance {clean.chance:.3f}; criterion "
                        f"{clean.criterion:.3f}.")
    for c in res.curves.values():
        out.verdicts.append(c.sentence())
    out.summary["verdicts"] = [{"perturbation": n, **c.verdict.as_dict()} for n, c in res.curves.items()
                               if c.verdict is not None]
    out.add_figure("curves", _curves_figure(res),
                   f"How the model's {res.mode} rate falls as each image degradation gets stronger (one panel per "
                   "degradation; the unaltered photo is the first point). The blue band is the 95% interval of "
                   "each rate (Wilson, widened to a bootstrap over people), the dotted line is chance, the dashed "
                   "red line the criterion, the vertical red line the level at which the rate crosses it and the "
                   "pale red span that level's 95% interval (resampling people). A title says 'above criterion at "
                   "the end' only when the whole interval at the last level is above the criterion, and 'crossing "
                   "undecided' when that interval contains it. AUC 1 means no loss at any level.")
    if res.mode != "agreement":
        _, probes = split_gallery_probes(rows, args.probes_per_identity, args.max_identities or None, args.seed)
        sweeps = {n: tuple(c.levels) for n, c in res.curves.items()}
        try:
            out.add_figure("examples", _examples_figure(args.model, probes[0], sweeps, args.occlusion, args.seed),
                           "What the model was shown: one aligned probe face at every level of every degradation "
                           "(rows), from unaltered (left) to the end of the sweep (right).")
        except FaceLensError as exc:
            out.notes.append(f"No example strip: {exc}")
    if res.herd:
        out.tables["herd"] = [m.as_dict() for m in res.herd]
        counts = {cat: sum(m.category == cat for m in res.herd) for cat in HERD_ORDER}
        out.summary["herd"] = counts
        out.verdicts.append("Zoo: " + ", ".join(f"{v} {_PLURAL[k]}"
                                                for k, v in counts.items()) +
                            f" among {len(res.herd)} identities (quartile tails, clean probes).")
        out.add_figure("herd", _herd_figure(res.herd),
                       "Each dot is one person. Goats are hard to match to their own photo (low genuine score), "
                       "lambs are easy to impersonate (others' photos score high against them), wolves look like "
                       f"many others (their photo scores high against others); tails are the {args.herd_quantile:g} "
                       "quantiles, and sheep are everyone else.")
    out.notes.append(f"Curves: {what}. Criterion level = where the rate first falls below the criterion (default "
                     "half-way between the clean rate and chance), linearly interpolated between sweep levels and "
                     "quoted to two significant figures with a 95% interval from resampling identities (the "
                     "criterion held fixed). AUC = trapezoidal area under rate vs level divided by the level range "
                     "(1 = no loss at any level). Bands: 95% Wilson intervals, widened to the identity bootstrap "
                     "where a person has several probes. Verdict per degradation: 'still above the criterion at the "
                     "end of the sweep' is supported only when the whole interval of the rate at the last level lies "
                     "above the criterion, not supported when it lies below, and inconclusive when it contains the "
                     "criterion or rests on fewer than 8 identities.")
    out.notes.append("Herding: an identity is a goat when its mean genuine score is in the lowest quantile, a lamb "
                     "when the mean impostor score against it is in the highest, a wolf when its own mean impostor "
                     "score as a probe is in the highest; the first of goat, lamb, wolf wins, the rest are sheep.")
    if note:
        out.notes.append(note)
    out.seconds = res.seconds
    return out


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--perturbations", default=None, help=f"comma-separated subset of {', '.join(PERTURBATIONS)}")
    p.add_argument("--mode", default="auto", choices=("auto", "identification", "verification"),
                   help="recognizers: identification (rank-1) or verification (genuine pairs at the threshold)")
    p.add_argument("--criterion", type=float, default=None,
                   help="rate criterion (default: half-way between the clean rate and chance)")
    p.add_argument("--probes-per-identity", type=int, default=1)
    p.add_argument("--max-identities", type=int, default=40, help="seeded random subset of identities (0: all)")
    p.add_argument("--occlusion", default="random", choices=("random", "centre"), help="where the occluder goes")
    p.add_argument("--herd-quantile", type=float, default=0.25, help="tail share for goats, lambs and wolves")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the bands")


register_study(StudySpec("psychophysics", "item-response curves under blur, noise, contrast, brightness, occlusion, "
                         "JPEG and rotation, with criterion levels, AUCs and the biometric zoo",
                         run_psychophysics, _add_args))
