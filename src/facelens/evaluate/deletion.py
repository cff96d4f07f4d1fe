"""Deletion and insertion curves (Petsiuk et al., RISE) and their areas.

Deletion removes the most salient pixels first and watches the score fall: a
faithful map makes it fall fast (low AUC). Insertion starts from the baseline
and restores the most salient pixels first: a faithful map makes the score rise
fast (high AUC). Both run for class targets and for verification targets, and
every image of a batch goes through the shared engine in one pass: the
``N × (steps + 1)`` perturbed images are built batch by batch from pixel ranks,
never all at once.

A curve runs between two levels of the target: the intact score and the *floor*, the score with
every pixel removed. The AUC is only as telling as that range, so each photo's floor and intact
level are kept, the headline AUC gets a bootstrap interval over photos, and the normalized AUC
rescales each curve to ``(score − floor) / (intact − floor)``: 1 at the intact level, 0 at the floor.
It lies in [0, 1] while a curve stays between its two ends; an insertion curve that overshoots the
intact score (a partly restored face scoring higher than the whole face) goes above 1, and photos
where removing everything moves the score by less than :data:`MIN_SPAN` of the intact level are
left out of the normalized value (counted in ``narrow_range``): dividing by a range of nearly
nothing would make noise look like a finding. The ``blur`` baseline blurs with σ =
:data:`~facelens.explain.perturbation.REMOVAL_BLUR_SIGMA` of the side, strong enough to remove a
face's identity (DISE's lighter blur leaves dlib-resnet matching most faces).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..explain.engine import DEFAULT_BATCH_SIZE, PerturbationEngine
from ..explain.perturbation import REMOVAL_BLUR_SIGMA, fill_image
from ..targets import Target
from .base import Metric
from .stats import mean_interval

__all__ = ["MIN_SPAN", "DeletionInsertion", "auc", "normalized_curve", "pixel_ranks"]

Mode = Literal["deletion", "insertion"]
#: photos whose floor is within this share of |intact| (or above it) get no normalized AUC
MIN_SPAN = 0.05


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Rank of every pixel, 0 = most salient; ties go to the lower pixel index (stable)."""
    flat = maps.reshape(maps.shape[0], -1)
    order = torch.argsort(-flat, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1]).expand_as(order).contiguous())
    return ranks


def auc(curve: np.ndarray) -> float:
    """Area under a curve sampled at equal steps over the fraction of pixels, x in [0, 1]."""
    y = np.asarray(curve, np.float64)
    return float(np.trapezoid(y, dx=1.0 / (len(y) - 1)))


def normalized_curve(curve: np.ndarray, mode: Mode) -> np.ndarray | None:
    """``(score − floor) / (intact − floor)``, or None when the range is too narrow to divide by."""
    c = np.asarray(curve, np.float64)
    intact, floor = (c[0], c[-1]) if mode == "deletion" else (c[-1], c[0])
    span = intact - floor
    if not span > MIN_SPAN * max(abs(intact), 1e-12):
        return None
    return (c - floor) / span


