"""``facelens export``: one model to TorchScript or ONNX (optionally int8), or the measured raw-vs-optimized table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import print_json, register_command
from ..errors import FaceLensError

_DEFAULT_FACES = Path("..") / "shared" / "faces"


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="dlib-resnet", help="zoo model name (see `facelens models`)")
    p.add_argument("--format", choices=["torchscript", "onnx"], default=None, help="file format (single export)")
    p.add_argument("--quantize", choices=["int8", "int8-dynamic", "int8-static"], default=None,
                   help="int8 = static (calibrated) for ONNX, dynamic (Linear layers only) for TorchScript")
    p.add_argument("--out", required=True, help="the file to write; with --table, the folder")
    p.add_argument("--faces", default=str(_DEFAULT_FACES),
                   help="folder with manifest.csv and pairs_verification.csv: calibration and agreement photos")
    p.add_argument("--calibration-limit", type=int, default=64, help="face chips to calibrate static int8 on")
    p.add_argument("--table", action="store_true",
                   help="build every variant and write the measured raw-vs-optimized table (JSON, CSV, HTML)")
    p.add_argument("--variants", default=None, help="with --table: comma-separated subset of the variants")
    p.add_argument("--pairs", type=int, default=1000,
                   help="with --table: verification pairs (recognizers); with several variants, 0 changed in "
                        "about 700 is the least that shows agreement within 1 %%")
    p.add_argument("--chips", type=int, default=1000, help="with --table: face chips for top-1 agreement")
    p.add_argument("--repeats", type=int, default=20,
                   help="with --table: timed rounds; each times every variant on one face and on a batch, in a "
                        "shuffled order (the verdict rule needs at least 8)")
    p.add_argument("--batch", type=int, default=16, help="with --table: the bulk batch size timed beside batch 1")
    p.add_argument("--warmup", type=int, default=5,
                   help="with --table: untimed calls per variant and batch size before the first timed one")
    p.add_argument("--threads", type=int, default=None,
                   help="with --table: CPU threads for every runtime (default: torch's default)")
    p.add_argument("--memory", choices=["subprocess", "none"], default="subprocess",
                   help="with --table: peak memory of a fresh process per variant, or not measured")
    p.add_argument("--keep-files", action="store_true", help="with --table: keep the exported files in --out")
    p.add_argument("--seed", type=int, default=0)


def _run(args: argparse.Namespace) -> int:
    from ..export import VARIANTS, calibration_chips, export_model, measure_variants

    faces = Path(args.faces)
    if args.table:
        if args.format or args.quantize:
            raise FaceLensError("--table builds every format and quantization; drop --format/--quantize")
        variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else list(VARIANTS)
        out = Path(args.out)
        table = measure_variants(args.model, faces, variants=variants, n_pairs=args.pairs, n_chips=args.chips,
                                 n_calibration=args.calibration_limit, repeats=args.repeats, batch=args.batch,
                                 warmup=args.warmup, memory=args.memory, threads=args.threads, seed=args.seed,
                                 keep_files=out / "files" if args.keep_files else None)
        paths = table.write(out)
        for line in table.verdicts():
            print(line)
        for note in table.notes:
            print(f"  {note}")
        for path in paths.values():
            print(path)
        return 0
    if args.format is None:
        raise FaceLensError("pass --format torchscript|onnx (or --table for the measured comparison)")
    calibration = None
    quantize = args.quantize
    if quantize == "int8":
        quantize = "int8-static" if args.format == "onnx" else "int8-dynamic"
    if quantize == "int8-static":
        manifest = faces / "manifest.csv"
        if not manifest.is_file():
            raise FaceLensError(f"{manifest}: static int8 calibrates on real face photos; pass --faces with a "
                                "manifest.csv")
        calibration = calibration_chips(args.model, manifest, limit=args.calibration_limit, seed=args.seed)
    result = export_model(args.model, args.out, format=args.format, quantize=quantize, calibration=calibration)
    for note in result.notes:
        print(note, file=sys.stderr)
    print_json(result.as_json())
    return 0


register_command("export", "export a model to TorchScript/ONNX, optionally int8; or measure raw vs optimized (--table)",
                 _add_args, _run)
