"""The one batched perturbation engine.

Occlusion, RISE, DISE, LIME, KernelSHAP, Score-CAM, pair maps and the
faithfulness metrics all reduce to "score these perturbed copies of an image".
Batching, bounded memory, seeding, progress and embedding caches live here
once, instead of once per method as in the peer libraries (captum's
``perturbations_per_eval``, grad-cam's ``batch_size``, Xplique's ``batch_size``).

Memory stays bounded because perturbed inputs are built batch by batch from a
small description (a mask generator), never materialized all at once.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from ..targets import Target

__all__ = ["DEFAULT_BATCH_SIZE", "EmbeddingCache", "PerturbationEngine", "score_rows"]

DEFAULT_BATCH_SIZE = 64
_SHOW_PROGRESS_FROM_BATCHES = 8

BatchBuilder = Callable[[int, int], torch.Tensor]


def score_rows(out: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
    """Scores ``(N,)`` for outputs ``(N, D)``: one target for all rows, or one per row."""
    if isinstance(targets, Target) or (callable(targets) and not isinstance(targets, Sequence)):
        return targets(out)  # type: ignore[operator]
    if len(targets) != out.shape[0]:
        raise ValueError(f"{len(targets)} targets for {out.shape[0]} outputs")
    return torch.stack([t(out[i]) for i, t in enumerate(targets)])


class PerturbationEngine:
    """Scores batches of perturbed inputs for one network and one target (or one per image).

    Args:
        net: the model's network (RGB in [0, 1] → outputs).
        target: the scalar being explained.
        batch_size: the single cost knob: how many perturbed images per forward.
        progress: ``True``/``False``, or ``None`` for a bar only on long runs on a terminal.
        fast: score on the network's inference copy (:func:`facelens.models.fuse.inference_net`:
            the same outputs from faster memory layouts and folded layers) when it has one.
    """

    def __init__(self, net: nn.Module, target: Target | Sequence[Target], *,
                 batch_size: int = DEFAULT_BATCH_SIZE, progress: bool | None = None,
                 desc: str = "perturbations", fast: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.net = net
        self.target = target
        self.batch_size = int(batch_size)
        self.progress = progress
        self.desc = desc
        self.fast = fast
        self.evaluations = 0

    def runner(self, example: torch.Tensor) -> nn.Module:
        """The module that scores batches like ``example``: the inference copy, or the network."""
        if not self.fast:
            return self.net
        from ..models.fuse import inference_net

        return inference_net(self.net, example)

    def _scores(self, out: torch.Tensor, owners: torch.Tensor | None) -> torch.Tensor:
        """One target for every row, or ``targets[owners[row]]`` when each image has its own."""
        if isinstance(self.target, Target) or owners is None:
            if not isinstance(self.target, Target) and not callable(self.target):
                raise ValueError("several targets need the owner image of each perturbed row")
            return self.target(out)  # type: ignore[operator]
        scores = torch.empty(out.shape[0], dtype=out.dtype)
        for owner in torch.unique(owners).tolist():
            rows = owners == owner
            scores[rows] = self.target[owner](out[rows])
        return scores

    @torch.inference_mode()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Target scores of ready inputs, in batches of ``batch_size``."""
        net = self.runner(x[:self.batch_size]) if len(x) else self.net
        parts = [self._scores(net(x[i:i + self.batch_size]), None) for i in range(0, len(x), self.batch_size)]
        self.evaluations += len(x)
        return torch.cat(parts) if parts else torch.zeros(0)

    def _bar(self, n: int) -> object:
        batches = -(-n // self.batch_size)
        show = self.progress if self.progress is not None else (
            batches >= _SHOW_PROGRESS_FROM_BATCHES and sys.stderr.isatty())
        if not show:
            return nullcontext(None)
        from tqdm.auto import tqdm

        return tqdm(total=n, desc=self.desc, unit="img", leave=False)

    def run(self, n: int, build: BatchBuilder,
            owners: Callable[[int, int], torch.Tensor] | None = None) -> torch.Tensor:
        """Score ``n`` perturbed inputs; ``build(start, stop)`` makes inputs ``start..stop-1``.

        When the engine holds one target per image (metrics over a batch of photos),
        ``owners(start, stop)`` says which image each perturbed input belongs to.
        """
        out = torch.empty(n)
        net: nn.Module | None = None
        with self._bar(n) as bar, torch.inference_mode():
            for start in range(0, n, self.batch_size):
                stop = min(n, start + self.batch_size)
                x = build(start, stop)
                if net is None:
                    net = self.runner(x)
                out[start:stop] = self._scores(net(x), owners(start, stop) if owners else None).float()
                self.evaluations += stop - start
                if bar is not None:
                    bar.update(stop - start)  # type: ignore[attr-defined]
        return out

    def run_masks(self, base: torch.Tensor, fill: torch.Tensor, n: int,
                  masks: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        """Score ``fill + m·(base − fill)`` for keep-masks ``m`` (1 keeps the pixel, 0 replaces it).

        ``masks(start, stop)`` returns ``(B, 1 or C, H, W)`` in [0, 1]; ``base`` and ``fill`` are
        ``(1, C, H, W)``.
        """
        delta = base - fill

        def build(start: int, stop: int) -> torch.Tensor:
            return torch.addcmul(fill, masks(start, stop), delta)

        return self.run(n, build)

    def batches(self, n: int) -> Iterator[tuple[int, int]]:
        for start in range(0, n, self.batch_size):
            yield start, min(n, start + self.batch_size)


class EmbeddingCache:
    """Embeddings of reference and gallery chips, keyed by network and chip bytes.

    Pair maps, DISE and the studies embed the same references again and again;
    this keeps the last few thousand so they are computed once.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._store: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _key(net: nn.Module, chip: np.ndarray) -> tuple[int, str]:
        return id(net), hashlib.sha1(np.ascontiguousarray(chip).tobytes()).hexdigest()

    def get(self, net: nn.Module, chips: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Embeddings ``(N, D)`` of uint8 chips ``(N, H, W, 3)``, computing only the missing ones."""
        keys = [self._key(net, c) for c in chips]
        found: dict[int, np.ndarray] = {}
        with self._lock:
            for i, k in enumerate(keys):
                if k in self._store:
                    found[i] = self._store[k]
            self.hits += len(found)
            self.misses += len(keys) - len(found)
        missing = [i for i in range(len(keys)) if i not in found]
        if missing:
            x = torch.from_numpy(np.ascontiguousarray(chips[missing])).permute(0, 3, 1, 2).float().div_(255.0)
            with torch.inference_mode():
                emb = torch.cat([net(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()
            with self._lock:
                for i, e in zip(missing, emb, strict=True):
                    found[i] = e
                    self._store[keys[i]] = e
                while len(self._store) > self.capacity:
                    self._store.popitem(last=False)
        return np.stack([found[i] for i in range(len(keys))])


EMBEDDINGS = EmbeddingCache()
