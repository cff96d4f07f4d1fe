"""``python -m bench``: every benchmark in one run; tables on stdout, numbers in out/bench/results.json."""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from bench import deletion_vs_quantus, explain_methods
from facelens.outputs import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fer-emotion only, one repeat")
    ap.add_argument("--out", default="out/bench/results.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    models = ["fer-emotion"] if args.quick else ["dlib-resnet", "fer-emotion"]
    results: dict[str, object] = {
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "platform": platform.platform()},
    }
    print("== explanation methods vs floor and peers ==")
    results["explain_methods"] = explain_methods.run(models, repeats=1 if args.quick else 2)
    explain_methods.print_tables(results["explain_methods"])  # type: ignore[arg-type]
    print("\n== deletion AUC: facelens vs Quantus PixelFlipping ==")
    try:
        results["deletion_vs_quantus"] = deletion_vs_quantus.run(n_faces=10 if args.quick else 50)
    except ImportError:
        results["deletion_vs_quantus"] = {"skipped": "quantus is not installed (pip install quantus)"}
    for k, v in results["deletion_vs_quantus"].items():  # type: ignore[union-attr]
        print(f"{k:>28}: {v}")
    results["seconds"] = time.perf_counter() - t0
    print(f"\nwrote {write_json(args.out, results)} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
