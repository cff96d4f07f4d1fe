"""``facelens audit <study>``: run one dataset-level study and write JSON, CSV, PNG and an HTML section."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import register_command


def _add_args(p: argparse.ArgumentParser) -> None:
    from ..executors import EXECUTORS
    from ..studies.base import load_studies

    sub = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    for spec in sorted(load_studies().values(), key=lambda s: s.name):
        sp = sub.add_parser(spec.name, help=spec.help, description=spec.help)
        sp.add_argument("--manifest", default=None, help="CSV with a 'path' column (the ../shared/faces format)")
        sp.add_argument("--model", default=spec.default_model)
        sp.add_argument("--datasets", default=None, help="only these manifest datasets (comma-separated)")
        sp.add_argument("--limit", type=int, default=None, help="first N rows only")
        sp.add_argument("--executor", default="local", choices=EXECUTORS)
        sp.add_argument("--address", default=None, help="Ray cluster address (with --executor ray)")
        sp.add_argument("--batch-size", type=int, default=16)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--out", default=f"out/audit/{spec.name}")
        if spec.add_args is not None:
            spec.add_args(sp)


def _run(args: argparse.Namespace) -> int:
    from ..studies.base import STUDIES

    if isinstance(args.datasets, str):
        args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    result = STUDIES[args.study].run(args)
    paths = result.write(Path(args.out))
    for line in result.verdicts:
        print(line)
    for bad in result.failures[:10]:
        print(f"  skipped {bad['path']}: {bad['reason']}", file=sys.stderr)
    print(paths["json"])
    return 0


register_command("audit", "run a study on a manifest: anonymization, one-shot, psychophysics, bias", _add_args, _run)
