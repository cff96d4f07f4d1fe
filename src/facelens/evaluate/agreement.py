"""Agreement between two methods' maps: rank correlation and top-k% overlap.

The classic workshop compared Grad-CAM with occlusion by eye; these put a
number on it. Spearman looks at the whole ranking; top-k% IoU at whether the
two maps mark the same most-salient pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from scipy.stats import spearmanr

from .base import Metric
from .stats import mean_interval

__all__ = ["Agreement", "spearman", "topk_iou"]


def _same_grid(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        b = cv2.resize(b.astype(np.float32), (a.shape[1], a.shape[0]), interpolation=cv2.INTER_LINEAR)
        b = b.astype(np.float64)
    return a, b


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (resampled to the first map's grid)."""
    a, b = _same_grid(a, b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def topk_iou(a: np.ndarray, b: np.ndarray, k: float = 0.1) -> float:
    """IoU of the top ``k`` fraction of pixels of each map (ties broken by pixel order)."""
    a, b = _same_grid(a, b)
    n = max(1, round(k * a.size))
    ta = np.zeros(a.size, bool)
    tb = np.zeros(b.size, bool)
    ta[np.argsort(-a.ravel(), kind="stable")[:n]] = True
    tb[np.argsort(-b.ravel(), kind="stable")[:n]] = True
    return float((ta & tb).sum() / (ta | tb).sum())


class Agreement(Metric):
    """Mean Spearman and top-k% IoU between pairs of maps over a stream of images."""

    name = "agreement"

    def __init__(self, k: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.k, self.seed = k, int(seed)
        self.add_state("rho", [])
        self.add_state("iou", [])

    def update(self, maps_a: Sequence[np.ndarray], maps_b: Sequence[np.ndarray]) -> None:
        for a, b in zip(maps_a, maps_b, strict=True):
            self.rho.append(spearman(a, b))
            self.iou.append(topk_iou(a, b, self.k))

    def compute(self) -> dict[str, Any]:
        rho, iou = np.asarray(self.rho), np.asarray(self.iou)
        if not rho.size:
            return {"metric": self.name, "n": 0}
        r, i = mean_interval(rho, seed=self.seed), mean_interval(iou, seed=self.seed)
        return {"metric": self.name, "n": int(rho.size), "spearman_mean": r.value, "ci": r.bounds,
                "spearman_std": float(rho.std(ddof=1)) if rho.size > 1 else 0.0,
                f"top{int(self.k * 100)}pct_iou_mean": i.value, f"top{int(self.k * 100)}pct_iou_ci": i.bounds,
                "how_measured": (f"Spearman over all pixels; IoU of each map's top {self.k:.0%} pixels; 95% bootstrap "
                                 "intervals over photos")}
