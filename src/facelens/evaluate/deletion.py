"""Deletion and insertion curves (Petsiuk et al., RISE) and their areas.

Deletion removes the most salient pixels first and watches the score fall: a
faithful map makes it fall fast (low AUC). Insertion starts from the baseline
and restores the most salient pixels first: a faithful map makes the score rise
fast (high AUC). Both run for class targets and for verification targets, and
every image of a batch goes through the shared engine in one pass: the
``N × (steps + 1)`` perturbed images are built batch by batch from pixel ranks,
never all at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..explain.engine import DEFAULT_BATCH_SIZE, PerturbationEngine
from ..explain.perturbation import fill_image
from ..targets import Target
from .base import Metric

__all__ = ["DeletionInsertion", "auc", "pixel_ranks"]

Mode = Literal["deletion", "insertion"]


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
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: bool | None = None) -> None:
        super().__init__()
        if mode not in ("deletion", "insertion"):
            raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
        self.name = mode
        self.net, self.mode, self.baseline, self.steps = net, mode, baseline, int(steps)
        self.batch_size, self.progress = batch_size, progress
        self.add_state("curves", [])
        self.add_state("labels", [])

    def update(self, inputs: torch.Tensor, maps: torch.Tensor | np.ndarray, targets: Target | Sequence[Target],
               labels: Sequence[str] | None = None) -> np.ndarray:
        """Add a batch; returns its curves ``(N, steps + 1)``."""
        maps_t = torch.as_tensor(np.asarray(maps, np.float32)) if not isinstance(maps, torch.Tensor) else maps.float()
        n, _, h, w = inputs.shape
        if maps_t.shape != (n, h, w):
            raise ValueError(f"maps must be {(n, h, w)}, got {tuple(maps_t.shape)}")
        ranks = pixel_ranks(maps_t)
        fills = torch.cat([fill_image(inputs[i:i + 1], self.baseline) for i in range(n)])
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
        self.labels.extend(list(labels) if labels is not None else [str(len(self.labels) + i) for i in range(n)])
        return scores

    def compute(self) -> dict[str, Any]:
        if not self.curves:
            return {"metric": self.mode, "n": 0}
        curves = np.stack(self.curves)
        aucs = np.array([auc(c) for c in curves])
        norm = np.array([auc(c / c[0]) if self.mode == "deletion" and c[0] != 0 else
                         auc(c / c[-1]) if c[-1] != 0 else np.nan for c in curves])
        return {
            "metric": self.mode, "baseline": self.baseline, "steps": self.steps, "n": len(curves),
            "auc_mean": float(aucs.mean()), "auc_std": float(aucs.std(ddof=1)) if len(aucs) > 1 else 0.0,
            "auc_normalized_mean": float(np.nanmean(norm)),
            "mean_curve": curves.mean(0).tolist(),
            "per_image": [{"label": lab, "auc": float(a)} for lab, a in zip(self.labels, aucs, strict=True)],
            "how_measured": (f"{'remove' if self.mode == 'deletion' else 'insert'} pixels in order of saliency "
                             f"in {self.steps} equal steps ({self.baseline} baseline); trapezoidal area over the "
                             "fraction of pixels; normalized = curve divided by the unperturbed "
                             "(deletion) or fully restored (insertion) score"),
        }
