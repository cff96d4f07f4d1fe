"""Dataset view of a channel: the face patches, across a manifest, that excite it most.

For every photo the model's chip is cut (detect → align), the layer is run once, and for every
channel its peak activation and the peak's position are kept: the per-photo **map**, streamed through
:func:`facelens.executors.map_rows` so a large manifest can run on Ray. The **reduce** keeps, per
channel, the ``k`` photos with the highest peaks (one patch per photo, so a single face cannot fill
the row). Each peak's receptive field (:mod:`facelens.internals.receptive_field`, from gradients) is a
box on the chip; it is carried back through the chip's affine to the original photo and cut from the
photo at the photo's own resolution, upright as the chip is.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..datasets import ManifestRow, read_manifest
from ..errors import FaceLensError, ModelError
from ..executors import MapResult, RowFailure, map_rows
from .activation_max import layer_outputs, resolve_layer

if TYPE_CHECKING:
    from ..models.base import FaceModel

__all__ = ["DatasetView", "FaceChip", "Patch", "dataset_view", "load_chips", "patch_from_photo", "sample_rows",
           "scan_chips"]



@dataclass(frozen=True)
class FaceChip:
    """A model's chip of one photo, with the photo→chip affine (picklable, so workers can return it)."""

    path: str
    image: np.ndarray
    matrix: np.ndarray
    photo_shape: tuple[int, int]


def _model(ref: Any) -> FaceModel:
    if isinstance(ref, str):
        from ..models import load_model

        return load_model(ref)
    return ref


def sample_rows(rows: Sequence[ManifestRow], n: int, seed: int = 0) -> list[ManifestRow]:
    """``n`` rows taken in turn from each dataset (shuffled within it, seeded), new identities first.

    A stratified sample keeps face statistics from being those of whichever dataset comes first in the
    file, and preferring unseen identities keeps a small set of one person's photos from filling it.
    """
    rng = np.random.default_rng(seed)
    by_ds: dict[str, list[ManifestRow]] = {}
    for r in rows:
        by_ds.setdefault(r.dataset or "", []).append(r)
    queues = [[grp[i] for i in rng.permutation(len(grp))] for _, grp in sorted(by_ds.items())]
    out: list[ManifestRow] = []
    seen: set[str] = set()
    for fresh_only in (True, False):
        progress = True
        while len(out) < n and progress:
            progress = False
            for q in queues:
                pick = next((r for r in q if not fresh_only or (r.identity or str(r.path)) not in seen), None)
                if pick is not None and len(out) < n:
                    q.remove(pick)
                    out.append(pick)
                    seen.add(pick.identity or str(pick.path))
                    progress = True
    return out


# -- per-photo work (map) ---------------------------------------------------------------------------
def _chip_of(model: FaceModel, row: ManifestRow) -> FaceChip:
    chip = model.chip(row.path)
    return FaceChip(str(row.path), chip.image, np.asarray(chip.matrix, np.float64), tuple(chip.photo_shape))


def _chips_or_failures(model: FaceModel, rows: list[ManifestRow]) -> list[FaceChip | RowFailure]:
    """One entry per row, in order: its chip, or why it has none."""
    out: list[FaceChip | RowFailure] = []
    for row in rows:
        try:
            out.append(_chip_of(model, row))
        except FaceLensError as exc:
            out.append(RowFailure(str(row.path), str(exc)))
    return out


def _chip_worker(model_ref: Any) -> Any:
    model = _model(model_ref)
    return functools.partial(_chips_or_failures, model)


def load_chips(model: str | FaceModel, rows: Sequence[ManifestRow], *, executor: str = "local",
               address: str | None = None, batch_size: int = 16) -> tuple[list[FaceChip], MapResult]:
    """The model's chips of the photos (those with a usable face), via :func:`map_rows`."""
    result = map_rows(rows, functools.partial(_chip_worker, model), executor=executor,  # type: ignore[arg-type]
                      address=address, batch_size=batch_size)
    return list(result.records), result


