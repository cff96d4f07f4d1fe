"""The Ray executor behind ``map_rows(..., executor="ray")``: Ray Data ``map_batches`` over a manifest.

Why Ray Data and not hand-made tasks: it already streams blocks through a pool of long-lived actors
with back-pressure, restarts dead actors and retries their batches. What we add on top is the contract
of :mod:`facelens.executors`:

- one actor per worker runs ``make_worker()`` once in its constructor, so the model loads once per
  worker (``workers`` actors, one CPU each, torch threads as in the driver: see ``threads``);
- every row travels with its manifest index and results are put back in manifest order, so the
  :class:`~facelens.executors.MapResult` is the one the local executor returns;
- a batch that raises a :class:`~facelens.errors.FaceLensError` is re-run row by row inside the actor
  (:func:`facelens.executors.run_batch`): a bad photo becomes a :class:`~facelens.executors.RowFailure`;
- a worker that dies (crash, out of memory, lost node) is restarted and its batch retried
  (``max_restarts`` / ``max_task_retries``); other exceptions in a batch are retried too
  (``retry_exceptions``), up to ``retries`` times, then the job fails with Ray's error;
- the rows that came back are counted: ``rows_in == rows_out + failed`` or a FaceLensError names the
  rows that went missing.

Rows and results cross process boundaries as pickled bytes, so any picklable record works and Arrow
never has to guess a schema for it.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .datasets import ManifestRow
from .errors import FaceLensError
from .executors import BatchFn, MapResult, run_batch, split

__all__ = ["DEFAULT_LOCAL_WORKERS", "connect", "map_rows_ray"]

DEFAULT_LOCAL_WORKERS = 2


def connect(address: str | None = None, workers: int | None = None) -> bool:
    """Make sure this process is connected to Ray; True when this call started a local cluster.

    ``address=None`` starts a private local cluster bound to 127.0.0.1 (no dashboard, worker logs kept
    out of the driver's output). Any other address (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``)
    connects to that cluster. A process already connected keeps its connection.
    """
    import ray

    if ray.is_initialized():
        return False
    try:
        if address is None:
            ray.init(num_cpus=max(DEFAULT_LOCAL_WORKERS, workers or 0), include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING, _node_ip_address="127.0.0.1",
                     runtime_env={"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}})
            return True
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise FaceLensError(f"cannot connect to the Ray cluster at {address or 'a new local cluster'}: {exc}") from exc
    return False


class _Worker:
    """A Ray Data actor: builds the batch function once, then maps pickled batches of rows to pickled results."""

    def __init__(self, make_worker: Callable[[], BatchFn], threads: int | None = None) -> None:
        if threads:  # before the model loads: gradients (backward reductions) depend on the thread count
            import torch

            torch.set_num_threads(threads)
        self.fn = make_worker()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = np.empty(len(batch["rows"]), dtype=object)
        out[:] = [pickle.dumps(run_batch(self.fn, pickle.loads(blob)), protocol=pickle.HIGHEST_PROTOCOL)
                  for blob in batch["rows"]]
        return {"start": np.asarray(batch["start"], dtype=np.int64), "results": out}


def map_rows_ray(rows: Sequence[ManifestRow], make_worker: Callable[[], BatchFn], address: str | None = None,
                 batch_size: int = 16, workers: int | None = None, retries: int = 3,
                 threads: int | None = None) -> MapResult:
    """:func:`facelens.executors.map_rows` on Ray: same results, in the same order, with the same counts.

    The manifest is cut into the same batches as the local executor cuts it (so even batch-size
    dependent float rounding is identical); each batch is one Ray Data row and one block, and is
    handed whole to a worker. ``workers`` actors (default 2 on a local cluster, one per CPU of a
    remote cluster) each take one CPU; ``retries`` bounds actor restarts and batch retries.

    ``threads`` sets torch's threads in each worker; by default the driver's count when torch is
    loaded here. Forward passes give the same numbers with any thread count, but backward passes
    (every gradient method) split their reductions by thread, so identical results need it.
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    rows = list(rows)
    if not rows:
        return MapResult([], [], [], rows_in=0, executor="ray", workers=0)
    connect(address, workers)
    if workers is None:
        cpus = int(ray.cluster_resources().get("CPU", DEFAULT_LOCAL_WORKERS))
        workers = DEFAULT_LOCAL_WORKERS if address is None else max(1, cpus)
    starts = range(0, len(rows), batch_size)
    workers = max(1, min(workers, len(starts)))
    items = [{"start": i, "rows": pickle.dumps(rows[i:i + batch_size], protocol=pickle.HIGHEST_PROTOCOL)}
             for i in starts]
    if threads is None and "torch" in sys.modules:
        threads = sys.modules["torch"].get_num_threads()
    # Ray Data logs every operator's metrics dictionary at INFO when a dataset finishes: pages of noise
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.actor_task_retry_on_errors)
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    ctx.actor_task_retry_on_errors = True  # FaceLensErrors never get here: run_batch turns them into RowFailures
    results: dict[int, list[Any]] = {}
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        with warnings.catch_warnings():  # finite restarts/retries are only settable as "ray_remote_args"
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(_Worker, fn_constructor_args=(make_worker, threads), batch_size=1, batch_format="numpy",
                                compute=ActorPoolStrategy(size=workers), num_cpus=1,
                                max_restarts=retries, max_task_retries=retries)
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            for start, blob in zip(batch["start"], batch["results"], strict=True):
                results.setdefault(int(start), pickle.loads(blob))  # a retried batch must not count twice
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.actor_task_retry_on_errors = saved
    flat: list[Any] = []
    missing: list[int] = []
    for i in starts:
        part = results.get(i)
        expected = len(rows[i:i + batch_size])
        if part is None or len(part) != expected:
            missing.extend(range(i + len(part or []), i + expected))
            part = part or []
        flat.extend(part)
    if missing:
        named = ", ".join(str(rows[i].path) for i in missing[:5]) + (" …" if len(missing) > 5 else "")
        raise FaceLensError(f"the Ray job lost {len(missing)} of {len(rows)} rows: {named}")
    kept, records, failures = split(rows, flat)
    result = MapResult(kept, records, failures, rows_in=len(rows), executor="ray", workers=workers)
    if result.rows_in != result.rows_out + len(result.failures):  # pragma: no cover - split keeps every row
        raise FaceLensError(f"row count mismatch: {result.rows_in} in, {result.rows_out} out, "
                            f"{len(result.failures)} failed")
    return result
