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

Rates come with 95 % intervals (:func:`facelens.evaluate.stats.rate_interval`): Wilson on the probes,
widened to an identity-cluster bootstrap when an identity has several probes (ORL: its 9 photos are not
independent trials); never of zero width, also at 0/n and n/n. Verdicts come from
:func:`facelens.evaluate.verdict.decide` on those intervals: "identifies people" means rank-1 above chance
plus :data:`REID_MARGIN` of the way from chance to certain (:func:`above_chance`), and "rejects strangers"
means fewer than :data:`OPEN_SET_MAX_FALSE_ALARM` of the stranger photos are accepted. The self-test
without a manifest (:data:`ILLUSTRATION`) is labelled an illustration and gives no verdict.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..datasets import ManifestRow, read_manifest
from ..errors import FaceLensError
from ..evaluate.stats import Estimate, rate_interval
from ..evaluate.verdict import Verdict, decide
from ..evaluate.verification import roc, verification_rates
from ..matching import Matcher, Metric, pairwise_scores
from .base import StudyResult, StudySpec, register_study
from .features import extract

if TYPE_CHECKING:
    from ..executors import MapResult
    from ..models.base import FaceModel

__all__ = [
    "ALTERATIONS",
    "ILLUSTRATION",
    "REID_MARGIN",
    "FeatureSource",
    "OneShotSplit",
    "above_chance",
    "columns",
    "far_axis_floor",
    "feature_sources",
    "illustration_label",
    "images_to_rows",
    "one_shot_audit",
    "one_shot_splits",
    "open_set",
]

FARS: tuple[float, ...] = (1e-2, 1e-3)
CALIBRATION_FAR = 1e-2
VGG_POOL5 = "model.features.30"  # VGG16's last max-pool: 512×7×7 = 25,088 features


# -- rates, thresholds and wording shared with the anonymization audit -------------------------------------
#: "identifies people" / "still re-identifies": rank-1 at least this share of the way from chance to certain
REID_MARGIN = 0.2
#: "rejects strangers": the share of stranger photos accepted as someone must stay below this
OPEN_SET_MAX_FALSE_ALARM = 0.05
#: the label of every result of the no-manifest self-test ({n}: the number of portraits)
ILLUSTRATION = "Illustration only: a self-test on {n} portraits without a manifest; no verdict"


def illustration_label(n_images: int) -> str:
    """The words that open every self-test result: it illustrates the pipeline and decides nothing."""
    return ILLUSTRATION.format(n=n_images)


def above_chance(chance: float, margin: float = REID_MARGIN) -> float:
    """The rate a claim of identification must exceed: ``margin`` of the way from ``chance`` to certain.

    A bare "above chance" would call 2/81 a re-identification; a fixed share of the remaining range keeps
    the bar meaningful whether chance is 1 % (81 people) or 50 % (2 people).
    """
    return float(chance + margin * (1.0 - chance))


def columns(prefix: str, e: Estimate) -> dict[str, Any]:
    """Table columns of an estimate: ``prefix``, ``prefix_ci_low``, ``prefix_ci_high`` (CSV-friendly)."""
    return {prefix: e.value, f"{prefix}_ci_low": e.lo, f"{prefix}_ci_high": e.hi}


def pct(e: Estimate) -> str:
    """``93% [85, 97]`` for a rate: percentages read more easily in a sentence than proportions. Decimals are
    added until the two ends differ, so a narrow interval (0 of 6,480 pairs) never prints as ``[0, 0]``."""
    if not np.isfinite(e.value):
        return "n/a"
    if not e.finite:
        return f"{100 * e.value:.0f}% [no interval]"
    d = 0
    while d < 3 and f"{100 * e.lo:.{d}f}" == f"{100 * e.hi:.{d}f}":
        d += 1
    return f"{100 * e.value:.{d}f}% [{100 * e.lo:.{d}f}, {100 * e.hi:.{d}f}]"


