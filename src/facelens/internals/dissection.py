"""Unit–region alignment: which channels of a layer fire on the eyes, the nose or the mouth?

In the spirit of network dissection (Bau et al. 2017): each unit's activation map is thresholded at the
unit's own top quantile over a set of real faces (``T_k``: the top ``top`` fraction of all its activations,
all positions of all photos), upsampled to the chip, and compared with every landmark region of the face
(:func:`facelens.faces.regions.chip_region_masks`). The score is the dataset-wide intersection over union

    IoU(k, r) = Σ_photos |{a_k > T_k} ∩ R_r| / Σ_photos |{a_k > T_k} ∪ R_r|.

A unit is listed as a detector of a region when that region is its best one, its IoU is at least
``iou_threshold`` **and** above what a spatially shuffled unit gets: the same unit with the cells of each
of its maps randomly permuted (same activation values, same coverage, no spatial structure). The largest
shuffled IoU over all units of the layer is the baseline a real detector must beat.

On aligned chips a region sits at nearly the same place in every photo, so a unit that fires at a fixed
position also scores. ``other_photo_iou`` (each photo's maps against the *next* photo's regions) tells the
two apart: a unit that follows the eyes of the photo it sees loses IoU there, one that marks a fixed place
of the chip does not.

The per-photo work (detect, align, run the network, draw the regions) is a map over the manifest through
:func:`facelens.executors.map_rows`, so it can run on Ray; the thresholds and IoUs are a cheap local reduce.
No library we depend on implements dissection for landmark regions (NetDissect itself is research code for
the Broden dataset), so the arithmetic is here.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FaceLensError, ModelError

__all__ = [
    "DETECTOR_REGIONS",
    "DISSECT_REGIONS",
    "DissectionResult",
    "LayerDissection",
    "UnitRegionIoU",
    "dissect",
    "dissect_manifest",
    "layer_maps",
    "unit_thresholds",
]

# Region groups of facelens.faces.regions (groups or single regions) that units are compared with.
DISSECT_REGIONS: tuple[str, ...] = ("eyes", "brows", "nose", "mouth", "cheeks", "forehead", "chin_jaw",
                                    "hair_background", "neck_clothing")
DETECTOR_REGIONS: tuple[str, ...] = ("eyes", "nose", "mouth")


def layer_maps(net: torch.nn.Module, modules: Mapping[str, torch.nn.Module],
               x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Activation maps ``N×C×h×w`` of several modules in one forward pass (no gradients)."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():
        def hook(_m: torch.nn.Module, _i: Any, out: Any, name: str = name) -> None:
            if not isinstance(out, torch.Tensor) or out.dim() != 4:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ModelError(f"layer {name!r} gives {shape}; dissection needs N×C×h×w maps")
            store[name] = out.detach()
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return store


def unit_thresholds(maps: torch.Tensor | np.ndarray, top: float) -> np.ndarray:
    """Per unit, the activation exceeded by the top ``top`` fraction of its values over all photos and positions."""
    if not 0 < top < 1:
        raise FaceLensError(f"top must be a fraction in (0, 1), got {top!r}")
    arr = maps.float().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, np.float32)
    per_unit = np.moveaxis(arr, 1, 0).reshape(arr.shape[1], -1)
    return np.quantile(per_unit, 1.0 - top, axis=1).astype(np.float32)


class UnitRegionIoU:
    """Streaming dataset-wide IoU of thresholded unit maps with region masks (torchmetrics-style update/compute).

    ``update(maps, masks)`` takes low-resolution maps ``N×C×h×w`` and boolean masks ``N×R×H×W`` at chip
    size; it accumulates intersections and unions for the real units and for their spatially shuffled twins.
    """

    def __init__(self, thresholds: np.ndarray, regions: Sequence[str], seed: int = 0) -> None:
        self.thresholds = torch.as_tensor(np.asarray(thresholds, np.float32))
        self.regions = list(regions)
        c, r = len(self.thresholds), len(self.regions)
        self.inter = torch.zeros(c, r, dtype=torch.float64)
        self.union = torch.zeros(c, r, dtype=torch.float64)
        self.inter_shuffled = torch.zeros(c, r, dtype=torch.float64)
        self.union_shuffled = torch.zeros(c, r, dtype=torch.float64)
        self.inter_other = torch.zeros(c, r, dtype=torch.float64)
        self.union_other = torch.zeros(c, r, dtype=torch.float64)
        self._previous: torch.Tensor | None = None
        self.coverage = torch.zeros(c, dtype=torch.float64)
        self.pixels = 0
        self.photos = 0
        self._gen = torch.Generator().manual_seed(seed)

    def _accumulate(self, maps: torch.Tensor, masks: torch.Tensor, inter: torch.Tensor, union: torch.Tensor) -> None:
        hw = masks.shape[-2:]
        up = F.interpolate(maps.float(), size=hw, mode="bilinear", align_corners=False)
        fired = (up > self.thresholds.view(1, -1, 1, 1)).flatten(2).float()  # N×C×P
        reg = masks.flatten(2).float()  # N×R×P
        i = torch.einsum("ncp,nrp->cr", fired, reg).double()
        inter += i
        union += fired.sum(2).sum(0).double()[:, None] + reg.sum(2).sum(0).double()[None, :] - i

    def update(self, maps: torch.Tensor, masks: torch.Tensor | np.ndarray) -> None:
        maps = torch.as_tensor(maps).float()
        masks = torch.as_tensor(np.asarray(masks, bool))
        if maps.dim() != 4 or masks.dim() != 4 or maps.shape[0] != masks.shape[0]:
            raise FaceLensError(f"maps must be N×C×h×w and masks N×R×H×W for the same N, got "
                                f"{tuple(maps.shape)} and {tuple(masks.shape)}")
        if maps.shape[1] != len(self.thresholds) or masks.shape[1] != len(self.regions):
            raise FaceLensError(f"expected {len(self.thresholds)} units and {len(self.regions)} regions, got "
                                f"{maps.shape[1]} and {masks.shape[1]}")
        self._accumulate(maps, masks, self.inter, self.union)
        n, c, h, w = maps.shape
        perm = torch.rand(n, c, h * w, generator=self._gen).argsort(dim=2)
        shuffled = maps.flatten(2).gather(2, perm).view(n, c, h, w)
        self._accumulate(shuffled, masks, self.inter_shuffled, self.union_shuffled)
        other = torch.roll(masks, 1, 0)
        if self._previous is not None:
            other[0] = self._previous
        self._previous = masks[-1].clone()
        self._accumulate(maps, other, self.inter_other, self.union_other)
        self.photos += n

    def compute(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(iou, shuffled_iou, other_photo_iou)``, each units × regions."""
        iou = (self.inter / self.union.clamp_min(1)).numpy()
        base = (self.inter_shuffled / self.union_shuffled.clamp_min(1)).numpy()
        other = (self.inter_other / self.union_other.clamp_min(1)).numpy()
        return iou, base, other


