"""`evaluate`: stream a manifest of photos through methods and metrics.

Photos are read, aligned and explained in batches; each metric keeps only its
small per-image state, so memory stays bounded however long the manifest is.
Bad photos (unreadable, no face) are reported and skipped, never fatal, and the
output counts rows in and rows out.

Every number leaves with its controls and its interval:

* the **control maps** of :mod:`facelens.evaluate.controls` (``random``, ``edges``, ``centre``) are
  scored by every metric beside the methods, under the same keys (``deletion:random``, ...);
* each headline value has a 95 % interval over photos (``ci``), resampling people when the manifest
  names them;
* methods and controls are compared pairwise on the same photos (``comparisons``): the interval of the
  paired difference, Bonferroni-adjusted over the comparisons of one metric, decides through the one
  verdict rule whether one map beats another (Wilcoxon p-values, Holm-adjusted, are given beside it);
* the **target's range** (``target``): its unit, its mean intact, fully deleted and impostor levels,
  the impostor level measured on this manifest's other people when it names them.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..datasets import ManifestRow, read_manifest, read_tem
from ..errors import FaceLensError, ModelError
from ..executors import BatchFn, MapResult, RowFailure, map_rows
from ..explain.api import get_method, resolve_target
from ..explain.engine import EMBEDDINGS
from ..explain.render import figure_to_rgb, new_figure
from ..explain.target_range import TargetRange, mean_range, measure_range
from ..faces.align import Chip
from ..faces.regions import chip_region_labels, chip_region_masks, regions_union
from ..image import load_image
from ..models.base import FaceModel
from ..models.registry import load_model
from ..outputs import atomic_write_text, save_png, write_json
from ..targets import Target, probability_target
from .agreement import Agreement
from .controls import CONTROLS, control_maps
from .deletion import DeletionInsertion
from .inpainting import InpaintingGame, explain_triplets, make_triplets
from .masking import MaskedConfidence
from .pointing import PointingGame, RegionHit, points_mask
from .sanity import ModelRandomization, group_layers, parameterized_layers
from .stats import CI, adjusted_level, holm, paired_difference, wilcoxon_p
from .verdict import MIN_N, decide

__all__ = ["METRICS", "EvaluationResult", "compare_maps", "evaluate"]

METRICS = ("deletion", "insertion", "masked", "pointing", "agreement", "sanity", "inpainting")
SANITY_PHOTOS = MIN_N  # a randomization sweep costs one map per layer: the fewest photos a verdict needs
RAY_CHUNK = 1024  # photos per Ray job: enough to repay starting the workers, few enough to hold their maps


@dataclass
class EvaluationResult:
    """Everything `evaluate` measured, plus the bookkeeping of what went in and out."""

    model: str
    methods: list[str]
    metrics: dict[str, dict[str, Any]]
    rows_in: int
    rows_out: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    comparisons: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    verdicts: list[str] = field(default_factory=list)
    controls: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "methods": self.methods, "controls": self.controls, "rows_in": self.rows_in,
                "rows_out": self.rows_out, "skipped": self.skipped, "seconds": round(self.seconds, 2),
                "settings": self.settings, "target": self.target, "verdicts": self.verdicts,
                "comparisons": self.comparisons, "metrics": self.metrics}

    def table(self) -> list[dict[str, Any]]:
        """A tidy table: one row per (metric, method, quantity), with the interval where the quantity has one."""
        rows: list[dict[str, Any]] = []
        intervals = {"auc_mean": "ci", "auc_normalized_mean": "auc_normalized_ci", "hit_rate": "ci",
                     "mass_share_mean": "ci", "spearman_mean": "ci", "average_drop_pct": "ci",
                     "increase_in_confidence_pct": "increase_ci", "win_pct": "win_ci", "rank_corr": "ci",
                     "ssim_of_abs_maps": "ssim_of_abs_maps_ci"}

        def add(metric: str, method: str, result: dict[str, Any]) -> None:
            for name, value in result.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    ci = result.get(intervals.get(name, ""), [None, None])
                    rows.append({"metric": metric, "method": method, "quantity": name, "value": value,
                                 "ci_low": ci[0], "ci_high": ci[1]})
                elif isinstance(value, str) and name == "verdict":
                    rows.append({"metric": metric, "method": method, "quantity": name, "value": value,
                                 "ci_low": None, "ci_high": None})

        for key, result in self.metrics.items():
            metric, _, method = key.partition(":")
            if metric == "inpainting":
                for meth, res in result.get("methods", {}).items():
                    add(metric, meth, res if isinstance(res, dict) else {})
            add(metric, method, result)
        for metric, comps in self.comparisons.items():
            for c in comps:
                rows.append({"metric": f"{metric} comparison", "method": f"{c['a']} − {c['b']}",
                             "quantity": f"difference ({c['status']})", "value": c["difference"],
                             "ci_low": c["ci"][0], "ci_high": c["ci"][1]})
        return rows


def _explain_batch(model: FaceModel, explainers: dict[str, Any], rows: list[ManifestRow]) -> list[Any]:
    """The map of `evaluate`: load, align and explain a batch; one record (or RowFailure) per row."""
    out: list[Any] = []
    chips: list[Chip] = []
    for row in rows:
        try:
            chips.append(model.chip(load_image(row.path)))
            out.append(None)
        except FaceLensError as exc:
            out.append(RowFailure(str(row.path), str(exc)))
    if not chips:
        return out
    x = model.to_tensor(chips)
    targets = [resolve_target(model, c) for c in chips]
    maps = {m: e.attribute(x, targets, chips=chips) for m, e in explainers.items()}
    records = iter([{"chip": c, "target": t, "maps": {m: maps[m][i].clone() for m in maps}}
                    for i, (c, t) in enumerate(zip(chips, targets, strict=True))])
    return [next(records) if o is None else o for o in out]


def _explain_worker(model: FaceModel | str, methods: Sequence[str], batch_size: int, seed: int,
                    settings: dict[str, dict[str, object]]) -> BatchFn:
    """Build the model and explainers once per worker (picklable, for the Ray executor)."""
    fm = load_model(model) if isinstance(model, str) else model
    explainers = {m: get_method(m)(fm, batch_size=batch_size, seed=seed, **settings.get(m, {})) for m in methods}
    return functools.partial(_explain_batch, fm, explainers)


def _batches(rows: Sequence[ManifestRow], result: MapResult, size: int) -> Iterator[list[tuple[ManifestRow, Any]]]:
    """The kept (row, record) pairs grouped as the map batched the rows, so metrics see the same batches."""
    kept = iter(zip(result.rows, result.records, strict=True))
    pending = next(kept, None)
    for start in range(0, len(rows), size):
        group = []
        for row in rows[start:start + size]:
            if pending is not None and pending[0] == row:
                group.append(pending)
                pending = next(kept, None)
        if group:
            yield group


def evaluate(
    manifest: str | Path | Sequence[ManifestRow],
    model: FaceModel | str,
    methods: Sequence[str],
    metrics: Sequence[str] = ("deletion", "insertion"),
    *,
    datasets: Sequence[str] | None = None,
    limit: int | None = None,
    baseline: str = "blur",
    steps: int = 20,
    pointing_region: str = "eyes",
    photo_batch: int = 8,
    batch_size: int = 64,
    seed: int = 0,
    method_settings: dict[str, dict[str, object]] | None = None,
    executor: str = "local",
    address: str | None = None,
    sanity_photos: int = SANITY_PHOTOS,
    cohort: str = "auto",
) -> EvaluationResult:
    """Score methods on the photos of a manifest with the chosen metrics, beside the control maps.

    The target is the model's default (:func:`facelens.explain.api.resolve_target`): for recognizers
    the match to each face's own unperturbed embedding, cohort-normalized when the model has a
    cohort; for classifiers the top class (probabilities for the masking metric).

    Loading, aligning and explaining the photos (the map) runs on ``executor`` ("local" or
    "ray" at ``address``, see :mod:`facelens.executors`) in batches of ``photo_batch``; the
    metrics, which keep streaming state, are updated here from those batches, so the result
    does not depend on the executor. On Ray the manifest goes out in chunks of
    ``RAY_CHUNK`` photos, whose maps are held until their metrics are updated. The sanity
    check runs on the first ``sanity_photos`` photos (a verdict needs at least ``MIN_N``).

    ``cohort`` (recognizers) gives the match score its unit: ``"auto"`` uses the model's own cohort
    (shipped for zoo recognizers) and otherwise builds one from this manifest's photos when they name
    at least :data:`MANIFEST_COHORT_MIN` people; ``"manifest"`` always builds it from the manifest;
    ``"none"`` falls back to the projection onto the face's own embedding (no unit, little range).
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ModelError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
    clash = sorted(set(methods) & set(CONTROLS))
    if clash:
        raise ModelError(f"{clash} name control maps that are always evaluated; drop them from the methods")
    t0 = time.perf_counter()
    fm = load_model(model) if isinstance(model, str) else model
    rows = read_manifest(manifest, datasets=datasets) if isinstance(manifest, (str, Path)) else list(manifest)
    if limit is not None:
        rows = rows[:limit]
    with_cohort = _with_cohort(fm, rows, cohort, seed)
    if with_cohort is not fm:
        model = fm = with_cohort  # workers get this model, so they score against the same cohort
    settings = method_settings or {}
    explainers = {m: get_method(m)(fm, batch_size=batch_size, seed=seed, **settings.get(m, {})) for m in methods}
    scored = [*methods, *CONTROLS]  # every faithfulness metric scores the controls beside the methods
    state: dict[str, Any] = {}
    for m in scored:
        for kind in ("deletion", "insertion"):
            if kind in metrics:
                state[f"{kind}:{m}"] = DeletionInsertion(fm.net, mode=kind, baseline=baseline, steps=steps,
                                                         batch_size=batch_size, seed=seed)
        if "pointing" in metrics:
            state[f"pointing:{m}"] = PointingGame(seed=seed)
            state[f"region_hit:{m}"] = RegionHit(seed=seed)
            state[f"pointing_pupils:{m}"] = PointingGame(seed=seed)  # FRL photos: annotated pupils (.tem 0, 1)
    if "masked" in metrics:
        state["masked"] = MaskedConfidence(fm.net, batch_size=batch_size, controls=CONTROLS, seed=seed)
    if "sanity" in metrics:
        steps_by_block = _sanity_steps(fm)  # one step per block: the curve's shape, at a third of the cost
        for m in methods:
            state[f"sanity:{m}"] = ModelRandomization(fm, m, mode="cascading", layers=steps_by_block, seed=seed,
                                                      batch_size=batch_size, settings=settings.get(m, {}))
    sanity_left = sanity_photos
    pairs = list(itertools.combinations(methods, 2)) if "agreement" in metrics else []
    for a, b in pairs:
        state[f"agreement:{a} vs {b}"] = Agreement(seed=seed)
    skipped: list[dict[str, str]] = []
    done = 0
    ranges: list[TargetRange] = []
    seen: list[tuple[Target, np.ndarray | None, str | None]] = []  # target, embedding, identity per photo

    def update(batch: list[tuple[ManifestRow, dict[str, Any]]]) -> None:
        """The reduce: feed one explained photo batch to every metric."""
        nonlocal done, sanity_left
        chips = [rec["chip"] for _, rec in batch]
        x = fm.to_tensor(chips)
        targets = [rec["target"] for _, rec in batch]
        labels = [str(r.path) for r, _ in batch]
        clusters = [f"{r.dataset}:{r.identity}" if r.identity else str(r.path) for r, _ in batch]
        controls = [control_maps(c.image, lab, seed) for c, lab in zip(chips, labels, strict=True)]
        maps = {m: torch.stack([rec["maps"][m] for _, rec in batch]) for m in methods}
        maps.update({c: torch.stack([torch.from_numpy(ctl[c]) for ctl in controls]) for c in CONTROLS})
        ranges.extend(measure_range(fm.net, x, targets, batch_size=batch_size,
                                    baseline=baseline if baseline in ("blur", "mean") else "blur"))
        emb = EMBEDDINGS.get(fm.net, np.stack([c.image for c in chips])) if fm.task == "embedding" else None
        seen.extend((t, None if emb is None else emb[i], r.identity) for i, (t, (r, _)) in
                    enumerate(zip(targets, batch, strict=True)))
        for m in scored:
            for kind in ("deletion", "insertion"):
                if f"{kind}:{m}" in state:
                    state[f"{kind}:{m}"].update(x, maps[m], targets, labels, clusters)
        if "pointing" in metrics:
            masks = [chip_region_masks(c) for c in chips]
            regions = [regions_union(mk, pointing_region) for mk in masks]
            region_labels = [chip_region_labels(c) for c in chips]
            pupils = [(i, _pupils_on_chip(r, rec["chip"])) for i, (r, rec) in enumerate(batch)]
            pupils = [(i, p) for i, p in pupils if p is not None]
            for m in scored:
                state[f"pointing:{m}"].update(maps[m].numpy(), regions, region_labels, clusters)
                state[f"region_hit:{m}"].update(maps[m].numpy(), regions, clusters)
                if pupils:
                    state[f"pointing_pupils:{m}"].update([maps[m][i].numpy() for i, _ in pupils],
                                                         [p for _, p in pupils],
                                                         [region_labels[i] for i, _ in pupils],
                                                         [clusters[i] for i, _ in pupils])
        if "sanity" in metrics and sanity_left > 0:
            k = min(sanity_left, len(chips))
            for m in methods:
                state[f"sanity:{m}"].update(x[:k], targets[:k], chips=chips[:k])
            sanity_left -= k
        if "masked" in state:
            state["masked"].update(x, {m: maps[m].numpy() for m in scored},
                                   [probability_target(t) for t in targets], clusters)
        for a, b in pairs:
            state[f"agreement:{a} vs {b}"].update(maps[a].numpy(), maps[b].numpy())
        done += len(batch)

    if executor == "local":  # one photo batch at a time, with the explainers built above: memory stays flat
        chunk = photo_batch
        make_worker: Callable[[], BatchFn] = lambda: functools.partial(_explain_batch, fm, explainers)  # noqa: E731
    else:
        chunk = max(photo_batch, RAY_CHUNK - RAY_CHUNK % photo_batch)
        make_worker = functools.partial(_explain_worker, model if isinstance(model, str) else fm, list(methods),
                                        batch_size, seed, settings)
    for c0 in range(0, len(rows), chunk):
        part = rows[c0:c0 + chunk]
        mapped = map_rows(part, make_worker, executor=executor, address=address,  # type: ignore[arg-type]
                          batch_size=photo_batch)
        skipped.extend(f.as_dict() for f in mapped.failures)
        for group in _batches(part, mapped, photo_batch):
            update(group)
    results = {k: _without_empty(k, v.compute()) for k, v in state.items()}
    results = {k: v for k, v in results.items() if v is not None}
    if "masked" in results:  # one entry per map, as every other metric: masked:<method>
        masked = results.pop("masked")
        for m, vals in masked.get("methods", {}).items():
            results[f"masked:{m}"] = {"metric": masked["metric"], "mass": masked["mass"], **vals,
                                      "how_measured": masked["how_measured"]}
    comparisons = _comparisons(state, methods, metrics, seed)
    target = _target_summary(ranges, seen)
    verdicts = _verdicts(results, comparisons, methods, target)
    if "inpainting" in metrics:
        results["inpainting"] = _inpainting(fm, rows, methods, batch_size, seed, settings)
    return EvaluationResult(
        model=fm.name, methods=list(methods), metrics=results,
        rows_in=len(rows), rows_out=done, skipped=skipped, seconds=time.perf_counter() - t0,
        settings={"baseline": baseline, "steps": steps, "pointing_region": pointing_region,
                  "batch_size": batch_size, "seed": seed, "method_settings": settings,
                  "sanity_photos": sanity_photos, "ci": CI, "min_n": MIN_N,
                  "target": target.get("description", "")},
        target=target, comparisons=comparisons, verdicts=verdicts, controls=list(CONTROLS),
    )