def far_axis_floor(n_impostor: int) -> float:
    """The smallest false accept rate an ROC axis may show: 1 / the number of impostor pairs (what they resolve)."""
    return 1.0 / max(int(n_impostor), 1)


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
    dir: Estimate  # known probes: right identity and accepted
    detection: Estimate  # known probes: accepted at all
    false_alarm: Estimate  # unknown probes: accepted as someone (units: the unknown identities)
    n_known_ids: int
    n_unknown_ids: int
    curve: tuple[np.ndarray, np.ndarray] = field(default_factory=lambda: (np.zeros(0), np.zeros(0)))

    def best_dir(self, max_false_alarm: float) -> float:
        """The best detection-and-identification rate any threshold reaches with at most this false alarm rate."""
        far, dir_ = self.curve
        ok = far <= max_false_alarm
        return float(dir_[ok].max()) if ok.any() else 0.0


def open_set(gallery: np.ndarray, gallery_labels: Sequence[str], probes: np.ndarray, probe_labels: Sequence[str],
             source: FeatureSource, *, unknown_fraction: float = 0.3, seed: int = 0,
             n_boot: int = 1000) -> OpenSet | None:
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
    opts = dict(n_boot=n_boot, seed=seed)
    return OpenSet(thr, how, rate_interval((best_known >= thr) & right, kl, **opts),
                   rate_interval(best_known >= thr, kl, **opts), rate_interval(best_unknown >= thr, ul, **opts),
                   len(set(gl)), len(unknown), (curve_far, curve_dir))


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
    """The note that opens a self-test result: what was compared, and that it decides nothing."""
    return (f"{illustration_label(n_images)}. Each photo is enrolled as its own identity and probed with "
            f"{n_probes} altered copies of itself ({', '.join(ALTERATIONS)}) — the same shot, not a second photo, "
            f"so matching them says nothing about recognizing people. Chance rank-1 is "
            f"{100 / max(n_images, 1):.0f}%. It shows the pipeline runs; for real numbers run "
            f"`facelens audit {study} --manifest ../shared/faces/manifest.csv`.")


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
    """One-shot recognition on manifest rows (the dataset study) or on a few images (an illustration).

    With images (arrays, paths or :class:`~facelens.portraits.Portrait`; ``None`` = the two default
    portraits) each image is its own identity, enrolled unaltered and probed with altered copies of itself
    (:data:`ALTERATIONS`); every result is labelled an illustration and no verdict is given, because a
    copy of the same shot is not a second photo of a person.
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
            result = _one_shot_rows(rows, model, sources=sources, reference_subset="reference",
                                    probe_subset="altered", unknown_fraction=1 / len(images), executor="local",
                                    address=None, batch_size=batch_size, seed=seed, n_boot=n_boot,
                                    illustration=len(images))
        result.notes.insert(0, tiny_note(len(images), len(ALTERATIONS)))
        result.failures = [{"path": Path(f["path"]).name.split("__")[0], "reason": f["reason"]}
                           for f in result.failures]
        result.settings["input"] = f"{len(images)} given images with {len(ALTERATIONS)} altered copies each"
        result.seconds = time.perf_counter() - start
        return result
    result = _one_shot_rows(list(rows_or_images), model, sources=sources,  # type: ignore[arg-type]
                            reference_subset=reference_subset, probe_subset=probe_subset,
                            unknown_fraction=unknown_fraction, executor=executor, address=address,
                            batch_size=batch_size, seed=seed, n_boot=n_boot, illustration=0)
    result.seconds = time.perf_counter() - start
    return result


def _one_shot_rows(rows: list[ManifestRow], model: str | FaceModel, *, sources: Sequence[FeatureSource] | None,
                   reference_subset: str | None, probe_subset: str | None, unknown_fraction: float, executor: str,
                   address: str | None, batch_size: int, seed: int, n_boot: int,
                   illustration: int) -> StudyResult:
    """The dataset study on manifest rows; ``illustration`` = the number of self-test portraits (0: a real run)."""
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
        "unknown_fraction": unknown_fraction, "seed": seed, "fars": list(FARS), "reid_margin": REID_MARGIN,
        "open_set_max_false_alarm": OPEN_SET_MAX_FALSE_ALARM})
    table: list[dict[str, Any]] = []
    open_rows: list[dict[str, Any]] = []
    decided: list[dict[str, Any]] = []
    curves: dict[str, list[tuple[str, np.ndarray, np.ndarray, OpenSet | None]]] = defaultdict(list)
    impostor_pairs: dict[str, int] = {}
    opts = dict(n_boot=n_boot, seed=seed)
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
        imp = np.zeros(0)
        for src in srcs:
            rec = records[src]
            gallery = np.stack([src.features(rec[rows[i].path]) for i in refs])
            queries = np.stack([src.features(rec[rows[i].path]) for i in probes])
            ms = MatchScores(pairwise_scores(queries, gallery, src.metric), p_labels, g_labels)
            r1 = rate_interval(ms.rank1_hits(), p_labels, **opts)
            gen, imp = ms.genuine_impostor()
            imp_owner = np.broadcast_to(np.asarray(p_labels, dtype=object)[:, None], ms.scores.shape)[~ms.mates]
            thr, how = score_threshold(src, imp)
            vr = verification_rates(gen, imp, fars=FARS, score_threshold=thr)
            tar_thr = rate_interval(gen >= thr, ms.probe_labels, **opts)
            far_thr = rate_interval(imp >= thr, imp_owner, **opts)
            chance = 1 / len(refs)
            row: dict[str, Any] = {"dataset": split.dataset, "features": src.name, "dims": int(gallery.shape[1]),
                                   "metric": src.metric, "identities": len(refs), "probes": len(probes),
                                   **columns("rank1", r1), "chance_rank1": chance, "auc": vr.auc, "eer": vr.eer}
            for f in FARS:
                row[f"tar_at_far_{f:g}"] = vr.tar_at_far[f]
            row.update(threshold=how, **columns("tar_at_threshold", tar_thr),
                       **columns("far_at_threshold", far_thr), genuine_pairs=len(gen), impostor_pairs=len(imp))
            os_ = open_set(gallery, g_labels, queries, p_labels, src, unknown_fraction=unknown_fraction, **opts)
            if os_ is not None:
                open_rows.append({"dataset": split.dataset, "features": src.name, "threshold": os_.how,
                                  "known_identities": os_.n_known_ids, "unknown_identities": os_.n_unknown_ids,
                                  "known_probes": os_.dir.n, "unknown_probes": os_.false_alarm.n,
                                  **columns("detect_identify_rate", os_.dir),
                                  **columns("detection_rate", os_.detection),
                                  **columns("false_alarm_rate", os_.false_alarm),
                                  f"best_dir_at_false_alarm_{OPEN_SET_MAX_FALSE_ALARM:g}":
                                      os_.best_dir(OPEN_SET_MAX_FALSE_ALARM)})
            far, tar, _ = roc(gen, imp)
            curves[split.dataset].append((src.name, far, tar, os_))
            identifies = decide(f"{split.dataset}: {src.name} identifies people (rank-1 above "
                                f"{above_chance(chance):.3f}, i.e. chance {chance:.3f} + {100 * REID_MARGIN:.0f}% "
                                f"of the way to certain)", r1, above_chance(chance), unit="identities",
                                illustration=bool(illustration))
            row.update(identifies=identifies.status)
            table.append(row)
            decided.append({"dataset": split.dataset, "features": src.name, **identifies.as_dict()})
            rejects = None
            if os_ is not None:
                rejects = decide(f"{split.dataset}: at the threshold ({os_.how}), {src.name} rejects strangers (under "
                                 f"{100 * OPEN_SET_MAX_FALSE_ALARM:g}% of their photos accepted as someone)",
                                 os_.false_alarm, OPEN_SET_MAX_FALSE_ALARM, direction="below",
                                 unit="stranger identities", illustration=bool(illustration))
                open_rows[-1]["rejects_strangers"] = rejects.status
                decided.append({"dataset": split.dataset, "features": src.name, **rejects.as_dict()})
            if src is srcs[0]:
                res.summary.setdefault("rank1", {})[split.dataset] = r1.as_dict()
                res.verdicts.extend(_verdicts(identifies, rejects, tar_thr, far_thr, how, vr, os_, len(probes),
                                              illustration))
        impostor_pairs[split.dataset] = len(imp)
        unresolved = [f for f in FARS if len(imp) * f < 1]
        if unresolved:
            notes.append(f"{split.dataset}: TAR at FAR {', '.join(f'{f:g}' for f in unresolved)} is n/a: "
                         f"{len(imp)} impostor pairs cannot resolve a false accept rate that small")
    if not table:
        raise FaceLensError("no dataset had enough usable photos for one-shot matching; see the skipped photos")
    res.summary["rank1_by_features"] = {f"{r['dataset']} / {r['features']}": r["rank1"] for r in table}
    res.summary["verdicts"] = decided
    res.tables["closed_set"] = table
    if open_rows:
        res.tables["open_set"] = open_rows
    res.summary["roc_far_axis_from"] = {ds: far_axis_floor(n) for ds, n in impostor_pairs.items()}
    res.add_figure("roc", _roc_figure(curves, impostor_pairs, bool(illustration)), _ROC_CAPTION)
    for src in srcs:
        if src.layer is not None and src.model == model_name:
            res.notes.append(f"'{src.name}': the layer's activations averaged over a {src.pool}×{src.pool} grid "
                             f"and flattened; matched by {src.metric}.")
    res.notes.insert(0, "How: per dataset, one photo per identity is enrolled and every other photo is identified "
                        "by its nearest enrolled neighbour (rank-1 = the right person is the closest). ROC and TAR at "
                        "FAR come from genuine (probe vs own enrolled photo) and impostor (probe vs every other "
                        "enrolled photo) pairs. Open set: a seeded share of identities is not enrolled and their "
                        "photos must be rejected. Intervals (95%): Wilson, widened to an identity bootstrap where a "
                        "person has several probes; never of zero width. Verdicts: 'identifies people' is supported "
                        f"when the whole rank-1 interval lies above chance + {100 * REID_MARGIN:.0f}% of the way from "
                        "chance to certain, not supported when it lies below, and inconclusive when it straddles "
                        "that bar or rests on fewer than 8 identities; 'rejects strangers' likewise for a false "
                        f"alarm rate under {100 * OPEN_SET_MAX_FALSE_ALARM:g}%.")
    res.notes.extend(notes)
    res.failures = [{"path": p, "reason": r} for p, r in failures.items()]
    res.counts = {"rows_in": len(rows), "rows_used": len(used_rows), "failed": len(failures),
                  "datasets": len(splits)}
    return res


_ROC_CAPTION = ("Top: how often the same person is accepted (true accept rate) against how often two different "
                "people are wrongly accepted (false accept rate, log scale), one curve per feature source; higher and "
                "further left is better. The axis starts at 1 / the number of impostor pairs, the smallest false "
                "accept rate those pairs can measure; thresholds that accept no impostor are drawn at that edge. "
                "Bottom (open set): some people were deliberately not enrolled; the curve shows the best share of "
                "enrolled people found and named correctly for each share of strangers wrongly accepted, as the "
                "acceptance threshold moves; the dot is the threshold used in the table.")


def _verdicts(identifies: Verdict, rejects: Verdict | None, tar: Estimate, far: Estimate, how: str, vr: Any,
              os_: OpenSet | None, n_probes: int, illustration: int) -> list[str]:
    """The sentences of one dataset: each decided claim, then the numbers that give it context."""
    if illustration:  # no claim to state: the numbers, under one label (said before them)
        r1 = identifies.estimate
        text = (f"{illustration_label(illustration)}: numbers, not findings. Rank-1 {pct(r1)} of {n_probes} probes; "
                f"at the threshold ({how}), {pct(tar)} of genuine pairs and {pct(far)} of impostor pairs are "
                f"accepted")
    else:
        text = (f"{identifies.sentence()} {n_probes} probes. At the threshold ({how}), "
                f"{pct(tar)} of genuine pairs and {pct(far)} of impostor pairs are accepted")
    tar2 = vr.tar_at_far.get(1e-2, float("nan"))
    if np.isfinite(tar2):
        text += f"; {100 * tar2:.0f}% of genuine pairs accepted at 1% false accepts"
    out = [text + "."]
    if rejects is not None and os_ is not None:
        extra = f" {pct(os_.dir)} of the enrolled people's photos are identified at that threshold."
        if rejects.status == "not supported" and not illustration:
            cap = OPEN_SET_MAX_FALSE_ALARM
            extra += (f" In hindsight, a stricter threshold would identify {100 * os_.best_dir(cap):.0f}% with "
                      f"≤ {100 * cap:g}% false alarms on these photos: the threshold needs calibrating for them.")
        if illustration:
            out.append(f"Strangers accepted as someone at that threshold: {pct(rejects.estimate)}.{extra}")
        else:
            out.append(f"{rejects.sentence()}{extra}")
    return out


def _roc_figure(curves: dict[str, list[tuple[str, np.ndarray, np.ndarray, OpenSet | None]]],
                impostor_pairs: Mapping[str, int], illustration: bool = False) -> np.ndarray:
    """ROC per dataset on a FAR axis its impostor pairs can resolve, and the open-set curve from 0."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from ..explain.render import figure_to_rgb, new_figure

    plain = FuncFormatter(lambda x, _: f"{x:g}")
    tag = " (illustration)" if illustration else ""

    datasets = list(curves)
    fig, axes = new_figure(2, len(datasets), figsize=(5.2 * len(datasets), 8.4), squeeze=False)
    for c, ds in enumerate(datasets):
        ax, ax2 = axes[0, c], axes[1, c]
        n_imp = impostor_pairs.get(ds, 1)
        floor = far_axis_floor(n_imp)
        styles = ("-", "--", "-.", ":")
        for k, (name, far, tar, os_) in enumerate(curves[ds]):
            color, ls, lw = f"C{k}", styles[k % len(styles)], 2.6 if k == 0 else 1.5
            ax.step(np.maximum(far, floor), tar, where="post", color=color, ls=ls, lw=lw, label=name,
                    zorder=10 - k)
            if os_ is not None and len(os_.curve[0]):
                cf, cd = os_.curve
                ax2.step(np.r_[cf, 1.0], np.r_[cd, cd[-1]], where="post", color=color, ls=ls, lw=lw, label=name,
                         zorder=10 - k)
                ax2.plot(os_.false_alarm.value, os_.dir.value, "o", color=color, ms=7, zorder=20)
        ax.set_xscale("log")
        ax.set_xlim(floor, 1)
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain if floor > 0.05 else NullFormatter())
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(f"false accept rate (log; axis starts at 1/{n_imp}: {n_imp} impostor pairs)")
        ax.set_ylabel("true accept rate (genuine pairs accepted)")
        ax.set_title(f"{ds}: verification ROC{tag}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        ax2.set_xlim(0, 1.0)
        ax2.set_ylim(0, 1.02)
        ax2.set_xlabel("false alarm rate (unknown people accepted)")
        ax2.set_ylabel("detection & identification rate")
        ax2.set_title(f"{ds}: open set (watch list){tag}", fontsize=10)
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
