"""Pointing game and region hit: does the map point at the facial part that matters?

The pointing game (Zhang et al.) counts a hit when the map's maximum falls
inside the expected region, allowing a tolerance of a few pixels. Region hit
asks the softer question of how much of the map's mass falls in the region.
Regions come from landmarks; for photos with annotated points (the Face
Research Lab ``.tem`` files, 189 points, pupils at 0 and 1) the expected region
can be discs around the annotated points instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from ..explain.explanation import saliency_mass
from .base import Metric

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

    def __init__(self, tolerance: int = 4) -> None:
        super().__init__()
        self.tolerance = int(tolerance)
        self.add_state("hits", [])

    def update(self, maps: Sequence[np.ndarray] | np.ndarray, regions: Sequence[np.ndarray]) -> list[bool]:
        hits = []
        for m, region in zip(maps, regions, strict=True):
            m = np.asarray(m, np.float64)
            if region.shape != m.shape:
                raise ValueError(f"region {region.shape} and map {m.shape} differ")
            if not region.any():
                raise ValueError("an expected region is empty")
            peak = np.unravel_index(int(np.argmax(saliency_mass(m))), m.shape)
            hits.append(bool(_grow(region, self.tolerance)[peak]))
        self.hits.extend(hits)
        return hits

    def compute(self) -> dict[str, Any]:
        h = np.asarray(self.hits, bool)
        return {"metric": self.name, "n": int(h.size), "hit_rate": float(h.mean()) if h.size else float("nan"),
                "tolerance_px": self.tolerance,
                "how_measured": f"hit if the map's maximum lies within {self.tolerance} px of the region"}


class RegionHit(Metric):
    """Share of saliency mass inside the expected region, against the region's share of the area."""

    name = "region_hit"

    def __init__(self) -> None:
        super().__init__()
        self.add_state("mass", [])
        self.add_state("area", [])

    def update(self, maps: Sequence[np.ndarray] | np.ndarray, regions: Sequence[np.ndarray]) -> None:
        for m, region in zip(maps, regions, strict=True):
            mass = saliency_mass(np.asarray(m))
            total = mass.sum()
            self.mass.append(float(mass[region].sum() / total) if total > 0 else 0.0)
            self.area.append(float(region.mean()))

    def compute(self) -> dict[str, Any]:
        mass, area = np.asarray(self.mass), np.asarray(self.area)
        if not mass.size:
            return {"metric": self.name, "n": 0}
        return {"metric": self.name, "n": int(mass.size), "mass_share_mean": float(mass.mean()),
                "area_share_mean": float(area.mean()),
                "mass_over_area": float(mass.mean() / area.mean()) if area.mean() > 0 else float("nan"),
                "how_measured": "saliency mass inside the region / total mass, averaged over images"}
