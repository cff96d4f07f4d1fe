"""One-shot face recognition: one enrolled photo per identity, nearest-neighbour matching, open-set rejection.

The protocol every face study here shares (the anonymization audit re-uses it for re-identification):

* **Gallery and probes** (:func:`one_shot_splits`), per dataset: when a dataset has the reference and
  probe subsets (FRL London: ``neutral`` enrolled, ``smiling`` probed), those; otherwise the first photo
  of each identity (by path) is enrolled and its other photos are the probes (ORL: enroll 1 of 10,
  probe the other 9). Identities without probes stay in the gallery as distractors.
* **Closed set**: rank-1 over every enrolled identity; verification ROC and TAR at a fixed FAR from
  genuine (probe vs its own enrolled photo) and impostor (probe vs every other enrolled photo) scores.
* **Open set**: a seeded share of identities is *not* enrolled; their probes are unknowns. At the
  threshold (the model's own when it has one, e.g. 0.6 L2 for dlib-resnet; otherwise the score at which
  1 % of impostor comparisons among the enrolled identities are accepted) we report the detection and
  identification rate (known probes matched to the right identity and accepted) and the false alarm rate
  (unknown probes accepted as someone).
* **Feature sources**: the final embedding, pooled intermediate layers of the same network, and a
  torchvision ImageNet network's 25,088-d VGG16 ``pool5`` features with 1-NN (the workshop's KNN) when
  its weights are in torchvision's cache (never downloaded).

Rates come with 95 % intervals (:func:`rate`): Wilson on the probes, widened to an identity-cluster
bootstrap when an identity has several probes (ORL: its 9 photos are not independent trials).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..datasets import ManifestRow, read_manifest
from ..errors import FaceLensError
from ..evaluate.bootstrap import percentile_interval, resampled_ratios
from ..evaluate.verification import roc, verification_rates
from ..matching import Matcher, Metric, pairwise_scores
from .base import StudyResult, StudySpec, register_study
from .features import extract

if TYPE_CHECKING:
    from ..executors import MapResult
    from ..models.base import FaceModel

__all__ = [
    "ALTERATIONS",
    "FeatureSource",
    "OneShotSplit",
    "Rate",
    "feature_sources",
    "images_to_rows",
    "one_shot_audit",
    "one_shot_splits",
    "open_set",
    "rate",
]

FARS: tuple[float, ...] = (1e-2, 1e-3)
CALIBRATION_FAR = 1e-2
VGG_POOL5 = "model.features.30"  # VGG16's last max-pool: 512×7×7 = 25,088 features


# -- rates with intervals ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rate:
    """A proportion ``k / n`` with a 95 % interval; ``clusters`` = independent units (identities)."""

    k: int
    n: int
    low: float
    high: float
    clusters: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    def text(self, unit: str = "probes") -> str:
        if not self.n:
            return f"n/a (0 {unit})"
        extra = f" of {self.clusters} identities" if self.clusters != self.n else ""
        return (f"{100 * self.value:.0f}% (95% CI {100 * self.low:.0f}–{100 * self.high:.0f}%, "
                f"n = {self.n} {unit}{extra})")

    def as_dict(self, prefix: str) -> dict[str, Any]:
        return {prefix: self.value, f"{prefix}_ci_low": self.low, f"{prefix}_ci_high": self.high}


def rate(hits: Sequence[bool] | np.ndarray, clusters: Sequence[Hashable] | None = None, *,
         n_boot: int = 1000, seed: int = 0) -> Rate:
    """``mean(hits)`` with a 95 % interval: scipy's Wilson score interval (never degenerate at 0 or 100 %),
    widened to the identity-cluster bootstrap percentile interval when clusters repeat (correlated trials).
    """
    from scipy.stats import binomtest

    h = np.asarray(hits, bool).ravel()
    n, k = len(h), int(h.sum())
    if n == 0:
        return Rate(0, 0, float("nan"), float("nan"), 0)
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = float(ci.low), float(ci.high)
    labels = list(clusters) if clusters is not None else list(range(n))
    uniq: dict[Hashable, int] = {}
    idx = np.array([uniq.setdefault(c, len(uniq)) for c in labels])
    if len(uniq) < n and len(uniq) > 1 and n_boot > 0:
        per_hits = np.bincount(idx, weights=h.astype(float), minlength=len(uniq))
        per_n = np.bincount(idx, minlength=len(uniq)).astype(float)
        boot_low, boot_high = percentile_interval(resampled_ratios(per_hits, per_n, n_boot,
                                                                   np.random.default_rng(seed)))
        low, high = min(low, boot_low), max(high, boot_high)
    return Rate(k, n, low, high, len(uniq))


def mean_ci(values: Sequence[float] | np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean with a 95 % bootstrap percentile interval (each value its own unit)."""
    v = np.asarray(values, np.float64).ravel()
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(v) == 1 or n_boot <= 0:
        return float(v.mean()), float("nan"), float("nan")
    low, high = percentile_interval(resampled_ratios(v, np.ones_like(v), n_boot, np.random.default_rng(seed)))
    return float(v.mean()), low, high


