"""The workshop's "raw vs optimized" table, measured: every export and int8 variant of each model.

For each model, in one run (:func:`facelens.export.measure_variants`): file size; latency on one face and
on a batch, median and interquartile range over interleaved rounds after untimed warm-up; speed-up over
the raw model as per-round ratios with an interval over rounds, and the verdict rule's word for it
("faster" only when the whole interval is above 1.1×); peak memory of a fresh process per variant; and
agreement with fp32 on real photos (verification pairs for dlib-resnet, face chips from the manifest for
classifiers). Nothing here asserts a time: machines differ, and a shared one varies from minute to
minute, so only ratios measured within one run are compared. Writes ``export_<model>.{json,csv,html,png}``.

    python bench/export_table.py [--models dlib-resnet fer-emotion] [--pairs 2244] [--repeats 20] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.common import SHARED
from facelens.export import DEFAULT_BATCH, WARMUP, ExportTable, VariantRow, measure_variants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["dlib-resnet", "fer-emotion"])
    ap.add_argument("--faces", default=str(SHARED))
    ap.add_argument("--pairs", type=int, default=2244, help="verification pairs (all of them by default)")
    ap.add_argument("--chips", type=int, default=1000, help="face chips for classifier agreement")
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20, help="timed rounds (the verdict rule needs at least 8)")
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="bulk batch size timed beside batch 1")
    ap.add_argument("--warmup", type=int, default=WARMUP, help="untimed calls per variant and batch size")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="out/bench/export")
    args = ap.parse_args()
    for name in args.models:
        table = measure_variants(name, args.faces, n_pairs=args.pairs, n_chips=args.chips,
                                 n_calibration=args.calibration, repeats=args.repeats, batch=args.batch,
                                 warmup=args.warmup, threads=args.threads, memory="subprocess")
        paths = table.write(args.out)
        print(f"\n== {name} ({table.settings['evaluated_on']}, {table.seconds:.0f} s) ==")
        print(_lines(table))
        for line in table.verdicts():
            print("- " + line)
        for note in table.notes:
            print("  " + note)
        print(paths["json"])


def _lines(table: ExportTable) -> str:
    """A plain-text table: median [IQR] ms, speed-up [interval] and the rule's word, memory, agreement."""
    b = table.batch
    head = ("variant", "file MB", "ms @1 [IQR]", f"ms @{b} [IQR]", "ms/face @" + str(b), "speed-up @1", "@1",
            f"speed-up @{b}", f"@{b}", "peak MB", "above runtime", "max|Δ|", "changed", "agreement")
    out = [" | ".join(head)]
    for r in table.rows:
        if r.status != "ok":
            out.append(f"{r.variant} | {r.status}")
            continue
        out.append(" | ".join((r.variant, _f(r.size_mb), _spread(r, "b1"), _spread(r, "batch"),
                               _f(r.per_face_batch_ms), _ratio(r, "b1"), r.speed_b1, _ratio(r, "batch"),
                               r.speed_batch, _f(r.peak_mb), _f(r.model_mb), _f(r.max_abs_diff),
                               f"{r.decisions_changed}/{r.compared}", r.agreement)))
    return "\n".join(out)


def _f(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else "n/a"


def _spread(r: VariantRow, key: str) -> str:
    med, q1, q3 = (getattr(r, f"latency_{key}{s}_ms") for s in ("", "_q1", "_q3"))
    return f"{_f(med)} [{_f(q1)}–{_f(q3)}]" if math.isfinite(med) else "not timed"


def _ratio(r: VariantRow, key: str) -> str:
    v, lo, hi = (getattr(r, f"speedup_{key}{s}") for s in ("", "_lo", "_hi"))
    return f"{v:.2f}× [{_f(lo)}, {_f(hi)}]" if math.isfinite(v) else "n/a"


if __name__ == "__main__":
    main()
