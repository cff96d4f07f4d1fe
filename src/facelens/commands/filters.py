"""``facelens filters``: what the filters of a model detect at each depth (PNG, JSON and an HTML fragment)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import register_command


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="dlib-resnet", help="a zoo model name (see `facelens models`)")
    p.add_argument("--layers", default="early,mid,late",
                   help="comma-separated depth aliases or module names (default: early,mid,late)")
    p.add_argument("--channels", type=int, default=8, help="channels visualized per layer (spread evenly)")
    p.add_argument("--steps", type=int, default=24, help="optimization steps of activation maximization")
    p.add_argument("--size", type=int, default=None, help="side of the optimized images (default: model input)")
    p.add_argument("--facets", type=int, default=1, help="images per channel, pushed apart by a diversity term")
    p.add_argument("--manifest", default=None, help="CSV of face photos for statistics and the dataset view")
    p.add_argument("--datasets", default=None, help="only these manifest datasets (comma-separated)")
    p.add_argument("--faces", type=int, default=24, help="photos sampled from the manifest (across datasets)")
    p.add_argument("--view-channels", type=int, default=3, help="channels per layer in the dataset view")
    p.add_argument("--top", type=int, default=6, help="patches per channel in the dataset view")
    p.add_argument("--executor", default="local", choices=("local", "ray"))
    p.add_argument("--address", default=None, help="Ray cluster address (with --executor ray)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: out/filters/<model>)")


def _run(args: argparse.Namespace) -> int:
    from ..errors import FaceLensError
    from ..internals.filters import filters_report

    layers = [x.strip() for x in args.layers.split(",") if x.strip()]
    if not layers:
        raise FaceLensError("--layers names no layer")
    if args.manifest is not None and not Path(args.manifest).is_file():
        raise FaceLensError(f"{args.manifest}: manifest not found")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else None
    result = filters_report(args.model, depths=layers, channels=args.channels, steps=args.steps, size=args.size,
                            manifest=args.manifest, datasets=datasets, faces=args.faces,
                            view_channels=args.view_channels, k=args.top, facets=args.facets,
                            executor=args.executor, address=args.address, seed=args.seed)
    out = Path(args.out) if args.out else Path("out") / "filters" / result.model.replace(":", "_")
    paths = result.write(out)
    for line in result.verdicts():
        print(line)
    for note in result.notes:
        print(f"note: {note}")
    print(paths["json"])
    return 0


register_command("filters", "visualize filters at each depth, measure their statistics, show top face patches",
                 _add_args, _run)