# -- gallery / probe split --------------------------------------------------------------------------------
@dataclass
class OneShotSplit:
    """One dataset's one-shot protocol: indices into the rows for the enrolled photos and the probes."""

    dataset: str
    references: list[int]
    probes: list[int]
    rule: str

    @property
    def n_identities(self) -> int:
        return len(self.references)


def _auto_subsets(subsets: set[str]) -> tuple[str | None, str | None]:
    if {"neutral", "smiling"} <= subsets:
        return "neutral", "smiling"
    return None, None


def one_shot_splits(rows: Sequence[ManifestRow], *, reference_subset: str | None = None,
                    probe_subset: str | None = None) -> tuple[list[OneShotSplit], list[str]]:
    """Per dataset, the enrolled photo of each identity and the probes (see the module docstring).

    Returns the splits and notes on what was left out (datasets without identities or probes).
    """
    notes: list[str] = []
    by_dataset: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_dataset[r.dataset or "(no dataset)"].append(i)
    splits: list[OneShotSplit] = []
    for ds, idx in by_dataset.items():
        with_id = [i for i in idx if rows[i].identity]
        if len(with_id) < len(idx):
            notes.append(f"{ds}: {len(idx) - len(with_id)} photos have no identity label and are not used")
        subsets = {rows[i].subset for i in with_id if rows[i].subset}
        ref_sub, probe_sub = reference_subset, probe_subset
        if ref_sub is None and probe_sub is None:
            ref_sub, probe_sub = _auto_subsets(subsets)
        if ref_sub is not None and ref_sub not in subsets:
            ref_sub, probe_sub = None, None  # this dataset lacks the subset: fall back to first-photo rule
        refs: dict[str, int] = {}
        ordered = sorted(with_id, key=lambda i: str(rows[i].path))
        if ref_sub is not None:
            for i in ordered:
                if rows[i].subset == ref_sub:
                    refs.setdefault(rows[i].identity, i)  # type: ignore[arg-type]
            probes = [i for i in ordered if i not in refs.values() and rows[i].identity in refs
                      and (probe_sub is None or rows[i].subset == probe_sub)]
            rule = f"enroll subset '{ref_sub}', probe " + (f"subset '{probe_sub}'" if probe_sub else "the other photos")
        else:
            for i in ordered:
                refs.setdefault(rows[i].identity, i)  # type: ignore[arg-type]
            probes = [i for i in ordered if i not in refs.values()]
            rule = "enroll the first photo of each identity (by file name), probe its other photos"
        orphans = sum(1 for i in ordered if rows[i].identity not in refs)
        if orphans:
            notes.append(f"{ds}: {orphans} photos of identities with no enrolled photo are not used")
        if len(refs) < 2 or not probes:
            why = "fewer than 2 identities" if len(refs) < 2 else "no identity has a second photo"
            notes.append(f"{ds}: skipped for one-shot matching ({why})")
            continue
        splits.append(OneShotSplit(ds, list(refs.values()), probes, rule))
    return splits, notes


# -- feature sources --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureSource:
    """Where a face's feature vector comes from: a network's output or one of its (pooled) layers."""

    name: str
    model: str
    layer: str | None = None  # None: the network's output
    pool: int = 0
    metric: Metric = "cosine"
    threshold: float | None = None  # in the metric's natural unit; None: calibrated at 1 % FAR

    def features(self, record: Any, variant: str = "original") -> np.ndarray:
        if self.layer is None:
            return np.asarray(record.outputs[variant], np.float64)
        return np.asarray(record.layer_features[self.layer][variant], np.float64)