def _sanity_steps(fm: FaceModel) -> list[list[str]]:
    """Cascading steps of whole blocks (layers sharing their first two name parts, e.g. ``stage3.block2``),
    output side first. The verdict reads the last step, where every layer is random either way."""
    h, w = fm.input_size
    names = parameterized_layers(fm.net, torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)))
    return [group for _, group in group_layers(names, 2)]


MANIFEST_COHORT_MIN = 20  #: people a manifest needs before its photos make a cohort
MANIFEST_COHORT_PEOPLE = 200  #: at most this many people (two photos each) are embedded for it


def _with_cohort(fm: FaceModel, rows: Sequence[ManifestRow], how: str, seed: int) -> FaceModel:
    """The model with the cohort ``how`` asks for (see `evaluate`); classifiers are returned as they are."""
    import dataclasses
    import random

    from ..models.cohort import cohort_from_embeddings

    if how not in ("auto", "manifest", "none"):
        raise ModelError(f"cohort must be 'auto', 'manifest' or 'none', got {how!r}")
    if fm.task != "embedding":
        return fm
    if how == "none":
        return dataclasses.replace(fm, cohort=None)
    if how == "auto" and fm.cohort is not None:
        return fm
    people: dict[str, list[ManifestRow]] = {}
    for r in rows:
        if r.identity:
            people.setdefault(f"{r.dataset}:{r.identity}", []).append(r)
    if len(people) < MANIFEST_COHORT_MIN:
        if how == "manifest":
            raise ModelError(f"a cohort from the manifest needs photos of at least {MANIFEST_COHORT_MIN} named people; "
                             f"these rows name {len(people)}")
        return fm
    keys = sorted(people)
    random.Random(seed).shuffle(keys)
    chips, ids = [], []
    for k in keys[:MANIFEST_COHORT_PEOPLE]:
        for r in people[k][:2]:
            try:
                chips.append(fm.chip(load_image(r.path)))
                ids.append(k)
            except FaceLensError:
                continue
    emb = fm.forward_chips(chips) if chips else np.zeros((0, 1))
    built = cohort_from_embeddings(fm.name, emb, ids, provenance={
        "source": f"the evaluated manifest's photos ({len(set(ids))} people, the evaluated ones included)",
        "built_by": "facelens.evaluate.runner"})
    return dataclasses.replace(fm, cohort=built)


