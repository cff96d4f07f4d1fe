"""Shared helpers: best-of timing, the floor, and real faces from ../shared (or the demo portraits)."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "faces"


def best_of(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Fastest wall time of ``repeat`` runs, in seconds (the least disturbed by other processes)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def floor_seconds(net: torch.nn.Module, x: torch.Tensor, n: int, batch_size: int, backward: bool,
                  repeat: int = 3) -> float:
    """A bare batched forward (and backward) of ``n`` evaluations of ``x``: what no method can beat."""
    batch = x.expand(min(n, batch_size), *x.shape[1:]).contiguous()

    def run() -> None:
        done = 0
        while done < n:
            b = batch[: min(batch_size, n - done)]
            if backward:
                inp = b.clone().requires_grad_(True)
                net(inp).sum().backward()
            else:
                with torch.inference_mode():
                    net(b)
            done += len(b)

    return best_of(run, repeat=repeat)


def face_paths(n: int, datasets: tuple[str, ...] = ("frl_london", "utkface")) -> list[Path]:
    """The first ``n`` photos of the given datasets in the shared manifest (empty when absent)."""
    if not (SHARED / "manifest.csv").is_file():
        return []
    with open(SHARED / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["dataset"] in datasets]
    per = {d: [SHARED / r["path"] for r in rows if r["dataset"] == d] for d in datasets}
    out: list[Path] = []
    while len(out) < n and any(per.values()):
        for d in datasets:
            if per[d] and len(out) < n:
                out.append(per[d].pop(0))
    return out


def portrait_or_face() -> np.ndarray:
    from facelens.image import load_image
    from facelens.portraits import default_portraits

    paths = face_paths(1)
    return load_image(paths[0]) if paths else default_portraits()[0].image