@dataclass
class LayerDissection:
    """IoU of every unit of one layer with every region, and the units that act as region detectors."""

    layer: str
    regions: list[str]
    iou: np.ndarray = field(repr=False)  # units × regions
    shuffled_iou: np.ndarray = field(repr=False)
    thresholds: np.ndarray = field(repr=False)
    other_photo_iou: np.ndarray = field(repr=False)
    top: float
    iou_threshold: float
    photos: int
    map_size: tuple[int, int] = (0, 0)

    @property
    def baseline(self) -> dict[str, float]:
        """Per region, the largest IoU any spatially shuffled unit of this layer reaches."""
        return {r: float(self.shuffled_iou[:, j].max()) for j, r in enumerate(self.regions)}

    def detectors(self, region: str) -> list[tuple[int, float]]:
        """Units whose best region is ``region`` and whose IoU with it clears both the threshold and the shuffled
        baseline, best first (as in network dissection, each unit is labelled with its top region only)."""
        j = self.regions.index(region)
        bar = max(self.iou_threshold, self.baseline[region])
        best = self.iou.argmax(1)
        return [(int(k), float(self.iou[k, j])) for k in np.argsort(-self.iou[:, j])
                if self.iou[k, j] >= bar and best[k] == j]

    def best_region(self, unit: int) -> tuple[str, float]:
        j = int(np.argmax(self.iou[unit]))
        return self.regions[j], float(self.iou[unit, j])

    def rows(self, regions: Sequence[str] = DETECTOR_REGIONS) -> list[dict[str, Any]]:
        out = []
        for r in regions:
            if r not in self.regions:
                continue
            j = self.regions.index(r)
            found = self.detectors(r)
            best = int(np.argmax(self.iou[:, j]))
            out.append({"layer": self.layer, "region": r, "units": self.iou.shape[0], "detectors": len(found),
                        "detector_units": ", ".join(f"{k} ({v:.2f})" for k, v in found[:8]) or "none",
                        "best_unit": best, "best_iou": float(self.iou[best, j]),
                        "best_iou_other_photo": float(self.other_photo_iou[best, j]),
                        "shuffled_baseline": self.baseline[r],
                        "median_iou": float(np.median(self.iou[:, j]))})
        return out

    def as_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "regions": self.regions, "top": self.top, "iou_threshold": self.iou_threshold,
                "photos": self.photos, "map_size": list(self.map_size), "baseline": self.baseline,
                "detectors": {r: self.detectors(r) for r in self.regions},
                "iou": np.round(self.iou, 5).tolist(), "shuffled_iou": np.round(self.shuffled_iou, 5).tolist(),
                "other_photo_iou": np.round(self.other_photo_iou, 5).tolist(),
                "thresholds": np.round(self.thresholds, 6).tolist()}


