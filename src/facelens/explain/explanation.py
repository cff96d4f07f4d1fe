"""`Explanation`: one saliency map with everything needed to read, trust and redraw it."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import ModelError
from ..faces.align import Chip
from ..faces.regions import chip_region_masks
from .target_range import TargetRange

__all__ = ["Explanation", "RegionAttention", "region_attention", "saliency_mass"]


def saliency_mass(saliency: np.ndarray) -> np.ndarray:
    """The non-negative mass a map assigns to pixels.

    Signed maps (gradient×input, IG, DeepLIFT, LRP) count their positive
    evidence; a map with no positive part counts its magnitude, so an all-negative
    map is not silently empty.
    """
    m = np.asarray(saliency, np.float64)
    pos = np.clip(m, 0, None)
    return pos if pos.sum() > 0 else np.abs(m)


@dataclass(frozen=True)
class RegionAttention:
    """Share of saliency mass per facial region: raw, and relative to the region's area.

    ``density`` is mass share divided by area share: 1 means the region gets the
    attention its size predicts, 3 means three times as much.
    """

    mass: dict[str, float]
    area: dict[str, float]
    density: dict[str, float]

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        return sorted(self.mass.items(), key=lambda kv: -kv[1])[:k]

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {"mass": self.mass, "area": self.area, "density": self.density}


def region_attention(saliency: np.ndarray, masks: dict[str, np.ndarray]) -> RegionAttention:
    """Region shares of a map, given region masks on the same grid."""
    mass = saliency_mass(saliency)
    total = mass.sum()
    n_pix = float(mass.size)
    shares, areas, density = {}, {}, {}
    for name in masks:
        m = masks[name]
        if m.shape != mass.shape:
            raise ModelError(f"region mask {name} is {m.shape}, map is {mass.shape}")
        shares[name] = float(mass[m].sum() / total) if total > 0 else 0.0
        areas[name] = float(m.sum() / n_pix)
        density[name] = shares[name] / areas[name] if areas[name] > 0 else 0.0
    return RegionAttention(shares, areas, density)


@dataclass
class Explanation:
    """A saliency map on the aligned chip, and the same map on the original photo.

    Attributes:
        method: registry name of the method.
        model: model name.
        target: what was explained, in words.
        score: the target's value on the unperturbed chip.
        chip_map: ``H×W`` float map on the chip grid.
        chip: the aligned chip (pixels, photo→chip transform, face).
        photo: the original RGB photo.
        settings: every setting that shaped the map.
        seconds: wall time of the attribution.
        signed: whether negative values carry meaning.
        extras: method-specific results (e.g. per-depth CAMs, the partner map of a pair).
        target_range: the target's unit and its intact, fully deleted and impostor levels, so the
            score and any metric on it can be read against the range they live in.
    """

    method: str
    model: str
    target: str
    score: float
    chip_map: np.ndarray
    chip: Chip
    photo: np.ndarray
    settings: dict[str, object]
    seconds: float
    signed: bool = False
    library: str = "facelens"
    extras: dict[str, object] = field(default_factory=dict)
    target_range: TargetRange | None = None

    @cached_property
    def photo_map(self) -> np.ndarray:
        """The chip map warped back onto the photo frame (0 outside the chip)."""
        return self.chip.to_photo(self.chip_map.astype(np.float32))

    def region_attention(self) -> RegionAttention:
        """Share of saliency mass per landmark region of the chip."""
        if self.chip.face is None:
            raise ModelError(f"{self.model} explains whole images; region attention needs a detected face")
        return region_attention(self.chip_map, chip_region_masks(self.chip))

    def depth_attention(self) -> dict[str, RegionAttention]:
        """Region attention of the maps at the model's early, mid and late layers.

        The classic workshop's "5 zones × 3 layers" analysis, with landmark regions instead of
        fixed boxes. Needs a CAM explained with ``all_depths=True``.
        """
        depths = self.extras.get("depths")
        if not isinstance(depths, dict) or not depths:
            raise ModelError(f"{self.method}: no per-depth maps; explain a CAM method with all_depths=True")
        if self.chip.face is None:
            raise ModelError(f"{self.model} explains whole images; region attention needs a detected face")
        masks = chip_region_masks(self.chip)
        return {d: region_attention(np.asarray(m), masks) for d, m in depths.items()}

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {
            "method": self.method, "library": self.library, "model": self.model, "target": self.target,
            "score": self.score, "seconds": round(self.seconds, 4), "settings": self.settings,
            "map_shape": list(self.chip_map.shape), "finite": bool(np.isfinite(self.chip_map).all()),
        }
        if self.target_range is not None:
            out["unit"] = self.target_range.unit
            out["target_range"] = self.target_range.as_dict()
        if self.chip.face is not None:
            out["face"] = {"box": list(self.chip.face.box), "upsample": self.chip.face.upsample,
                           "fallback": self.chip.face.fallback, "detection": self.chip.face.detection()}
            out["region_attention"] = self.region_attention().as_dict()
            if isinstance(self.extras.get("depths"), dict) and self.extras["depths"]:
                out["region_attention_by_depth"] = {d: a.as_dict() for d, a in self.depth_attention().items()}
        return out

    def save(self, out_dir: str | Path, stem: str | None = None) -> dict[str, Path]:
        """Write the overlay PNG (chip and photo) and the raw maps as ``.npy``."""
        from ..outputs import save_npy, save_png
        from .render import overlay

        out_dir = Path(out_dir)
        stem = stem or f"{self.model}_{self.method}".replace(":", "_").replace("/", "_")
        paths = {
            "chip_png": out_dir / f"{stem}_chip.png",
            "photo_png": out_dir / f"{stem}_photo.png",
            "chip_npy": out_dir / f"{stem}_chip.npy",
            "photo_npy": out_dir / f"{stem}_photo.npy",
        }
        save_png(paths["chip_png"], overlay(self.chip.image, self.chip_map, signed=self.signed))
        save_png(paths["photo_png"], overlay(self.photo, self.photo_map, signed=self.signed,
                                             region=self.chip_region_on_photo()))
        save_npy(paths["chip_npy"], self.chip_map.astype(np.float32))
        save_npy(paths["photo_npy"], self.photo_map.astype(np.float32))
        return paths

    def chip_region_on_photo(self) -> np.ndarray:
        """Where on the photo the chip came from (the map is undefined elsewhere)."""
        return self.chip.to_photo(np.ones(self.chip_map.shape, np.float32)) > 0.5

