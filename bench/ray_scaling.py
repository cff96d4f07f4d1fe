"""Ray executor scaling: the same manifest embedded by 1 and by 2 local Ray workers, and in-process.

Each run is a full ``map_rows`` (load, detect, align, embed with dlib-resnet) over the first
``--photos`` photos of the shared manifest, worker start-up and model loading included, because a
user pays those too. Runs are interleaved (ray×1, ray×2, local per round) and the best round of each
kept. Each Ray worker takes one CPU (one torch thread); the in-process run uses torch's default threads.

    python -m bench.ray_scaling [--photos 200] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

from bench.common import SHARED
from facelens.datasets import read_manifest
from facelens.executors import BatchFn, MapResult, map_rows


def embed_worker(model_name: str = "dlib-resnet") -> BatchFn:
    """The studies' per-photo step (detect, align, embed), loaded once per worker."""
    from facelens.studies.features import model_worker

    return model_worker(model_name)()


def run(photos: int = 200, rounds: int = 1, batch_size: int = 16) -> dict[str, object]:
    import cloudpickle
    import ray

    from facelens.executors_ray import connect

    if not (SHARED / "manifest.csv").is_file():
        return {"skipped": f"{SHARED} is absent"}
    rows = read_manifest(SHARED / "manifest.csv")[:photos]
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # bench/ is not importable on the workers
    t0 = time.perf_counter()
    started = connect(None, workers=2)
    init_s = time.perf_counter() - t0
    best: dict[str, float] = {}
    results: dict[str, MapResult] = {}
    runs = {"ray_1_worker": dict(executor="ray", workers=1), "ray_2_workers": dict(executor="ray", workers=2),
            "local": dict(executor="local")}
    try:
        for _ in range(rounds):
            for name, kw in runs.items():
                t = time.perf_counter()
                results[name] = map_rows(rows, partial(embed_worker), batch_size=batch_size, **kw)  # type: ignore[arg-type]
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    finally:
        if started:
            ray.shutdown()
    ref = results["local"]
    same = all(len(r.records) == len(ref.records) and r.failures == ref.failures
               and all(np.array_equal(a.outputs["original"], b.outputs["original"])
                       for a, b in zip(r.records, ref.records, strict=True))
               for r in results.values())
    return {"photos": len(rows), "rounds": rounds, "batch_size": batch_size, "ray_init_s": init_s,
            "seconds": best, "photos_per_s": {k: len(rows) / v for k, v in best.items()},
            "speedup_2_vs_1_workers": best["ray_1_worker"] / best["ray_2_workers"],
            "ray_2_workers_vs_local": best["local"] / best["ray_2_workers"],
            "counts": {k: r.counts() for k, r in results.items()}, "identical_to_local": same}


def print_table(res: dict[str, object]) -> None:
    if "skipped" in res:
        print(f"skipped: {res['skipped']}")
        return
    print(f"{res['photos']} photos, batch {res['batch_size']}, Ray start {res['ray_init_s']:.1f} s (not included)")
    for k, s in res["seconds"].items():  # type: ignore[attr-defined]
        c = res["counts"][k]  # type: ignore[index]
        print(f"{k:<15}{s:>8.1f} s{res['photos_per_s'][k]:>8.2f} photos/s   "  # type: ignore[index]
              f"in {c['rows_in']}, out {c['rows_out']}, failed {c['failed']}")
    print(f"2 workers vs 1: {res['speedup_2_vs_1_workers']:.2f}×; 2 workers vs in-process: "
          f"{res['ray_2_workers_vs_local']:.2f}×; identical to local: {res['identical_to_local']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    print_table(run(args.photos, args.rounds, args.batch_size))


if __name__ == "__main__":
    main()