def dissect(maps: torch.Tensor | np.ndarray, masks: np.ndarray, regions: Sequence[str], *, layer: str = "layer",
            top: float = 0.05, iou_threshold: float = 0.1, seed: int = 0, batch_size: int = 32) -> LayerDissection:
    """Dissect one layer from its maps ``N×C×h×w`` and region masks ``N×R×H×W`` (boolean, chip size)."""
    maps_t = torch.as_tensor(np.asarray(maps, np.float32)) if not isinstance(maps, torch.Tensor) else maps.float()
    masks = np.asarray(masks, bool)
    if maps_t.shape[0] == 0:
        raise FaceLensError("dissection needs at least one photo")
    if masks.shape[:2] != (maps_t.shape[0], len(regions)):
        raise FaceLensError(f"masks must be N×R×H×W with N={maps_t.shape[0]}, R={len(regions)}; got {masks.shape}")
    thresholds = unit_thresholds(maps_t, top)
    metric = UnitRegionIoU(thresholds, regions, seed=seed)
    for i in range(0, maps_t.shape[0], batch_size):
        metric.update(maps_t[i:i + batch_size], masks[i:i + batch_size])
    iou, base, other = metric.compute()
    return LayerDissection(layer=layer, regions=list(regions), iou=iou, shuffled_iou=base, thresholds=thresholds,
                           other_photo_iou=other,
                           top=top, iou_threshold=iou_threshold, photos=metric.photos,
                           map_size=(int(maps_t.shape[2]), int(maps_t.shape[3])))


# -- over a manifest --------------------------------------------------------------------------------------
def _dissect_batch(model: Any, layers: dict[str, str], regions: tuple[str, ...]) -> Callable[[list[Any]], list[Any]]:
    """The map_rows worker: load the model once, then chip, run and draw regions for each batch of rows."""
    from ..executors import RowFailure
    from ..faces.regions import chip_region_masks, regions_union
    from ..models import load_model

    fm = load_model(model)
    modules = {depth: fm.layer(name) for depth, name in layers.items()}

    def run(rows: list[Any]) -> list[Any]:
        chips, masks, results = [], [], []
        for row in rows:
            try:
                chip = fm.chip(row.path)
                reg = chip_region_masks(chip)
                masks.append(np.stack([regions_union(reg, r) for r in regions]))
                chips.append(chip.image)
                results.append(None)
            except FaceLensError as exc:
                results.append(RowFailure(str(row.path), str(exc)))
        if chips:
            maps = layer_maps(fm.net, modules, fm.to_tensor(chips))
            k = 0
            for i, res in enumerate(results):
                if res is None:
                    results[i] = {"maps": {d: m[k].half().numpy() for d, m in maps.items()},
                                  "masks": np.packbits(masks[k], axis=-1), "width": chips[k].shape[1]}
                    k += 1
        return results

    return run