def _without_empty(key: str, result: dict[str, Any]) -> dict[str, Any] | None:
    """Drop pupil pointing entries of runs without annotated pupils (most manifests have none)."""
    return None if key.startswith("pointing_pupils:") and not result.get("n") else result


#: per metric: what a better map does to the per-photo value, and the words for it
_COMPARED: dict[str, tuple[str, str]] = {
    "deletion": ("below", "has a lower deletion AUC (removing its top pixels first lowers the score faster)"),
    "insertion": ("above", "has a higher insertion AUC (restoring its top pixels first raises the score faster)"),
    "masked": ("above", "has a larger Average Drop (masking its salient mass costs more of the score)"),
}


def compare_maps(values: dict[str, np.ndarray], clusters: Sequence[str], *, better: str, claim: str,
                 pairs: Sequence[tuple[str, str]], seed: int = 0) -> list[dict[str, Any]]:
    """Paired comparisons of per-photo values: each pair's difference with a Bonferroni-adjusted interval
    (over ``pairs``), decided by the one verdict rule, plus a Holm-adjusted Wilcoxon p-value beside it."""
    level = adjusted_level(CI, len(pairs))
    p_raw = [wilcoxon_p(values[a], values[b]) for a, b in pairs]
    p_adj = holm(p_raw) if pairs else []
    out = []
    for (a, b), p, q in zip(pairs, p_raw, p_adj, strict=True):
        d = paired_difference(values[a], values[b], list(clusters), ci=level, seed=seed)
        v = decide(f"{a} {claim.split(' (')[0]} than {b}", d, 0.0, direction=better, min_n=MIN_N, unit="photos")
        adjusted = f"; level Bonferroni-adjusted over {len(pairs)} comparisons" if len(pairs) > 1 else ""
        out.append({"a": a, "b": b, "difference": d.value, "ci": d.bounds, "level": level, "n": d.n,
                    "n_units": d.n_clusters, "p_wilcoxon": p, "p_holm": q, "status": v.status,
                    "sentence": v.sentence()[:-1] + f"{adjusted}; Holm-adjusted Wilcoxon p = {q:.2g}."})
    return out


