"""Run a per-photo job over a manifest: in this process (default) or on a Ray cluster.

Dataset-level studies and metrics split into a **map** over photos (load, detect, align, run the model:
the expensive part, embarrassingly parallel) and a cheap **reduce** done locally (rates, bootstrap,
tables). :func:`map_rows` is the map. Its contract, which every executor keeps:

- ``make_worker`` is a picklable zero-argument callable (a module-level function or a
  ``functools.partial`` of one) returning the batch function. It is called **once per worker**, so the
  model is loaded once per worker, not once per batch.
- The batch function takes a list of :class:`~facelens.datasets.ManifestRow` and returns one result per
  row, in order: a picklable record (dict, array, ...) or a :class:`RowFailure` for a photo it could not
  use (unreadable, no face). A batch that raises a :class:`~facelens.errors.FaceLensError` is retried
  row by row, so one bad photo never takes its neighbours with it.
- The :class:`MapResult` keeps the manifest order and counts rows in and out: ``rows_in == len(records)
  + len(failures)`` always holds, so no row is silently lost.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .datasets import ManifestRow
from .errors import FaceLensError

__all__ = ["EXECUTORS", "BatchFn", "MapResult", "RowFailure", "map_rows"]

Executor = Literal["local", "ray"]
EXECUTORS: tuple[str, ...] = ("local", "ray")


@dataclass(frozen=True)
class RowFailure:
    """A photo the job could not use, and why (one line, as the CLI prints it)."""

    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


BatchFn = Callable[[list[ManifestRow]], list[Any]]


@dataclass
class MapResult:
    """Per-row results in manifest order; ``rows[i]`` produced ``records[i]``."""

    rows: list[ManifestRow]
    records: list[Any]
    failures: list[RowFailure] = field(default_factory=list)
    rows_in: int = 0
    executor: str = "local"
    seconds: float = 0.0
    workers: int = 1

    @property
    def rows_out(self) -> int:
        return len(self.records)

    def counts(self) -> dict[str, int | str | float]:
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "failed": len(self.failures),
                "executor": self.executor, "workers": self.workers, "seconds": round(self.seconds, 3)}


def run_batch(fn: BatchFn, batch: list[ManifestRow]) -> list[Any]:
    """``fn(batch)``, falling back to one row at a time when the batch raises a FaceLensError."""
    try:
        out = fn(batch)
        if len(out) != len(batch):
            raise RuntimeError(f"a batch function returned {len(out)} results for {len(batch)} rows")
        return out
    except FaceLensError as exc:
        if len(batch) == 1:  # a lone bad row is a failure of that row, not of the whole map
            return [RowFailure(str(batch[0].path), str(exc))]
    results: list[Any] = []
    for row in batch:
        try:
            results.extend(fn([row]))
        except FaceLensError as exc:
            results.append(RowFailure(str(row.path), str(exc)))
    return results


def split(rows: Sequence[ManifestRow], results: Sequence[Any]) -> tuple[list[ManifestRow], list[Any], list[RowFailure]]:
    kept_rows, records, failures = [], [], []
    for row, res in zip(rows, results, strict=True):
        if isinstance(res, RowFailure):
            failures.append(res)
        else:
            kept_rows.append(row)
            records.append(res)
    return kept_rows, records, failures


def map_rows(rows: Sequence[ManifestRow], make_worker: Callable[[], BatchFn], *, executor: Executor = "local",
             address: str | None = None, batch_size: int = 16, workers: int | None = None,
             progress: str | None = None) -> MapResult:
    """Apply the worker's batch function to every row (see the module docstring for the contract).

    ``executor="ray"`` runs it with Ray Data on the cluster at ``address`` (a local one when None);
    results are identical to the local run.
    """
    rows = list(rows)
    start = time.perf_counter()
    if executor == "ray":
        if importlib.util.find_spec("ray") is None:
            raise FaceLensError("--executor ray needs Ray: pip install -e '.[ray]' (or pip install 'ray[data]')")
        from .executors_ray import map_rows_ray

        result = map_rows_ray(rows, make_worker, address=address, batch_size=batch_size, workers=workers)
        result.seconds = time.perf_counter() - start
        return result
    if executor != "local":
        raise FaceLensError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    fn = make_worker()
    results: list[Any] = []
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=progress, unit="batch", leave=False)
    for batch in batches:
        results.extend(run_batch(fn, batch))
    kept, records, failures = split(rows, results)
    return MapResult(kept, records, failures, rows_in=len(rows), executor="local",
                     seconds=time.perf_counter() - start, workers=1)
