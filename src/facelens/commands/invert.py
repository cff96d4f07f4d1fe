"""``facelens invert IMAGE``: rebuild a face from one layer's features at several depths (and morph two faces)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import register_command


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="photo with a face")
    p.add_argument("--model", default="dlib-resnet")
    p.add_argument("--layers", default="input,early,mid,late",
                   help="comma-separated depths (input, early, mid, late) or module names")
    p.add_argument("--priors", default="tv,pyramid", help="comma-separated: tv, pyramid")
    p.add_argument("--steps", type=int, default=None, help="optimization steps per image (default 100)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--tv-weight", type=float, default=None, help="λ of the total-variation prior")
    p.add_argument("--second", default=None, help="a second photo: invert blends of the two faces' features")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="blend weights for --second")
    p.add_argument("--interp-layer", default="mid", help="layer whose features are blended (with --second)")
    p.add_argument("--interp-prior", default="tv", choices=["tv", "pyramid"])
    p.add_argument("--face", type=int, default=None, help="index of the face (largest first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/invert")


def _run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..errors import FaceLensError
    from ..internals.inversion import InversionSettings, invert_report

    settings = InversionSettings(seed=args.seed)
    changes = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("tv_weight", args.tv_weight))
               if v is not None}
    settings = replace(settings, **changes)
    try:
        alphas = [float(a) for a in _split(args.alphas)]
    except ValueError:
        raise FaceLensError(f"--alphas must be comma-separated numbers, got {args.alphas!r}") from None
    report = invert_report(args.image, model=args.model, layers=_split(args.layers), priors=_split(args.priors),
                           settings=settings, second=args.second, alphas=alphas,
                           interpolation_layer=args.interp_layer, interpolation_prior=args.interp_prior,
                           face=args.face)
    paths = report.write(Path(args.out))
    for line in report.verdicts():
        print(line)
    print(f"{report.seconds:.1f} s")
    print(paths["json"])
    return 0


register_command("invert", "rebuild a face from a layer's features (feature inversion) at several depths",
                 _add_args, _run)