def vgg16_available() -> bool:
    """Whether torchvision's VGG16 ImageNet weights are in its cache (they are never downloaded here)."""
    from ..models.torchvision_models import torchvision_weight_file

    return torchvision_weight_file("vgg16").is_file()


def feature_sources(model: str | FaceModel = "dlib-resnet", *, layers: Sequence[str] = ("early", "mid", "late"),
                    pool: int = 4, imagenet: str | None = "vgg16", metric: Metric | None = None,
                    notes: list[str] | None = None) -> list[FeatureSource]:
    """The sources compared by default: final embedding, pooled layers, and VGG16 pool5 when cached."""
    from ..models import load_model

    fm = load_model(model) if isinstance(model, str) else model
    name = fm.name
    own: Metric = metric or ("l2" if fm.match_threshold is not None else "cosine")
    out = [FeatureSource(f"{name} embedding" if fm.task == "embedding" else f"{name} output", name, None, 0, own,
                         fm.match_threshold if own == "l2" else None)]
    for layer in layers:
        shape = f"{pool}×{pool} avg-pooled" if pool else "whole map"
        out.append(FeatureSource(f"{name} {layer} layer ({shape})", name, layer, pool, metric or "cosine"))
    if imagenet:
        if imagenet != "vgg16":
            raise FaceLensError(f"only 'vgg16' pool5 features are wired up as an ImageNet source, got {imagenet!r}")
        if vgg16_available():
            out.append(FeatureSource("VGG16 ImageNet pool5 (25,088-d, 1-NN)", "torchvision:vgg16", VGG_POOL5, 0,
                                     metric or "cosine"))
        elif notes is not None:
            from ..models.torchvision_models import torchvision_weight_file

            notes.append(f"VGG16 ImageNet features were not compared: its weights are not in torchvision's cache "
                         f"({torchvision_weight_file('vgg16')}); facelens never downloads them.")
    return out


# -- scoring ----------------------------------------------------------------------------------------------
@dataclass
class MatchScores:
    """Probe×gallery scores of one dataset and one feature source (higher = more alike)."""

    scores: np.ndarray
    probe_labels: list[str]
    gallery_labels: list[str]

    @property
    def mates(self) -> np.ndarray:
        g = np.asarray(self.gallery_labels, dtype=object)
        return np.asarray([g == p for p in self.probe_labels], bool).reshape(self.scores.shape)

    def genuine_impostor(self) -> tuple[np.ndarray, np.ndarray]:
        m = self.mates
        return self.scores[m], self.scores[~m]

    def rank1_hits(self) -> np.ndarray:
        best = self.scores.argmax(1)
        return np.asarray([self.gallery_labels[j] == p for j, p in zip(best, self.probe_labels, strict=True)], bool)


def score_threshold(source: FeatureSource, impostor: np.ndarray, far: float = CALIBRATION_FAR) -> tuple[float, str]:
    """The acceptance threshold on the score scale, and how it was set."""
    if source.threshold is not None:
        thr = -source.threshold if source.metric == "l2" else source.threshold
        rule = f"L2 < {source.threshold:g}" if source.metric == "l2" else f"cosine ≥ {source.threshold:g}"
        return float(thr), f"the model's own, {rule}"
    imp = np.sort(np.asarray(impostor, np.float64))
    if len(imp) == 0:
        return float("nan"), "none (no impostor scores)"
    allowed = int(np.floor(far * len(imp)))
    return float(imp[len(imp) - allowed - 1]) + 1e-12, f"calibrated: {100 * far:g}% FAR on enrolled"


@dataclass
class OpenSet:
    """Open-set identification at one threshold (Grother & Phillips' watch-list terms)."""

    threshold: float
    how: str
    dir: Rate  # known probes: right identity and accepted
    detection: Rate  # known probes: accepted at all
    false_alarm: Rate  # unknown probes: accepted as someone
    n_known_ids: int
    n_unknown_ids: int
    curve: tuple[np.ndarray, np.ndarray] = field(default_factory=lambda: (np.zeros(0), np.zeros(0)))

    def best_dir(self, max_false_alarm: float) -> float:
        """The best detection-and-identification rate any threshold reaches with at most this false alarm rate."""
        far, dir_ = self.curve
        ok = far <= max_false_alarm
        return float(dir_[ok].max()) if ok.any() else 0.0