def _peaks(model: FaceModel, layer: str, chips: Sequence[FaceChip], batch_size: int = 32) -> list[dict[str, Any]]:
    """Per chip: every channel's peak activation and its (row, col) on the layer's map."""
    records = []
    for i in range(0, len(chips), batch_size):
        part = chips[i:i + batch_size]
        with torch.no_grad():
            act = layer_outputs(model, [layer], model.to_tensor([c.image for c in part]))[layer]
        if act.dim() != 4:
            raise ModelError(f"{model.name}: layer {layer!r} has no spatial map (shape {tuple(act.shape)})")
        h, w = act.shape[2:]
        flat = act.flatten(2)
        peak, where = flat.max(2)
        for k, chip in enumerate(part):
            records.append({"path": chip.path, "peak": peak[k].numpy().astype(np.float32),
                            "row": (where[k] // w).numpy().astype(np.int16),
                            "col": (where[k] % w).numpy().astype(np.int16),
                            "matrix": chip.matrix, "photo_shape": chip.photo_shape, "map_hw": (h, w)})
    return records


def _scan_worker(model_ref: Any, layer: str) -> Any:
    model = _model(model_ref)

    def fn(rows: list[ManifestRow]) -> list[dict[str, Any] | RowFailure]:
        chips = _chips_or_failures(model, rows)
        good = [c for c in chips if isinstance(c, FaceChip)]
        peaks = iter(_peaks(model, layer, good))
        return [c if isinstance(c, RowFailure) else next(peaks) for c in chips]

    return fn


def scan_chips(model: FaceModel, layer: str, chips: Sequence[FaceChip]) -> list[dict[str, Any]]:
    """The per-photo peak records for chips already cut (no detection; used when the chips are at hand)."""
    return _peaks(model, resolve_layer(model, layer), chips)


# -- patches and the view (reduce) ------------------------------------------------------------------
@dataclass
class Patch:
    """One top-activating receptive field, cut from the original photo."""

    path: str
    channel: int
    rank: int
    activation: float
    position: tuple[int, int]
    chip_box: tuple[int, int, int, int]
    photo_quad: np.ndarray
    photo_box: tuple[int, int, int, int]
    image: np.ndarray

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "channel": self.channel, "rank": self.rank, "activation": self.activation,
                "position": list(self.position), "chip_box": list(self.chip_box),
                "photo_box": list(self.photo_box), "photo_quad": np.round(self.photo_quad, 2).tolist()}


