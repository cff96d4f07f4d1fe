"""Mask-and-evaluate with equal saliency mass: the Canonical Saliency Maps protocol.

Methods differ in how much of the image they mark, and a map that marks
everything wins any masking test. So every map is first rescaled to the same
total mass; the explanation image is ``x · (1 − map)`` (the salient part
removed), and the drop in the score is compared across methods (John et al.,
T-BIOM 2021: Average Drop — higher means the map found what matters —, %
Increase in confidence — lower is better — and Win %).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..explain.engine import DEFAULT_BATCH_SIZE, PerturbationEngine
from ..explain.explanation import saliency_mass
from ..targets import Target
from .base import Metric

__all__ = ["MaskedConfidence", "equal_mass"]


def equal_mass(saliency: np.ndarray, mass: float = 0.1, iterations: int = 40) -> np.ndarray:
    """Rescale a map into [0, 1] so its mean is ``mass`` (the same total for every method).

    The scale is found by bisection because clipping at 1 would otherwise lose
    mass for peaky maps. A map whose support covers less than ``mass`` of the
    image can only reach its support (all ones there).
    """
    m = saliency_mass(saliency)
    if m.max() <= 0:
        return np.full(m.shape, mass)
    m = m / m.max()
    lo, hi = 0.0, 1.0 / max(mass, 1e-9) * m.size / max(m.sum(), 1e-12) * 4
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if np.clip(m * mid, 0, 1).mean() < mass:
            lo = mid
        else:
            hi = mid
    return np.clip(m * (lo + hi) / 2, 0, 1)


class MaskedConfidence(Metric):
    """Average Drop, % Increase in confidence and Win % for several methods' maps.

    Scores should be positive (a class probability, or a similarity): the drop is
    measured relative to the unmasked score.
    """

    name = "masked_confidence"

    def __init__(self, net: nn.Module, *, mass: float = 0.1, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        super().__init__()
        self.net, self.mass, self.batch_size = net, float(mass), batch_size
        self.add_state("original", [])
        self.add_state("masked", {})

    def update(self, inputs: torch.Tensor, maps: dict[str, torch.Tensor | np.ndarray],
               targets: Target | Sequence[Target]) -> None:
        n = inputs.shape[0]
        methods = list(maps)
        keep = torch.stack([
            torch.as_tensor(1.0 - equal_mass(np.asarray(maps[meth][i]), self.mass), dtype=torch.float32)
            for meth in methods for i in range(n)
        ]).unsqueeze(1)  # (M·N, 1, H, W): method-major
        per_target = not isinstance(targets, Target)
        engine = PerturbationEngine(self.net, list(targets) if per_target else targets, batch_size=self.batch_size)
        original = engine.run(n, lambda a, b: inputs[a:b],
                              owners=(lambda a, b: torch.arange(a, b)) if per_target else None)
        scores = engine.run(len(keep), lambda a, b: inputs[torch.arange(a, b) % n] * keep[a:b],
                            owners=(lambda a, b: torch.arange(a, b) % n) if per_target else None)
        self.original.extend(original.tolist())
        for k, meth in enumerate(methods):
            self.masked.setdefault(meth, []).extend(scores[k * n:(k + 1) * n].tolist())

    def merge(self, other: Metric) -> None:
        assert isinstance(other, MaskedConfidence)
        self.original = self.original + other.original
        for meth, vals in other.masked.items():
            self.masked[meth] = self.masked.get(meth, []) + vals

    def compute(self) -> dict[str, Any]:
        y = np.asarray(self.original, np.float64)
        methods = list(self.masked)
        if not methods:
            return {"metric": self.name, "n": 0}
        o = np.stack([np.asarray(self.masked[m], np.float64) for m in methods])  # (M, N)
        safe = np.where(np.abs(y) > 1e-12, y, np.nan)
        drop = np.clip(y - o, 0, None) / np.abs(safe) * 100
        winners = np.argmax(np.nan_to_num(y - o, nan=-np.inf), axis=0)
        out = {}
        for k, m in enumerate(methods):
            out[m] = {
                "average_drop_pct": float(np.nanmean(drop[k])),
                "increase_in_confidence_pct": float(np.mean(o[k] > y) * 100),
                "win_pct": float(np.mean(winners == k) * 100),
            }
        return {
            "metric": self.name, "n": len(y), "mass": self.mass, "methods": out,
            "how_measured": (f"each map rescaled to mean {self.mass:g} in [0,1]; image × (1 − map); "
                             "Average Drop = mean max(0, Y − O)/Y; Increase = share of images with O > Y; "
                             "Win = share of images where the method's drop is the largest"),
        }