class DeletionInsertion(Metric):
    """Deletion or insertion curves and AUC over a stream of (image, map, target) batches.

    Args:
        net: the network (RGB in [0, 1] → outputs).
        mode: ``"deletion"`` (lower AUC is better) or ``"insertion"`` (higher is better).
        baseline: what removed pixels become: ``"blur"``, ``"mean"`` or ``"zero"``.
        steps: the curve has ``steps + 1`` points, from 0 to 100% of the pixels.
        batch_size: perturbed images per forward.
    """

    def __init__(self, net: nn.Module, *, mode: Mode = "deletion", baseline: str = "blur", steps: int = 20,
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: bool | None = None,
                 blur_sigma: float = REMOVAL_BLUR_SIGMA, seed: int = 0) -> None:
        super().__init__()
        if mode not in ("deletion", "insertion"):
            raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
        self.name = mode
        self.net, self.mode, self.baseline, self.steps = net, mode, baseline, int(steps)
        self.batch_size, self.progress = batch_size, progress
        self.blur_sigma, self.seed = float(blur_sigma), int(seed)
        self.add_state("curves", [])
        self.add_state("labels", [])
        self.add_state("clusters", [])

    def update(self, inputs: torch.Tensor, maps: torch.Tensor | np.ndarray, targets: Target | Sequence[Target],
               labels: Sequence[str] | None = None, clusters: Sequence[str] | None = None) -> np.ndarray:
        """Add a batch; returns its curves ``(N, steps + 1)``.

        ``clusters`` name the independent unit of each photo (its person) for the interval; by default
        each photo is its own unit.
        """
        maps_t = torch.as_tensor(np.asarray(maps, np.float32)) if not isinstance(maps, torch.Tensor) else maps.float()
        n, _, h, w = inputs.shape
        if maps_t.shape != (n, h, w):
            raise ValueError(f"maps must be {(n, h, w)}, got {tuple(maps_t.shape)}")
        ranks = pixel_ranks(maps_t)
        fills = torch.cat([fill_image(inputs[i:i + 1], self.baseline, blur_sigma=self.blur_sigma) for i in range(n)])
        counts = torch.round(torch.linspace(0, h * w, self.steps + 1)).long()
        per = self.steps + 1
        deletion = self.mode == "deletion"

        def build(start: int, stop: int) -> torch.Tensor:
            idx = torch.arange(start, stop)
            img, step = idx // per, idx % per
            removed = ranks[img] < counts[step][:, None]
            keep = ~removed if deletion else removed
            m = keep.view(-1, 1, h, w).float()
            return torch.addcmul(fills[img], m, inputs[img] - fills[img])

        engine = PerturbationEngine(self.net, targets if isinstance(targets, Target) else list(targets),
                                    batch_size=self.batch_size, progress=self.progress, desc=self.mode)
        owners = None if isinstance(targets, Target) else (lambda a, b: torch.arange(a, b) // per)
        scores = engine.run(n * per, build, owners=owners).view(n, per).numpy().astype(np.float64)
        self.curves.extend(list(scores))
        names = list(labels) if labels is not None else [str(len(self.labels) + i) for i in range(n)]
        self.labels.extend(names)
        self.clusters.extend(list(clusters) if clusters is not None else names)
        return scores

    def per_image_auc(self) -> np.ndarray:
        return np.array([auc(c) for c in self.curves])

    def compute(self) -> dict[str, Any]:
        if not self.curves:
            return {"metric": self.mode, "n": 0}
        curves = np.stack(self.curves)
        aucs = self.per_image_auc()
        normed = [normalized_curve(c, self.mode) for c in curves]
        norm_auc = np.array([auc(c) if c is not None else np.nan for c in normed])
        kept = [c for c in normed if c is not None]
        head = mean_interval(aucs, self.clusters, seed=self.seed)
        norm = mean_interval(norm_auc, self.clusters, seed=self.seed)
        intact, floor = (curves[:, 0], curves[:, -1]) if self.mode == "deletion" else (curves[:, -1], curves[:, 0])
        outside = int(sum(bool(np.any((c < -1e-9) | (c > 1 + 1e-9))) for c in kept))
        better = "lower" if self.mode == "deletion" else "higher"
        return {
            "metric": self.mode, "baseline": self.baseline, "steps": self.steps, "n": len(curves),
            "n_units": head.n_clusters, "blur_sigma": self.blur_sigma if self.baseline == "blur" else None,
            "auc_mean": head.value, "ci": head.bounds, "auc_std": float(aucs.std(ddof=1)) if len(aucs) > 1
            else 0.0, "interval": head.method,
            "auc_normalized_mean": norm.value if np.isfinite(norm.value) else None,
            "auc_normalized_ci": norm.bounds,
            "narrow_range": int(sum(c is None for c in normed)), "curves_outside_range": outside,
            "intact_mean": float(intact.mean()), "floor_mean": float(floor.mean()),
            "mean_curve": curves.mean(0).tolist(),
            "mean_curve_normalized": np.mean(kept, axis=0).tolist() if kept else None,
            "per_image": [{"label": lab, "auc": float(a), "auc_normalized": None if not np.isfinite(b) else float(b),
                           "intact": float(i), "floor": float(f)}
                          for lab, a, b, i, f in zip(self.labels, aucs, norm_auc, intact, floor, strict=True)],
            "how_measured": (
                f"{'remove' if self.mode == 'deletion' else 'insert'} pixels in order of saliency in {self.steps} "
                f"equal steps ({self.baseline} baseline"
                + (f", σ = {self.blur_sigma:g} of the side" if self.baseline == "blur" else "")
                + f"); trapezoidal area over the fraction of pixels ({better} is better); interval: 95% bootstrap "
                "over photos (resampling people when known); normalized = each curve rescaled to "
                "(score − floor)/(intact − floor), in [0, 1] while the curve stays between its ends "
                f"(curves_outside_range counts those that do not), photos whose range is under "
                f"{MIN_SPAN:.0%} of the intact score left out (narrow_range)"),
        }
