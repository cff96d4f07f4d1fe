"""The workshop's "raw vs optimized" table, measured: every export and int8 variant of each model.

For each model: file size, median latency at batch 1 and 16, peak memory (a fresh process per variant,
``ru_maxrss`` growth), and agreement with fp32 on real photos (all verification pairs for dlib-resnet,
face chips from the manifest for classifiers). Writes ``export_<model>.{json,csv,html}`` per model.

    python bench/export_table.py [--models dlib-resnet fer-emotion] [--pairs 2244] [--repeats 20] [--out DIR]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.common import SHARED
from facelens.export import measure_variants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["dlib-resnet", "fer-emotion"])
    ap.add_argument("--faces", default=str(SHARED))
    ap.add_argument("--pairs", type=int, default=2244, help="verification pairs (all of them by default)")
    ap.add_argument("--chips", type=int, default=400, help="face chips for classifier agreement")
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="out/bench/export")
    args = ap.parse_args()
    for name in args.models:
        table = measure_variants(name, args.faces, n_pairs=args.pairs, n_chips=args.chips,
                                 n_calibration=args.calibration, repeats=args.repeats, memory="subprocess")
        paths = table.write(args.out)
        cols = ("variant", "status", "size_mb", "latency_b1_ms", "latency_b16_ms", "speedup_b1", "speedup_b16",
                "peak_mb", "max_abs_diff", "cosine_min", "verification_acc", "decisions_changed", "top1_agreement")
        print(f"\n== {name} ({table.settings['evaluated_on']}, {table.seconds:.0f} s) ==")
        print(" | ".join(cols))
        for r in table.rows:
            print(" | ".join(_fmt(getattr(r, c)) for c in cols))
        for note in table.notes:
            print("  " + note)
        print(paths["json"])


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


if __name__ == "__main__":
    main()