@dataclass
class DissectionResult:
    """Dissection of several layers of one model over a set of photos."""

    model: str
    layers: dict[str, LayerDissection]
    depth_layers: dict[str, str]
    failures: list[dict[str, str]] = field(default_factory=list)
    rows_in: int = 0
    seconds: float = 0.0

    def rows(self) -> list[dict[str, Any]]:
        return [{"depth": d, **r} for d, ld in self.layers.items() for r in ld.rows()]

    def verdicts(self) -> list[str]:
        out = []
        for d, ld in self.layers.items():
            for r in ld.rows():
                out.append(f"{d} ({ld.layer}): {r['detectors']} of {r['units']} units act as {r['region']} detectors "
                           f"(best unit {r['best_unit']}, IoU {r['best_iou']:.3f}; shuffled-unit baseline "
                           f"{r['shuffled_baseline']:.3f})")
        return out

    def figure(self) -> np.ndarray:
        """Per layer, the IoU of the best unit per region next to the shuffled baseline."""
        from ..explain.render import figure_to_rgb, new_figure

        n = len(self.layers)
        fig, axes = new_figure(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
        for ax, (d, ld) in zip(axes[0], self.layers.items(), strict=True):
            regions = ld.regions
            best = ld.iou.max(0)
            base = [ld.baseline[r] for r in regions]
            xs = np.arange(len(regions))
            ax.bar(xs - 0.2, best, 0.4, label="best unit", color="#3b6fb6")
            ax.bar(xs + 0.2, base, 0.4, label="shuffled baseline", color="#bbbbbb")
            counts = [len(ld.detectors(r)) for r in regions]
            for x, b, c in zip(xs, best, counts, strict=True):
                ax.text(x - 0.2, b, str(c), ha="center", va="bottom", fontsize=7)
            ax.axhline(ld.iou_threshold, color="#d93025", lw=0.8, ls="--", label="IoU threshold")
            ax.set_xticks(xs, [r.replace("_", " ") for r in regions], rotation=50, ha="right", fontsize=7)
            ax.set_title(f"{d}: {ld.layer} ({ld.iou.shape[0]} units)", fontsize=8)
            ax.set_ylabel("IoU with region", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0, 0].legend(fontsize=7)
        fig.suptitle(f"{self.model}: how well single units outline face regions", fontsize=9)
        return figure_to_rgb(fig)

    def caption(self) -> str:
        ld = next(iter(self.layers.values()))
        return (f"For each layer, blue: the overlap (IoU) between a face region and the area where the best single "
                f"unit fires most (its top {ld.top:.1%} of activations over {ld.photos} photos); grey: the best "
                f"overlap a unit with spatially shuffled activations gets by chance. The number on a blue bar is how "
                f"many units clear both the dashed threshold and the grey baseline: units that act as detectors of "
                f"that region.")

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "depth_layers": self.depth_layers, "rows": self.rows(),
                "layers": {d: ld.as_json() for d, ld in self.layers.items()}, "failures": self.failures,
                "rows_in": self.rows_in, "seconds": round(self.seconds, 3)}

    def html(self, *, level: int = 3) -> str:
        from ..report import html as H

        parts = [H.figure(self.figure(), self.caption()),
                 H.table(self.rows(), caption="Eye, nose and mouth detectors per layer: units whose top activations "
                                              "overlap the region (IoU) above the threshold and the shuffled baseline; "
                                              "unit index (IoU). 'other photo': the best unit's IoU with the next "
                                              "photo's region, near its own IoU when the unit marks a fixed place "
                                              "of the aligned chip rather than the feature itself.")]
        ld = next(iter(self.layers.values()))
        how = (f"top {ld.top:.1%} of each unit's activations over {ld.photos} aligned photos, maps upsampled "
               f"bilinearly to the chip; dataset-wide IoU with landmark regions; detector if IoU ≥ "
               f"{ld.iou_threshold} and above the largest IoU of spatially shuffled units.")
        return H.section(f"Unit–region alignment — {self.model}", parts, anchor="dissection", level=level, how=how)


def dissect_manifest(rows: Sequence[Any], model: Any, *, layers: Sequence[str] = ("early", "mid", "late"),
                     regions: Sequence[str] = DISSECT_REGIONS, top: float = 0.05, iou_threshold: float = 0.1,
                     executor: str = "local", address: str | None = None, batch_size: int = 16,
                     seed: int = 0) -> DissectionResult:
    """Dissect ``layers`` of ``model`` over the photos in ``rows`` (manifest rows), streamed via ``map_rows``."""
    from ..executors import map_rows
    from ..models import load_model

    start = time.perf_counter()
    fm = load_model(model)
    depth_layers = {d: fm.layers.get(d, d) for d in layers}
    for name in depth_layers.values():
        fm.layer(name)
    worker = functools.partial(_dissect_batch, model if isinstance(model, str) else fm, depth_layers, tuple(regions))
    res = map_rows(list(rows), worker, executor=executor, address=address, batch_size=batch_size)  # type: ignore[arg-type]
    if not res.records:
        reasons = "; ".join(f.reason for f in res.failures[:3])
        raise FaceLensError(f"dissection found no usable photo among {res.rows_in} ({reasons})")
    width = res.records[0]["width"]
    masks = np.stack([np.unpackbits(r["masks"], axis=-1, count=width).astype(bool) for r in res.records])
    out = {}
    for d in layers:
        maps = torch.from_numpy(np.stack([r["maps"][d] for r in res.records]).astype(np.float32))
        out[d] = dissect(maps, masks, regions, layer=depth_layers[d], top=top, iou_threshold=iou_threshold, seed=seed)
    return DissectionResult(model=fm.name, layers=out, depth_layers=depth_layers,
                            failures=[f.as_dict() for f in res.failures], rows_in=res.rows_in,
                            seconds=time.perf_counter() - start)