def patch_from_photo(photo: np.ndarray, matrix: np.ndarray, chip_box: tuple[int, int, int, int], *,
                     max_side: int = 256, fill: int = 128) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Cut a chip box (x0, y0, x1, y1; end-exclusive chip pixels) from the photo, upright as on the chip.

    Returns the patch (at the photo's resolution, at most ``max_side`` pixels on its long side), the
    box's four corners on the photo (x, y; clockwise from top-left, on pixel edges), and the
    end-exclusive box of photo pixels whose centres lie within their bounds, clipped to the photo.
    Parts of the box beyond the photo's edge are ``fill`` grey.
    """
    import cv2

    m = np.asarray(matrix, np.float64)
    x0, y0, x1, y1 = chip_box
    corners_chip = np.array([[x0 - 0.5, y0 - 0.5], [x1 - 0.5, y0 - 0.5], [x1 - 0.5, y1 - 0.5], [x0 - 0.5, y1 - 0.5]])
    inv = cv2.invertAffineTransform(m)
    quad = corners_chip @ inv[:, :2].T + inv[:, 2]
    photo_px_per_chip_px = 1.0 / math.sqrt(abs(np.linalg.det(m[:, :2])))
    scale = min(photo_px_per_chip_px, max_side / max(x1 - x0, y1 - y0))
    w, h = max(1, round(scale * (x1 - x0))), max(1, round(scale * (y1 - y0)))
    # patch_u + 0.5 = scale · (chip_x − (x0 − 0.5)), composed with photo → chip.
    to_patch = np.c_[scale * m[:, :2], scale * (m[:, 2] - np.array([x0, y0]) + 0.5) - 0.5]
    patch = cv2.warpAffine(photo, to_patch, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=(fill, fill, fill))
    ph, pw = photo.shape[:2]
    # photo pixels whose centres fall inside the quad's bounding box (edges are at half-integers)
    bx0, by0 = np.ceil(quad.min(0) - 1e-9).astype(int)
    bx1, by1 = (np.floor(quad.max(0) + 1e-9) + 1).astype(int)
    box = (max(0, int(bx0)), max(0, int(by0)), min(pw, int(bx1)), min(ph, int(by1)))
    return patch, quad, box


@dataclass
class DatasetView:
    """Top-``k`` face patches per channel of one layer, over the photos of a manifest."""

    model: str
    layer: str
    module: str
    patches: dict[int, list[Patch]]
    rows_in: int
    rows_used: int
    failures: list[dict[str, str]] = field(default_factory=list)
    receptive_field: str = "gradient support through a linearized copy (ReLU → pass-through, max-pool → avg-pool)"
    seconds: float = 0.0

    def rows(self) -> list[dict[str, Any]]:
        return [p.as_dict() for ps in self.patches.values() for p in ps]

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "layer": self.layer, "module": self.module, "rows_in": self.rows_in,
                "rows_used": self.rows_used, "failures": self.failures, "receptive_field": self.receptive_field,
                "patches": self.rows(), "seconds": round(self.seconds, 3)}

    def figure(self, *, cell: int = 96) -> np.ndarray:
        """RGB figure: one row per channel, its top patches left to right with their peak activation."""
        import cv2

        from ..explain.render import figure_to_rgb, new_figure

        chans = list(self.patches)
        cols = max((len(v) for v in self.patches.values()), default=1) or 1
        fig, axes = new_figure(max(1, len(chans)), cols, figsize=(1.25 * cols + 0.8, 1.45 * max(1, len(chans)) + 0.4),
                               squeeze=False)
        for r, ch in enumerate(chans):
            for c in range(cols):
                ax = axes[r][c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c >= len(self.patches[ch]):
                    ax.axis("off")
                    continue
                p = self.patches[ch][c]
                ph, pw = p.image.shape[:2]
                s = cell / max(ph, pw)
                ax.imshow(cv2.resize(p.image, (max(1, round(pw * s)), max(1, round(ph * s))),
                                     interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR))
                ax.set_title(f"{p.activation:.3g}", fontsize=7)
                ax.set_xlabel(Path(p.path).stem[:14], fontsize=5)
            axes[r][0].set_ylabel(f"ch {ch}", fontsize=8)
        fig.suptitle(f"{self.model} {self.layer}: top face patches per channel", fontsize=9)
        return figure_to_rgb(fig)


def dataset_view(model: str | FaceModel, layer: str, channels: int | Sequence[int], rows: Any = None, *,
                 chips: Sequence[FaceChip] | None = None, k: int = 8, limit: int | None = None,
                 executor: str = "local", address: str | None = None, batch_size: int = 16,
                 max_side: int = 256) -> DatasetView:
    """Top-``k`` receptive-field patches of each channel (an int ``channels`` picks that many evenly).

    ``rows`` is a manifest path or a list of :class:`ManifestRow`, streamed through ``map_rows``
    (``executor="ray"`` for a cluster); or pass ``chips`` already cut to skip detection.
    """
    from ..image import load_image
    from .activation_max import pick_channels
    from .receptive_field import receptive_fields

    start = time.perf_counter()
    fm = _model(model)
    module = resolve_layer(fm, layer)
    failures: list[dict[str, str]] = []
    if chips is not None:
        records = scan_chips(fm, layer, chips)
        rows_in = len(chips)
    else:
        if rows is None:
            raise FaceLensError("dataset_view needs a manifest (rows=...) or chips=...")
        row_list = read_manifest(rows) if isinstance(rows, (str, os.PathLike)) else list(rows)
        if limit is not None:
            row_list = row_list[:limit]
        result = map_rows(row_list, functools.partial(_scan_worker, model, module),  # type: ignore[arg-type]
                          executor=executor, address=address, batch_size=batch_size)  # type: ignore[arg-type]
        records, rows_in = list(result.records), result.rows_in
        failures = [f.as_dict() for f in result.failures]
    if not records:
        raise FaceLensError(f"dataset view of {fm.name} {layer}: no usable face among {rows_in} photos")
    n_channels = len(records[0]["peak"])
    chosen = pick_channels(n_channels, channels) if isinstance(channels, int) else [int(c) for c in channels]
    bad = [c for c in chosen if not 0 <= c < n_channels]
    if bad:
        raise ModelError(f"{fm.name}: layer {layer!r} has {n_channels} channels, not {bad}")
    peaks = np.stack([r["peak"] for r in records])
    top = {c: list(np.argsort(-peaks[:, c], kind="stable")[:k]) for c in chosen}
    positions = {(int(records[i]["row"][c]), int(records[i]["col"][c])) for c, idx in top.items() for i in idx}
    boxes = receptive_fields(fm, module, sorted(positions))
    photos: dict[str, np.ndarray] = {}
    patches: dict[int, list[Patch]] = {}
    for c, idx in top.items():
        patches[c] = []
        for rank, i in enumerate(idx):
            rec = records[i]
            pos = (int(rec["row"][c]), int(rec["col"][c]))
            if rec["path"] not in photos:
                photos[rec["path"]] = load_image(rec["path"])
            img, quad, pbox = patch_from_photo(photos[rec["path"]], rec["matrix"], boxes[pos], max_side=max_side)
            patches[c].append(Patch(rec["path"], c, rank, float(rec["peak"][c]), pos, boxes[pos], quad, pbox, img))
    return DatasetView(model=fm.name, layer=layer, module=module, patches=patches, rows_in=rows_in,
                       rows_used=len(records), failures=failures, seconds=time.perf_counter() - start)
