"""Pointing game and region hit: does the map point at the facial part that matters?

The pointing game (Zhang et al.) counts a hit when the map's maximum falls
inside the expected region, allowing a tolerance of a few pixels. Region hit
asks the softer question of how much of the map's mass falls in the region.
Regions come from landmarks; for photos with annotated points (the Face
Research Lab ``.tem`` files, 189 points, pupils at 0 and 1) the expected region
can be discs around the annotated points instead.

A **hit** is: the map's single most salient pixel (positive evidence, see
:func:`~facelens.explain.explanation.saliency_mass`) lies inside the expected region grown by
``tolerance`` pixels. The hit rate gets a Wilson interval (never of zero width, also at 0 and n)
and is read against its **chance** level, the share of the chip the grown region covers (where a
uniformly random peak would land), and against the control maps the evaluation scores beside the
methods. For a recognizer no region is "the" right answer: a rate of 0 on the eyes is a finding
about where the peaks go, which ``peak_regions`` (the share of peaks falling in each landmark
region) shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from ..explain.explanation import saliency_mass
from ..faces.regions import REGION_NAMES
from .base import Metric
from .stats import mean_interval, rate_interval

__all__ = ["PointingGame", "RegionHit", "points_mask"]


def points_mask(shape_hw: tuple[int, int], points: np.ndarray, radius: float) -> np.ndarray:
    """Discs of ``radius`` pixels around annotated points (x, y)."""
    mask = np.zeros(shape_hw, np.uint8)
    for x, y in np.asarray(points, np.float64).reshape(-1, 2):
        cv2.circle(mask, (round(x), round(y)), max(round(radius), 0), 1, thickness=-1)
    return mask.astype(bool)


def _grow(mask: np.ndarray, tolerance: int) -> np.ndarray:
    if tolerance <= 0:
        return mask
    k = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), k) > 0


class PointingGame(Metric):
    """Hit rate of the maps' maxima against expected regions (with a pixel tolerance)."""

    name = "pointing_game"

    def __init__(self, tolerance: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.tolerance, self.seed = int(tolerance), int(seed)
        self.add_state("hits", [])
        self.add_state("chance", [])
        self.add_state("peaks", [])
        self.add_state("clusters", [])

    def update(self, maps: Sequence[np.ndarray] | np.ndarray, regions: Sequence[np.ndarray],
               labels: Sequence[np.ndarray | None] | None = None, clusters: Sequence[str] | None = None) -> list[bool]:
        """Score a batch; ``labels`` are region label maps (indices into `REGION_NAMES`) for ``peak_regions``."""
        hits = []
        label_maps = list(labels) if labels is not None else [None] * len(regions)
        for m, region, lab in zip(maps, regions, label_maps, strict=True):
            m = np.asarray(m, np.float64)
            if region.shape != m.shape:
                raise ValueError(f"region {region.shape} and map {m.shape} differ")
            if not region.any():
                raise ValueError("an expected region is empty")
            peak = np.unravel_index(int(np.argmax(saliency_mass(m))), m.shape)
            grown = _grow(region, self.tolerance)
            hits.append(bool(grown[peak]))
            self.chance.append(float(grown.mean()))
            self.peaks.append(REGION_NAMES[int(lab[peak])] if lab is not None else None)
        start = len(self.clusters)
        self.clusters.extend(list(clusters) if clusters is not None else [str(start + i) for i in range(len(hits))])
        self.hits.extend(hits)
        return hits

    def compute(self) -> dict[str, Any]:
        h = np.asarray(self.hits, bool)
        if not h.size:
            return {"metric": self.name, "n": 0}
        r = rate_interval(h, self.clusters, seed=self.seed)
        peaks = [p for p in self.peaks if p is not None]
        shares = {name: peaks.count(name) / len(peaks) for name in REGION_NAMES if peaks.count(name)} if peaks else {}
        return {"metric": self.name, "n": int(h.size), "n_units": r.n_clusters, "hit_rate": r.value,
                "ci": r.bounds, "interval": r.method, "chance": float(np.mean(self.chance)),
                "tolerance_px": self.tolerance, "peak_regions": dict(sorted(shares.items(), key=lambda kv: -kv[1])),
                "how_measured": (f"hit = the map's most salient pixel lies within {self.tolerance} px of the expected "
                                 "region; chance = the share of the chip that region (grown) covers; interval: "
                                 "Wilson over photos; peak_regions = where the peaks fell")}


class RegionHit(Metric):
    """Share of saliency mass inside the expected region, against the region's share of the area."""

    name = "region_hit"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self.add_state("mass", [])
        self.add_state("area", [])
        self.add_state("clusters", [])

    def update(self, maps: Sequence[np.ndarray] | np.ndarray, regions: Sequence[np.ndarray],
               clusters: Sequence[str] | None = None) -> None:
        start = len(self.clusters)
        for m, region in zip(maps, regions, strict=True):
            mass = saliency_mass(np.asarray(m))
            total = mass.sum()
            self.mass.append(float(mass[region].sum() / total) if total > 0 else 0.0)
            self.area.append(float(region.mean()))
        n = len(self.mass) - start
        self.clusters.extend(list(clusters) if clusters is not None else [str(start + i) for i in range(n)])

    def compute(self) -> dict[str, Any]:
        mass, area = np.asarray(self.mass), np.asarray(self.area)
        if not mass.size:
            return {"metric": self.name, "n": 0}
        e = mean_interval(mass, self.clusters, seed=self.seed)
        return {"metric": self.name, "n": int(mass.size), "n_units": e.n_clusters, "mass_share_mean": e.value,
                "ci": e.bounds, "area_share_mean": float(area.mean()),
                "mass_over_area": float(mass.mean() / area.mean()) if area.mean() > 0 else float("nan"),
                "how_measured": ("saliency mass inside the region / total mass, averaged over images (95% bootstrap "
                                 "interval); area share = where a map spread evenly would put its mass")}