def open_set(gallery: np.ndarray, gallery_labels: Sequence[str], probes: np.ndarray, probe_labels: Sequence[str],
             source: FeatureSource, *, unknown_fraction: float = 0.3, seed: int = 0) -> OpenSet | None:
    """Hold out a seeded share of identities as unknowns and score the watch list (see the module docstring)."""
    ids = sorted(set(gallery_labels))
    n_unknown = round(unknown_fraction * len(ids))
    n_unknown = min(max(n_unknown, 1), len(ids) - 1)
    if n_unknown < 1:
        return None
    rng = np.random.default_rng(seed)
    unknown = set(rng.choice(ids, size=n_unknown, replace=False).tolist())
    g_keep = [i for i, g in enumerate(gallery_labels) if g not in unknown]
    p_known = [i for i, p in enumerate(probe_labels) if p not in unknown]
    p_unknown = [i for i, p in enumerate(probe_labels) if p in unknown]
    if not p_known or not p_unknown:
        return None
    gl = [gallery_labels[i] for i in g_keep]
    known = MatchScores(pairwise_scores(probes[p_known], gallery[g_keep], source.metric),
                        [probe_labels[i] for i in p_known], gl)
    _, imp = known.genuine_impostor()
    thr, how = score_threshold(source, imp)
    matcher = Matcher(source.metric, None)
    matcher.enroll(gl, gallery[g_keep])
    best_known = known.scores.max(1)
    right = known.rank1_hits()
    best_unknown = matcher.scores(probes[p_unknown]).max(1)
    kl = known.probe_labels
    ul = [probe_labels[i] for i in p_unknown]
    # the DIR-vs-FAR curve over every threshold, for the figure
    ts = np.unique(np.r_[best_known, best_unknown])
    fa_at = np.array([(best_unknown >= t).mean() for t in ts])
    dir_at = np.array([((best_known >= t) & right).mean() for t in ts])
    curve_far = np.unique(fa_at)  # best DIR reachable at each false alarm rate
    curve_dir = np.array([dir_at[fa_at <= f].max() for f in curve_far])
    return OpenSet(thr, how, rate((best_known >= thr) & right, kl), rate(best_known >= thr, kl),
                   rate(best_unknown >= thr, ul), len(set(gl)), len(unknown), (curve_far, curve_dir))


# -- the no-manifest variant: portraits against altered copies of themselves --------------------------------
def _flip(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img[:, ::-1])


def _crop(img: np.ndarray) -> np.ndarray:
    """Cut 8 % off each side and scale back: a tighter framing of the same shot."""
    import cv2

    h, w = img.shape[:2]
    dy, dx = int(0.08 * h), int(0.08 * w)
    return cv2.resize(img[dy:h - dy, dx:w - dx], (w, h), interpolation=cv2.INTER_AREA)


def _side_light(img: np.ndarray) -> np.ndarray:
    """Light falling from one side: brightness ramps from 45 % on the left to 110 % on the right."""
    w = img.shape[1]
    ramp = np.linspace(0.45, 1.1, w, dtype=np.float32)[None, :, None]
    return np.clip(img.astype(np.float32) * ramp, 0, 255).astype(np.uint8)


#: what turns one photo into a stand-in "other photo" of the same person when no second photo exists
ALTERATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"flip": _flip, "crop": _crop, "side light": _side_light}


