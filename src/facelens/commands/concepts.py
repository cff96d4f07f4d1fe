"""``facelens concepts``: TCAV of facial concepts (smiling, sex, age) and, optionally, unit–region dissection."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import register_command


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_args(p: argparse.ArgumentParser) -> None:
    from ..executors import EXECUTORS

    p.add_argument("--manifest", required=True, help="CSV with path, sex, age, dataset, subset columns")
    p.add_argument("--model", default="fer-emotion")
    p.add_argument("--concepts", default="smiling,sex,age",
                   help="comma-separated: smiling (with neutral), sex (female, male), age (child, senior), "
                        "or single concepts: neutral, female, male, child, young_adult, senior")
    p.add_argument("--layers", default="early,mid,late", help="comma-separated depths or module names")
    p.add_argument("--target", default=None, help="class name or index (classifiers); default per model")
    p.add_argument("--per-concept", type=int, default=20, help="example photos per concept")
    p.add_argument("--random", type=int, default=5, help="random counterpart sets (CAVs per concept)")
    p.add_argument("--probes", type=int, default=20, help="probe faces whose target score is differentiated")
    p.add_argument("--datasets", default=None, help="only these manifest datasets (comma-separated)")
    p.add_argument("--dissect", action="store_true", help="also list units aligned with eyes, nose and mouth")
    p.add_argument("--dissect-photos", type=int, default=48)
    p.add_argument("--top", type=float, default=0.05, help="top fraction of each unit's activations (dissection)")
    p.add_argument("--iou-threshold", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the t-test")
    p.add_argument("--executor", default="local", choices=EXECUTORS)
    p.add_argument("--address", default=None, help="Ray cluster address (with --executor ray)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/concepts")


def _run(args: argparse.Namespace) -> int:
    from ..internals.concepts import concepts_report

    report = concepts_report(
        args.manifest, model=args.model, concepts=_split(args.concepts) or [], layers=_split(args.layers) or [],
        target=args.target, per_concept=args.per_concept, n_random=args.random, n_probes=args.probes,
        datasets=_split(args.datasets), dissect=args.dissect, dissect_photos=args.dissect_photos, top=args.top,
        iou_threshold=args.iou_threshold, alpha=args.alpha, executor=args.executor, address=args.address,
        batch_size=args.batch_size, seed=args.seed)
    paths = report.write(Path(args.out))
    for line in report.tcav.verdicts():
        print(line)
    if report.dissection is not None:
        for line in report.dissection.verdicts():
            print(line)
    for note in report.notes:
        print(f"note: {note}")
    for bad in report.failures[:10]:
        print(f"  skipped {bad['path']}: {bad['reason']}", file=sys.stderr)
    print(paths["json"])
    return 0


register_command("concepts", "TCAV of facial concepts (smiling, sex, age) with significance tests; "
                 "--dissect lists eye/nose/mouth units", _add_args, _run)