def _comparisons(state: dict[str, Any], methods: Sequence[str], metrics: Sequence[str],
                 seed: int) -> dict[str, list[dict[str, Any]]]:
    """Every pair of methods, and every method against every control, per faithfulness metric."""
    pairs = [*itertools.combinations(methods, 2), *((m, c) for m in methods for c in CONTROLS)]
    out: dict[str, list[dict[str, Any]]] = {}
    for metric, (better, claim) in _COMPARED.items():
        if metric not in metrics or not pairs:
            continue
        if metric == "masked":
            mc = state["masked"]
            y = np.asarray(mc.original, np.float64)
            safe = np.where(np.abs(y) > 1e-12, y, np.nan)
            values = {m: np.clip(y - np.asarray(v, np.float64), 0, None) / np.abs(safe) * 100
                      for m, v in mc.masked.items()}
            clusters = mc.clusters
        else:
            values = {m: state[f"{metric}:{m}"].per_image_auc() for m in [*methods, *CONTROLS]}
            clusters = state[f"{metric}:{methods[0]}"].clusters
        if len(clusters):
            out[metric] = compare_maps(values, clusters, better=better, claim=claim, pairs=pairs, seed=seed)
    return out


def _target_summary(ranges: Sequence[TargetRange],
                    seen: Sequence[tuple[Target, np.ndarray | None, str | None]]) -> dict[str, Any]:
    """The target's mean levels over photos; for a recognizer on a manifest that names people, the impostor
    level measured here too: each photo's target scored on the other people's photos (median, then mean)."""
    summary = mean_range(ranges)
    if not summary:
        return {}
    summary["impostor_median_cohort"] = summary.get("impostor_median")
    people = {ident for _, e, ident in seen if e is not None and ident}
    if len(people) > MIN_N:
        medians = []
        for t, e, ident in seen:
            others = [o for _, o, j in seen if o is not None and j and j != ident]
            if e is None or not ident or not others:
                continue
            with torch.no_grad():
                medians.append(float(torch.median(t(torch.as_tensor(np.stack(others)).float()))))
        if medians:
            summary.update(impostor_median=float(np.mean(medians)), impostor_source=(
                f"each photo's target on the {len(people) - 1} other people's photos of this run: median, then "
                f"the mean over {len(medians)} photos"), impostor_median_manifest=float(np.mean(medians)))
    imp = summary.get("impostor_median")
    summary["removes_identity"] = None if imp is None else bool(max(summary["deleted_blur"],
                                                                    summary["deleted_mean"]) <= imp)
    if imp is not None:  # per photo too: a mean can hide the one face that blurring does not remove
        summary["photos_not_removed"] = sum(r.deleted > imp for r in ranges)
    return summary


