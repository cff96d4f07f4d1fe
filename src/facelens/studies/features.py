"""The per-photo map step shared by the studies: detect, align, alter the chip, run the model.

Studies differ in what they do to a face (mask it, blur it, add noise) and in how they aggregate, but
the expensive per-photo part is the same: load, detect, align with the model's recipe, apply a few
**chip variants**, and run the network once on all of them as a batch. :func:`model_worker` builds that
step for :func:`facelens.executors.map_rows`, so every study can run locally or on Ray unchanged.

A variant is ``(name, fn)`` with ``fn(chip_rgb, landmarks68_in_chip) -> chip_rgb`` (or ``None`` for the
unaltered chip). Variant functions must be picklable (module-level functions or ``functools.partial``
of them) for Ray.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..datasets import ManifestRow
from ..errors import FaceLensError
from ..executors import BatchFn, MapResult, RowFailure, map_rows

__all__ = ["PhotoFeatures", "Variant", "extract", "model_worker"]

#: chips per forward pass: one huge batch is several times slower on a CPU than chunks (cache misses)
FORWARD_CHUNK = 32
VariantFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
Variant = tuple[str, VariantFn | None]


@dataclass
class PhotoFeatures:
    """What one photo gave: the network output per variant, and pooled layer features when asked for."""

    outputs: dict[str, np.ndarray]
    layer_features: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    box: tuple[int, int, int, int] | None = None
    chip_landmarks: np.ndarray | None = None
    chips: dict[str, np.ndarray] | None = None


class _Worker:
    """Holds the model for the lifetime of a worker (one load per worker, not per batch)."""

    def __init__(self, model_name: str, variants: Sequence[Variant], layers: Sequence[str], keep_chips: bool,
                 pool: int) -> None:
        from ..models import load_model

        self.model = load_model(model_name)
        self.variants = list(variants) or [("original", None)]
        self.layers = list(layers)
        self.keep_chips = keep_chips
        self.pool = pool

    def __call__(self, rows: list[ManifestRow]) -> list[PhotoFeatures | RowFailure]:
        import torch

        results: list[PhotoFeatures | RowFailure] = []
        prepared: list[tuple[int, Any, list[np.ndarray]]] = []
        for i, row in enumerate(rows):
            try:
                chip = self.model.chip(row.path)
                marks = chip.landmarks if chip.face is not None else None
                images = []
                for name, fn in self.variants:
                    if fn is None:
                        images.append(chip.image)
                        continue
                    if marks is None:
                        raise FaceLensError(f"{row.path}: variant {name!r} needs landmarks, the chip has no face")
                    out = np.asarray(fn(chip.image, marks))
                    if out.shape != chip.image.shape or out.dtype != np.uint8:
                        raise FaceLensError(f"variant {name!r} returned {out.dtype} {out.shape}, "
                                            f"expected uint8 {chip.image.shape}")
                    images.append(out)
                prepared.append((i, chip, images))
                results.append(RowFailure(str(row.path), "pending"))
            except FaceLensError as exc:
                results.append(RowFailure(str(row.path), str(exc)))
        if not prepared:
            return results
        batch = np.stack([img for _, _, imgs in prepared for img in imgs])
        captured: dict[str, torch.Tensor] = {}
        handles = [self.model.layer(name).register_forward_hook(functools.partial(_capture, captured, name))
                   for name in self.layers]
        try:
            outputs_parts, pooled_parts = [], []
            with torch.no_grad():
                for start in range(0, len(batch), FORWARD_CHUNK):
                    captured.clear()
                    outputs_parts.append(self.model.net(self.model.to_tensor(batch[start:start + FORWARD_CHUNK])))
                    pooled_parts.append({name: _pool(t, self.pool) for name, t in captured.items()})
            outputs = torch.cat(outputs_parts).numpy()
        finally:
            for h in handles:
                h.remove()
        pooled = {name: np.concatenate([part[name] for part in pooled_parts]) for name in self.layers}
        k = len(self.variants)
        for j, (i, chip, images) in enumerate(prepared):
            sl = slice(j * k, (j + 1) * k)
            names = [n for n, _ in self.variants]
            results[i] = PhotoFeatures(
                outputs=dict(zip(names, outputs[sl], strict=True)),
                layer_features={layer: dict(zip(names, feats[sl], strict=True)) for layer, feats in pooled.items()},
                box=chip.face.box if chip.face is not None else None,
                chip_landmarks=chip.landmarks if chip.face is not None else None,
                chips=dict(zip(names, images, strict=True)) if self.keep_chips else None,
            )
        return results


def _capture(store: dict, name: str, _module: Any, _inputs: Any, output: Any) -> None:
    store[name] = output.detach()


def _pool(t: Any, size: int) -> np.ndarray:
    """Adaptive-average-pool a feature map to ``size``×``size`` and flatten (0 keeps it whole)."""
    import torch.nn.functional as F

    if t.ndim == 4 and size > 0:
        t = F.adaptive_avg_pool2d(t, size)
    return t.flatten(1).numpy()


def _make_worker(model_name: str, variants: tuple[Variant, ...], layers: tuple[str, ...], keep_chips: bool,
                 pool: int) -> BatchFn:
    return _Worker(model_name, variants, layers, keep_chips, pool)


def model_worker(model_name: str, variants: Sequence[Variant] = (("original", None),), *,
                 layers: Sequence[str] = (), keep_chips: bool = False, pool: int = 0) -> Callable[[], BatchFn]:
    """A picklable ``make_worker`` for :func:`~facelens.executors.map_rows` (see the module docstring).

    ``layers`` adds pooled features of those layers (``pool``×``pool`` average pooling, 0 = whole map).
    """
    return functools.partial(_make_worker, model_name, tuple(variants), tuple(layers), keep_chips, pool)


def extract(rows: Sequence[ManifestRow], model_name: str, variants: Sequence[Variant] = (("original", None),), *,
            layers: Sequence[str] = (), keep_chips: bool = False, pool: int = 0, executor: str = "local",
            address: str | None = None, batch_size: int = 16, progress: str | None = None) -> MapResult:
    """Run :func:`model_worker` over ``rows``; records are :class:`PhotoFeatures` in manifest order."""
    worker = model_worker(model_name, variants, layers=layers, keep_chips=keep_chips, pool=pool)
    return map_rows(rows, worker, executor=executor, address=address,  # type: ignore[arg-type]
                    batch_size=batch_size, progress=progress)