def _as_named_images(images: Sequence[Any]) -> list[tuple[str, np.ndarray]]:
    from ..image import load_image, source_name
    from ..portraits import Portrait

    out = []
    for k, item in enumerate(images):
        if isinstance(item, Portrait):
            out.append((item.name, item.image))
        elif isinstance(item, np.ndarray):
            out.append((f"image_{k + 1}", load_image(item)))
        else:
            out.append((Path(str(source_name(item))).stem, load_image(item)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        out = [(f"{n}_{k + 1}", img) for k, (n, img) in enumerate(out)]
    return out


def images_to_rows(images: Sequence[Any], folder: str | os.PathLike,
                   alterations: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None) -> list[ManifestRow]:
    """Write each image (and its altered copies) as PNG into ``folder``: a manifest where each image is its
    own identity, the unaltered copy in subset ``reference`` and the altered ones in ``altered``.
    """
    from ..outputs import save_png

    alterations = ALTERATIONS if alterations is None else alterations
    rows = []
    for name, img in _as_named_images(images):
        ident = name
        path = save_png(Path(folder) / f"{name}__0_original.png", img)
        rows.append(ManifestRow(path=path, identity=ident, dataset="given images", subset="reference"))
        for j, (alt, fn) in enumerate(alterations.items(), start=1):
            p = save_png(Path(folder) / f"{name}__{j}_{alt.replace(' ', '_')}.png", fn(img))
            rows.append(ManifestRow(path=p, identity=ident, dataset="given images", subset="altered",
                                    extra={"alteration": alt}))
    return rows


def is_rows(items: Any) -> bool:
    return isinstance(items, (list, tuple)) and bool(items) and all(isinstance(r, ManifestRow) for r in items)


def tiny_note(n_images: int, n_probes: int, study: str = "one-shot") -> str:
    return (f"This is a tiny self-test, not a measurement: {n_images} photos, each enrolled as its own identity and "
            f"probed with {n_probes} altered copies of itself ({', '.join(ALTERATIONS)}) — the same shot, not a "
            f"second photo. Chance rank-1 is {100 / max(n_images, 1):.0f}%. It shows the pipeline runs; for real "
            f"numbers run `facelens audit {study} --manifest ../shared/faces/manifest.csv`.")


# -- the study --------------------------------------------------------------------------------------------
def _extract_by_model(rows: Sequence[ManifestRow], sources: Sequence[FeatureSource], *, executor: str,
                      address: str | None, batch_size: int) -> dict[FeatureSource, MapResult]:
    """One extraction per (model, pool): the network's output comes with every pass of its model."""
    groups: dict[tuple[str, int], list[str]] = defaultdict(list)
    for s in sources:
        if s.layer is not None:
            groups[(s.model, s.pool)].append(s.layer)
    for s in sources:
        if s.layer is None and not any(m == s.model for m, _ in groups):
            groups[(s.model, 0)] = []
    done = {key: extract(rows, key[0], layers=layers, pool=key[1], executor=executor, address=address,
                         batch_size=batch_size) for key, layers in groups.items()}
    return {s: done[(s.model, s.pool)] if s.layer is not None else next(v for k, v in done.items() if k[0] == s.model)
            for s in sources}


def one_shot_audit(rows_or_images: Sequence[ManifestRow] | Sequence[Any] | None = None,
                   model: str | FaceModel = "dlib-resnet", *, sources: Sequence[FeatureSource] | None = None,
                   reference_subset: str | None = None, probe_subset: str | None = None,
                   unknown_fraction: float = 0.3, executor: str = "local", address: str | None = None,
                   batch_size: int = 16, seed: int = 0, n_boot: int = 1000) -> StudyResult:
    """One-shot recognition on manifest rows (the dataset study) or on a few images (a tiny self-test).

    With images (arrays, paths or :class:`~facelens.portraits.Portrait`; ``None`` = the two default
    portraits) each image is its own identity, enrolled unaltered and probed with altered copies of itself
    (:data:`ALTERATIONS`); the result says plainly how small that test is.
    """
    start = time.perf_counter()
    if rows_or_images is None:
        from ..portraits import default_portraits

        rows_or_images = default_portraits()
    if not is_rows(rows_or_images):
        images = list(rows_or_images)  # type: ignore[arg-type]
        if len(images) < 2:
            raise FaceLensError("one-shot matching needs at least 2 images (2 identities)")
        with tempfile.TemporaryDirectory(prefix="facelens-oneshot-") as tmp:
            rows = images_to_rows(images, tmp)
            result = one_shot_audit(rows, model, sources=sources, reference_subset="reference",
                                    probe_subset="altered", unknown_fraction=1 / len(images), executor="local",
                                    batch_size=batch_size, seed=seed, n_boot=n_boot)
        result.notes.insert(0, tiny_note(len(images), len(ALTERATIONS)))
        result.verdicts = [f"Tiny self-test ({len(images)} identities): " + v for v in result.verdicts]
        result.failures = [{"path": Path(f["path"]).name.split("__")[0], "reason": f["reason"]}
                           for f in result.failures]
        result.settings["input"] = f"{len(images)} given images with {len(ALTERATIONS)} altered copies each"
        result.seconds = time.perf_counter() - start
        return result
    rows = list(rows_or_images)  # type: ignore[arg-type]
    notes: list[str] = []
    srcs = list(sources) if sources is not None else feature_sources(model, notes=notes)
    model_name = model if isinstance(model, str) else model.name
    splits, split_notes = one_shot_splits(rows, reference_subset=reference_subset, probe_subset=probe_subset)
    notes.extend(split_notes)
    if not splits:
        raise FaceLensError("no dataset in these rows has ≥2 identities with a second photo: nothing to match. "
                            + " ".join(split_notes))
    used = sorted({i for s in splits for i in (*s.references, *s.probes)})
    used_rows = [rows[i] for i in used]
    maps = _extract_by_model(used_rows, srcs, executor=executor, address=address, batch_size=batch_size)
    failures: dict[str, str] = {}
    records: dict[FeatureSource, dict[Path, Any]] = {}
    for src, mr in maps.items():
        for f in mr.failures:
            failures.setdefault(f.path, f.reason)
        records[src] = {r.path: rec for r, rec in zip(mr.rows, mr.records, strict=True)}
    ok = {p for p in (r.path for r in used_rows) if str(p) not in failures}

    res = StudyResult("one-shot", model_name, settings={
        "features": [s.name for s in srcs], "metrics": {s.name: s.metric for s in srcs},
        "unknown_fraction": unknown_fraction, "seed": seed, "fars": list(FARS)})
    table: list[dict[str, Any]] = []
    open_rows: list[dict[str, Any]] = []
    curves: dict[str, list[tuple[str, np.ndarray, np.ndarray, OpenSet | None]]] = defaultdict(list)
    for split in splits:
        refs = [i for i in split.references if rows[i].path in ok]
        lost_ids = {rows[i].identity for i in split.references if rows[i].path not in ok}
        probes = [i for i in split.probes if rows[i].path in ok and rows[i].identity not in lost_ids]
        if lost_ids:
            notes.append(f"{split.dataset}: {len(lost_ids)} identities lost their enrolled photo (unreadable or "
                         f"no face), so their probes were dropped")
        if len(refs) < 2 or not probes:
            notes.append(f"{split.dataset}: too few usable photos after failures; skipped")
            continue
        g_labels = [str(rows[i].identity) for i in refs]
        p_labels = [str(rows[i].identity) for i in probes]
        res.settings.setdefault("protocol", {})[split.dataset] = split.rule
        for src in srcs:
            rec = records[src]
            gallery = np.stack([src.features(rec[rows[i].path]) for i in refs])
            queries = np.stack([src.features(rec[rows[i].path]) for i in probes])
            ms = MatchScores(pairwise_scores(queries, gallery, src.metric), p_labels, g_labels)
            r1 = rate(ms.rank1_hits(), p_labels, n_boot=n_boot, seed=seed)
            gen, imp = ms.genuine_impostor()
            thr, how = score_threshold(src, imp)
            vr = verification_rates(gen, imp, fars=FARS, score_threshold=thr)
            row: dict[str, Any] = {"dataset": split.dataset, "features": src.name, "dims": int(gallery.shape[1]),
                                   "metric": src.metric, "identities": len(refs), "probes": len(probes),
                                   **r1.as_dict("rank1"), "chance_rank1": 1 / len(refs), "auc": vr.auc,
                                   "eer": vr.eer}
            for f in FARS:
                row[f"tar_at_far_{f:g}"] = vr.tar_at_far[f]
            row.update(threshold=how, tar_at_threshold=vr.tar_at_threshold, far_at_threshold=vr.far_at_threshold,
                       genuine_pairs=len(gen), impostor_pairs=len(imp))
            table.append(row)
            os_ = open_set(gallery, g_labels, queries, p_labels, src, unknown_fraction=unknown_fraction, seed=seed)
            if os_ is not None:
                open_rows.append({"dataset": split.dataset, "features": src.name, "threshold": os_.how,
                                  "known_identities": os_.n_known_ids, "unknown_identities": os_.n_unknown_ids,
                                  "known_probes": os_.dir.n, "unknown_probes": os_.false_alarm.n,
                                  **os_.dir.as_dict("detect_identify_rate"), **os_.detection.as_dict("detection_rate"),
                                  **os_.false_alarm.as_dict("false_alarm_rate"),
                                  "best_dir_at_false_alarm_0.05": os_.best_dir(0.05)})
            far, tar, _ = roc(gen, imp)
            curves[split.dataset].append((src.name, far, tar, os_))
            if src is srcs[0]:
                res.summary.setdefault("rank1", {})[split.dataset] = r1.value
                res.summary.setdefault("rank1_ci", {})[split.dataset] = [r1.low, r1.high]
                res.verdicts.append(_verdict(split, src, r1, vr, os_, len(refs)))
        unresolved = [f for f in FARS if len(imp) * f < 1]
        if unresolved:
            notes.append(f"{split.dataset}: TAR at FAR {', '.join(f'{f:g}' for f in unresolved)} is n/a: "
                         f"{len(imp)} impostor pairs cannot resolve a false accept rate that small")
    if not table:
        raise FaceLensError("no dataset had enough usable photos for one-shot matching; see the skipped photos")
    res.summary["rank1_by_features"] = {f"{r['dataset']} / {r['features']}": r["rank1"] for r in table}
    res.tables["closed_set"] = table
    if open_rows:
        res.tables["open_set"] = open_rows
    res.add_figure("roc", _roc_figure(curves), _ROC_CAPTION)
    for src in srcs:
        if src.layer is not None and src.model == model_name:
            res.notes.append(f"'{src.name}': the layer's activations averaged over a {src.pool}×{src.pool} grid "
                             f"and flattened; matched by {src.metric}.")
    res.notes.insert(0, "How: per dataset, one photo per identity is enrolled and every other photo is identified "
                        "by its nearest enrolled neighbour (rank-1 = the right person is the closest). ROC and TAR at "
                        "FAR come from genuine (probe vs own enrolled photo) and impostor (probe vs every other "
                        "enrolled photo) pairs. Open set: a seeded share of identities is not enrolled and their "
                        "photos must be rejected. Intervals: Wilson, widened to an identity bootstrap where a person "
                        "has several probes.")
    res.notes.extend(notes)
    res.failures = [{"path": p, "reason": r} for p, r in failures.items()]
    res.counts = {"rows_in": len(rows), "rows_used": len(used_rows), "failed": len(failures),
                  "datasets": len(splits)}
    res.seconds = time.perf_counter() - start
    return res


_ROC_CAPTION = ("Top: how often the same person is accepted (true accept rate) against how often two different "
                "people are wrongly accepted (false accept rate, log scale), one curve per feature source; higher and "
                "further left is better. Bottom (open set): some people were deliberately not enrolled; the curve "
                "shows the best share of enrolled people found and named correctly for each share of strangers "
                "wrongly accepted, as the acceptance threshold moves; the dot is the threshold used in the table.")


def _verdict(split: OneShotSplit, src: FeatureSource, r1: Rate, vr: Any, os_: OpenSet | None, n_ids: int) -> str:
    text = (f"{split.dataset}: {src.name} finds the right person first for {r1.text()} among {n_ids} enrolled "
            f"identities (chance {100 / n_ids:.1f}%)")
    tar2 = vr.tar_at_far.get(1e-2, float("nan"))
    if np.isfinite(tar2):
        text += f"; {100 * tar2:.0f}% of genuine pairs accepted at 1% false accepts"
    if os_ is not None:
        text += (f"; open set ({os_.how}): {100 * os_.dir.value:.0f}% of enrolled people identified, "
                 f"{100 * os_.false_alarm.value:.0f}% of {os_.false_alarm.n} stranger photos falsely accepted")
        if os_.false_alarm.value > 0.05:
            text += (f" (in hindsight, a stricter threshold would identify {100 * os_.best_dir(0.05):.0f}% with ≤ 5% "
                     f"false alarms on these photos: the threshold needs calibrating for them)")
    return text + "."


def _roc_figure(curves: dict[str, list[tuple[str, np.ndarray, np.ndarray, OpenSet | None]]]) -> np.ndarray:
    from ..explain.render import figure_to_rgb, new_figure

    datasets = list(curves)
    fig, axes = new_figure(2, len(datasets), figsize=(5.2 * len(datasets), 8.4), squeeze=False)
    for c, ds in enumerate(datasets):
        ax, ax2 = axes[0, c], axes[1, c]
        styles = ("-", "--", "-.", ":")
        for k, (name, far, tar, os_) in enumerate(curves[ds]):
            color, ls, lw = f"C{k}", styles[k % len(styles)], 2.6 if k == 0 else 1.5
            ax.step(np.maximum(far, 1e-4), tar, where="post", color=color, ls=ls, lw=lw, label=name,
                    zorder=10 - k)
            if os_ is not None and len(os_.curve[0]):
                cf, cd = os_.curve
                ax2.step(np.r_[cf, 1.0], np.r_[cd, cd[-1]], where="post", color=color, ls=ls, lw=lw, label=name,
                         zorder=10 - k)
                ax2.plot(os_.false_alarm.value, os_.dir.value, "o", color=color, ms=7, zorder=20)
        ax.set_xscale("log")
        ax.set_xlim(1e-4, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("false accept rate (impostor pairs accepted)")
        ax.set_ylabel("true accept rate (genuine pairs accepted)")
        ax.set_title(f"{ds}: verification ROC", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        ax2.set_xlim(-0.01, 1.0)
        ax2.set_ylim(0, 1.02)
        ax2.set_xlabel("false alarm rate (unknown people accepted)")
        ax2.set_ylabel("detection & identification rate")
        ax2.set_title(f"{ds}: open set (watch list)", fontsize=10)
        ax2.grid(alpha=0.3)
    return figure_to_rgb(fig)


# -- CLI --------------------------------------------------------------------------------------------------
def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """Gallery/probe options shared with the anonymization audit."""
    p.add_argument("--reference-subset", default=None,
                   help="manifest subset enrolled per identity (default: 'neutral' where a dataset has neutral and "
                        "smiling photos, else the first photo of each identity)")
    p.add_argument("--probe-subset", default=None, help="manifest subset used as probes (default: the other photos)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")


def manifest_rows(args: argparse.Namespace) -> list[ManifestRow] | None:
    """The rows the audit command asked for (``--manifest``, ``--datasets``, ``--limit``), or None without one."""
    if not args.manifest:
        return None
    rows = read_manifest(args.manifest, datasets=args.datasets)
    if args.limit is not None:
        rows = rows[: args.limit]
    if not rows:
        raise FaceLensError(f"{args.manifest}: no rows to audit")
    return rows


def _add_args(p: argparse.ArgumentParser) -> None:
    add_protocol_args(p)
    p.add_argument("--layers", default="early,mid,late",
                   help="intermediate layers compared with the final embedding (names or early/mid/late; '' for none)")
    p.add_argument("--pool", type=int, default=4, help="average-pool each layer to POOL×POOL before flattening")
    p.add_argument("--imagenet", default="vgg16", choices=["vgg16", "none"],
                   help="also compare torchvision VGG16 pool5 features when its weights are cached")
    p.add_argument("--metric", default=None, choices=["l2", "cosine"],
                   help="matching metric for every source (default: the model's own for its embedding, cosine else)")
    p.add_argument("--unknown-fraction", type=float, default=0.3,
                   help="share of identities held out as strangers for the open-set numbers")


def _run(args: argparse.Namespace) -> StudyResult:
    rows = manifest_rows(args)
    notes: list[str] = []
    layers = [x.strip() for x in (args.layers or "").split(",") if x.strip()]
    srcs = feature_sources(args.model, layers=layers, pool=args.pool,
                           imagenet=None if args.imagenet == "none" else args.imagenet, metric=args.metric, notes=notes)
    res = one_shot_audit(rows, args.model, sources=srcs, reference_subset=args.reference_subset,
                         probe_subset=args.probe_subset, unknown_fraction=args.unknown_fraction, executor=args.executor,
                         address=args.address, batch_size=args.batch_size, seed=args.seed, n_boot=args.bootstrap)
    res.notes.extend(notes)
    return res


register_study(StudySpec("one-shot", "one-shot recognition: enroll one photo per identity, identify the others "
                         "(rank-1, ROC, TAR at FAR, open-set rejection) for several feature sources", _run, _add_args))