def _verdicts(results: dict[str, dict[str, Any]], comparisons: dict[str, list[dict[str, Any]]],
              methods: Sequence[str], target: dict[str, Any]) -> list[str]:
    """The run's findings in words, each from the verdict rule: does a method beat the random map, and the
    sanity checks; plus a warning when the target's range cannot support faithfulness numbers."""
    out = []
    if target.get("removes_identity") is False:
        out.append(f"Warning: removing the whole face leaves the target at {target['deleted']:.3g} {target['unit']}, "
                   f"above the impostor level {target['impostor_median']:.3g}: deletion and insertion AUCs on this "
                   "target measure little.")
    elif target.get("photos_not_removed"):
        out.append(f"Note: on {target['photos_not_removed']} of {target['n']} photos the fully deleted face still "
                   f"scores above the impostor level ({target['impostor_median']:.3g}): their curves end above it.")
    elif target.get("impostor_median") is None and target.get("n") and target["intact"] != 0 \
            and target["deleted"] > 0.8 * target["intact"]:
        out.append(f"Warning: removing the whole face keeps {100 * target['deleted'] / target['intact']:.0f}% of the "
                   f"target ({target['deleted']:.3g} of {target['intact']:.3g} {target['unit']}): deletion and "
                   "insertion AUCs on this target have little range to measure.")
    for metric, comps in comparisons.items():
        for c in comps:
            if c["b"] == "random" and c["a"] in methods:
                out.append(f"{metric}: {c['sentence']}")
    meaning = {"pass": "the map changes when the weights are destroyed",
               "fail": "the map stays like the trained network's: it shows the image, not what was learned",
               "inconclusive": "cannot tell"}
    for m in methods:
        s = results.get(f"sanity:{m}")
        if s and s.get("sentence"):
            out.append(f"sanity, {m}: {s['verdict']} ({meaning[s['verdict']]}) — {s['sentence']}")
    return out


