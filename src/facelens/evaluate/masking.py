"""Mask-and-evaluate with equal saliency mass: the Canonical Saliency Maps protocol.

Methods differ in how much of the image they mark, and a map that marks
everything wins any masking test. So every map is first rescaled to the same
total mass; the explanation image is ``x · (1 − map)`` (the salient part
removed), and the drop in the score is compared across methods (John et al.,
T-BIOM 2021: Average Drop — higher means the map found what matters —, %
Increase in confidence — lower is better — and Win %).

Average Drop is relative to the intact score, as in the protocol: it lies in [0, 100] for scores
that stay positive (probabilities) and can pass 100 for a target that goes below 0 (a cohort z-score:
an impostor scores about 0, so a masked face scoring below the impostor level "drops" by more than its
score). Each value comes with a 95 % interval over photos: a bootstrap for the mean drop, Wilson for
the two shares. Control maps (random, edges, centre) are scored like methods but do not compete for
Win %.
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
from .stats import Estimate, mean_interval, rate_interval

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


def _pct(e: Estimate) -> list[float | None]:
    return [None if b is None else 100 * b for b in e.bounds]


class MaskedConfidence(Metric):
    """Average Drop, % Increase in confidence and Win % for several methods' maps.

    Scores should be positive (a class probability, or a similarity): the drop is
    measured relative to the unmasked score.
    """

    name = "masked_confidence"

    def __init__(self, net: nn.Module, *, mass: float = 0.1, batch_size: int = DEFAULT_BATCH_SIZE,
                 controls: Sequence[str] = (), seed: int = 0) -> None:
        super().__init__()
        self.net, self.mass, self.batch_size = net, float(mass), batch_size
        self.controls, self.seed = tuple(controls), int(seed)
        self.add_state("original", [])
        self.add_state("masked", {})
        self.add_state("clusters", [])

    def update(self, inputs: torch.Tensor, maps: dict[str, torch.Tensor | np.ndarray],
               targets: Target | Sequence[Target], clusters: Sequence[str] | None = None) -> None:
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
        start = len(self.clusters)
        self.clusters.extend(list(clusters) if clusters is not None else [str(start + i) for i in range(n)])
        for k, meth in enumerate(methods):
            self.masked.setdefault(meth, []).extend(scores[k * n:(k + 1) * n].tolist())

    def merge(self, other: Metric) -> None:
        assert isinstance(other, MaskedConfidence)
        self.original = self.original + other.original
        self.clusters = self.clusters + other.clusters
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
        competing = [k for k, m in enumerate(methods) if m not in self.controls]
        gains = np.nan_to_num(y - o[competing], nan=-np.inf) if competing else np.zeros((0, len(y)))
        winners = np.asarray(competing)[np.argmax(gains, axis=0)] if competing else np.full(len(y), -1)
        out = {}
        for k, m in enumerate(methods):
            ad = mean_interval(drop[k], self.clusters, seed=self.seed)
            inc = rate_interval(o[k] > y, self.clusters, seed=self.seed)
            row: dict[str, Any] = {
                "average_drop_pct": ad.value, "ci": ad.bounds,
                "increase_in_confidence_pct": 100 * inc.value, "increase_ci": _pct(inc),
                "n": ad.n, "n_units": ad.n_clusters, "control": m in self.controls,
            }
            if m not in self.controls:
                win = rate_interval(winners == k, self.clusters, seed=self.seed)
                row.update(win_pct=100 * win.value, win_ci=_pct(win))
            out[m] = row
        return {
            "metric": self.name, "n": len(y), "mass": self.mass, "methods": out,
            "how_measured": (f"each map rescaled to mean {self.mass:g} in [0,1]; image × (1 − map); "
                             "Average Drop = mean max(0, Y − O)/Y (can pass 100 when O < 0); Increase = share of "
                             "images with O > Y; Win = share of images where the method's drop is the largest "
                             "among the methods (controls excluded); intervals: 95% bootstrap (drop), Wilson "
                             "(shares) over photos"),
        }
