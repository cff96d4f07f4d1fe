"""`evaluate`: stream a manifest of photos through methods and metrics.

Photos are read, aligned and explained in batches; each metric keeps only its
small per-image state, so memory stays bounded however long the manifest is.
Bad photos (unreadable, no face) are reported and skipped, never fatal, and the
output counts rows in and rows out.
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
from ..explain.render import figure_to_rgb, new_figure
from ..faces.align import Chip
from ..faces.regions import chip_region_masks, regions_union
from ..image import load_image
from ..models.base import FaceModel
from ..models.registry import load_model
from ..outputs import atomic_write_text, save_png, write_json
from ..targets import probability_target
from .agreement import Agreement
from .deletion import DeletionInsertion
from .inpainting import InpaintingGame, explain_triplets, make_triplets
from .masking import MaskedConfidence
from .pointing import PointingGame, RegionHit, points_mask
from .sanity import ModelRandomization

__all__ = ["METRICS", "EvaluationResult", "evaluate"]

METRICS = ("deletion", "insertion", "masked", "pointing", "agreement", "sanity", "inpainting")
SANITY_PHOTOS = 4  # a randomization sweep costs one map per layer: run it on the first few photos
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

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "methods": self.methods, "rows_in": self.rows_in, "rows_out": self.rows_out,
                "skipped": self.skipped, "seconds": round(self.seconds, 2), "settings": self.settings,
                "metrics": self.metrics}

    def table(self) -> list[dict[str, Any]]:
        """A tidy table: one row per (metric, method, quantity)."""
        rows: list[dict[str, Any]] = []
        for key, result in self.metrics.items():
            metric, _, method = key.partition(":")
            for name, value in result.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    rows.append({"metric": metric, "method": method, "quantity": name, "value": value})
                elif isinstance(value, dict) and metric == "masked":
                    for meth, vals in value.items():
                        for q, v in vals.items():
                            rows.append({"metric": metric, "method": meth, "quantity": q, "value": v})
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
) -> EvaluationResult:
    """Score methods on the photos of a manifest with the chosen metrics.

    For recognizers the target is each face's similarity to its own unperturbed
    embedding; for classifiers, the top class (probabilities for the masking metric).

    Loading, aligning and explaining the photos (the map) runs on ``executor`` ("local" or
    "ray" at ``address``, see :mod:`facelens.executors`) in batches of ``photo_batch``; the
    metrics, which keep streaming state, are updated here from those batches, so the result
    does not depend on the executor. On Ray the manifest goes out in chunks of
    ``RAY_CHUNK`` photos, whose maps are held until their metrics are updated.
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ModelError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
    t0 = time.perf_counter()
    fm = load_model(model) if isinstance(model, str) else model
    rows = read_manifest(manifest, datasets=datasets) if isinstance(manifest, (str, Path)) else list(manifest)
    if limit is not None:
        rows = rows[:limit]
    settings = method_settings or {}
    explainers = {m: get_method(m)(fm, batch_size=batch_size, seed=seed, **settings.get(m, {})) for m in methods}
    state: dict[str, Any] = {}
    for m in methods:
        if "deletion" in metrics:
            state[f"deletion:{m}"] = DeletionInsertion(fm.net, mode="deletion", baseline=baseline, steps=steps,
                                                       batch_size=batch_size)
        if "insertion" in metrics:
            state[f"insertion:{m}"] = DeletionInsertion(fm.net, mode="insertion", baseline=baseline, steps=steps,
                                                        batch_size=batch_size)
        if "pointing" in metrics:
            state[f"pointing:{m}"] = PointingGame()
            state[f"region_hit:{m}"] = RegionHit()
    if "masked" in metrics:
        state["masked"] = MaskedConfidence(fm.net, batch_size=batch_size)
    if "pointing" in metrics:
        for m in methods:  # Face Research Lab photos: annotated pupils (points 0 and 1 of the .tem)
            state[f"pointing_pupils:{m}"] = PointingGame()
    if "sanity" in metrics:
        for m in methods:
            state[f"sanity:{m}"] = ModelRandomization(fm, m, mode="cascading", seed=seed, batch_size=batch_size,
                                                      settings=settings.get(m, {}))
    sanity_left = SANITY_PHOTOS
    pairs = list(itertools.combinations(methods, 2)) if "agreement" in metrics else []
    for a, b in pairs:
        state[f"agreement:{a} vs {b}"] = Agreement()
    skipped: list[dict[str, str]] = []
    done = 0

    def update(batch: list[tuple[ManifestRow, dict[str, Any]]]) -> None:
        """The reduce: feed one explained photo batch to every metric."""
        nonlocal done, sanity_left
        chips = [rec["chip"] for _, rec in batch]
        x = fm.to_tensor(chips)
        targets = [rec["target"] for _, rec in batch]
        maps = {m: torch.stack([rec["maps"][m] for _, rec in batch]) for m in methods}
        labels = [str(r.path) for r, _ in batch]
        for m in methods:
            for kind in ("deletion", "insertion"):
                if f"{kind}:{m}" in state:
                    state[f"{kind}:{m}"].update(x, maps[m], targets, labels)
        if "pointing" in metrics:
            regions = [regions_union(chip_region_masks(c), pointing_region) for c in chips]
            for m in methods:
                state[f"pointing:{m}"].update(maps[m].numpy(), regions)
                state[f"region_hit:{m}"].update(maps[m].numpy(), regions)
            pupils = [(i, _pupils_on_chip(r, rec["chip"])) for i, (r, rec) in enumerate(batch)]
            pupils = [(i, p) for i, p in pupils if p is not None]
            if pupils:
                for m in methods:
                    state[f"pointing_pupils:{m}"].update([maps[m][i].numpy() for i, _ in pupils],
                                                         [p for _, p in pupils])
        if "sanity" in metrics and sanity_left > 0:
            k = min(sanity_left, len(chips))
            for m in methods:
                state[f"sanity:{m}"].update(x[:k], targets[:k], chips=chips[:k])
            sanity_left -= k
        if "masked" in state:
            state["masked"].update(x, {m: maps[m].numpy() for m in methods}, [probability_target(t) for t in targets])
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
    results = {k: v.compute() for k, v in state.items()}
    if "inpainting" in metrics:
        results["inpainting"] = _inpainting(fm, rows, methods, batch_size, seed, settings)
    return EvaluationResult(
        model=fm.name, methods=list(methods), metrics=results,
        rows_in=len(rows), rows_out=done, skipped=skipped, seconds=time.perf_counter() - t0,
        settings={"baseline": baseline, "steps": steps, "pointing_region": pointing_region,
                  "batch_size": batch_size, "seed": seed, "method_settings": settings,
                  "target": "top class (classifier) / similarity to own embedding (recognizer)"},
    )


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
    w = csv.DictWriter(buf, fieldnames=["metric", "method", "quantity", "value"])
    w.writeheader()
    w.writerows(result.table())
    atomic_write_text(paths["csv"], buf.getvalue())
    curves = {k: v["mean_curve"] for k, v in result.metrics.items() if "mean_curve" in v}
    if curves:
        paths["curves"] = out / "curves.png"
        save_png(paths["curves"], _plot_curves(curves, result.model))
    return paths


def _plot_curves(curves: dict[str, list[float]], model: str) -> np.ndarray:
    fig, axes = new_figure(1, 2, figsize=(9, 3.6))
    for ax, kind in zip(axes, ("deletion", "insertion"), strict=True):
        for key, c in curves.items():
            if key.startswith(kind + ":"):
                ax.plot(np.linspace(0, 100, len(c)), c, label=key.split(":", 1)[1])
        ax.set_xlabel(f"% of pixels {'removed' if kind == 'deletion' else 'restored'} (most salient first)")
        ax.set_ylabel("mean target score")
        ax.set_title(f"{kind} ({'lower' if kind == 'deletion' else 'higher'} area is better)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(model, fontsize=10)
    return figure_to_rgb(fig)