def _pupils_on_chip(row: ManifestRow, chip: Chip) -> np.ndarray | None:
    """Discs around the annotated pupils (FRL ``.tem`` points 0 and 1) on the chip, if annotated."""
    if row.landmarks_path is None or not Path(row.landmarks_path).is_file():
        return None
    pts = chip.points_to_chip(read_tem(row.landmarks_path)[:2])
    radius = max(2.0, 0.04 * chip.image.shape[0])
    mask = points_mask(chip.image.shape[:2], pts, radius)
    return mask if mask.any() else None


def _inpainting(model: FaceModel, rows: Sequence[ManifestRow], methods: Sequence[str], batch_size: int, seed: int,
                settings: dict[str, dict[str, object]]) -> dict[str, Any]:
    """The inpainting game on the manifest's identities that have a neutral and a smiling photo."""
    if model.task != "embedding":
        return {"skipped": f"the inpainting game needs a face matcher; {model.name} is a classifier"}
    source = [{"path": str(r.path), "identity": r.identity or "", "subset": r.subset or ""} for r in rows]
    game_set = make_triplets(source, model, threshold="genuine", seed=seed, batch_size=batch_size)  # absolute paths
    if not game_set.triplets:
        return {"skipped": "no kept cases: the game needs identities with a neutral and a smiling photo "
                           "(e.g. FRL London) that the network separates", "game_set": game_set.summary()}
    game = InpaintingGame(model, normalize=game_set.normalize)
    maps = {m: explain_triplets(model, game_set.triplets, m, normalize=game_set.normalize, batch_size=batch_size,
                                seed=seed, **settings.get(m, {})) for m in methods}
    game.update(game_set.triplets, maps)
    return {"game_set": game_set.summary(), **game.compute()}


def write_evaluation(result: EvaluationResult, out_dir: str | Path) -> dict[str, Path]:
    """``evaluation.json``, a tidy ``evaluation.csv`` and a deletion/insertion curve plot."""
    import csv
    import io

    out = Path(out_dir)
    paths = {"json": out / "evaluation.json", "csv": out / "evaluation.csv"}
    write_json(paths["json"], result.to_json())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["metric", "method", "quantity", "value", "ci_low", "ci_high"])
    w.writeheader()
    w.writerows(result.table())
    atomic_write_text(paths["csv"], buf.getvalue())
    curves = {k: v for k, v in result.metrics.items() if "mean_curve" in v}
    if curves:
        paths["curves"] = out / "curves.png"
        save_png(paths["curves"], plot_curves(curves, result.model, result.target, result.controls))
    return paths


_CONTROL_STYLE = {"random": ("0.35", "--"), "edges": ("0.55", ":"), "centre": ("0.55", "-.")}


def plot_curves(curves: dict[str, dict[str, Any]], model: str, target: dict[str, Any],
                controls: Sequence[str] = CONTROLS) -> np.ndarray:
    """Mean deletion and insertion curves in the target's unit, methods in colour and the control maps in
    grey, between the target's levels: intact, fully deleted (the floor) and, for matchers, the impostor
    level. The legend gives each map's AUC with its 95 % interval and n."""
    from matplotlib.transforms import blended_transform_factory

    fig, axes = new_figure(1, 2, figsize=(12, 5.2))
    levels = [(target.get("intact"), "intact", "tab:green"), (target.get("deleted"), "fully deleted", "tab:red"),
              (target.get("impostor_median"), "impostor median", "tab:purple")]
    for ax, kind in zip(axes, ("deletion", "insertion"), strict=True):
        k = 0
        for key, res in curves.items():
            if not key.startswith(kind + ":"):
                continue
            name = key.split(":", 1)[1]
            c = np.asarray(res["mean_curve"])
            lo, hi = res.get("ci", [None, None])
            label = f"{name}: {res['auc_mean']:.3g}" + (f" [{lo:.3g}, {hi:.3g}]" if lo is not None else "")
            if name in controls:
                color, style = _CONTROL_STYLE.get(name, ("0.5", ":"))
                ax.plot(np.linspace(0, 100, len(c)), c, color=color, linestyle=style, linewidth=1.4,
                        label=f"{label} (control)")
            else:
                ax.plot(np.linspace(0, 100, len(c)), c, color=f"C{k}", linewidth=2, label=label)
                k += 1
        bottom = [v for v, *_ in levels if v is not None]
        for value, name, color in levels:
            if value is not None:
                ax.axhline(value, color=color, linewidth=0.8, alpha=0.7)
                ax.text(1.01, value, f"{name} {value:.2g}", transform=blended_transform_factory(ax.transAxes,
                        ax.transData), fontsize=6.5, color=color, va="center", ha="left", clip_on=False)
        if bottom:
            span = max(bottom) - min(bottom)
            ax.set_ylim(min(bottom) - 0.08 * span, max(bottom) + 0.12 * span)
        ax.set_xlim(0, 100)
        ax.set_xlabel(f"% of pixels {'removed' if kind == 'deletion' else 'restored'} (most salient first)")
        ax.set_ylabel(f"mean target ({target.get('unit', 'score')})", fontsize=8)
        n = next((r["n"] for key, r in curves.items() if key.startswith(kind + ":")), 0)
        ax.set_title(f"{kind}: AUC, {'lower' if kind == 'deletion' else 'higher'} is better (n = {n} photos)",
                     fontsize=9)
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.suptitle(f"{model}: {target.get('description', '')}", fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.9, wspace=0.4, bottom=0.32)
    return figure_to_rgb(fig)
