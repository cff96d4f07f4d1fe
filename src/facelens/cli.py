"""The `facelens` command: thin sub-commands over the Python API.

Every error a user can cause is a `FaceLensError`; the CLI prints it as one line
on stderr and exits with status 1, never with a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import FaceLensError

__all__ = ["main", "print_json", "register_command"]

Handler = Callable[[argparse.Namespace], int]
#: every method `explain` knows, for --help without importing torch (a test keeps it equal to the registry)
METHOD_NAMES = ("gradient", "gradient-x-input", "smoothgrad", "integrated-gradients", "guided-backprop", "deeplift",
                "lrp", "ebp", "contrastive-ebp", "cam", "gradcam", "gradcam++", "layercam", "scorecam", "occlusion",
                "rise", "lime", "kernelshap", "region-occlusion", "region-lime", "region-shap", "canonical-occlusion",
                "dise")

_COMMANDS: dict[str, tuple[Handler, Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help_text: str) -> Callable[[Callable[[argparse.ArgumentParser], None]], Callable]:
    """Register a sub-command: the decorated function adds its arguments; ``run_<name>`` runs it."""

    def deco(add_args: Callable[[argparse.ArgumentParser], None]) -> Callable:
        handler = globals()[f"run_{name.replace('-', '_')}"]
        _COMMANDS[name] = (handler, add_args, help_text)
        return add_args

    return deco


def register_command(name: str, help_text: str, add_args: Callable[[argparse.ArgumentParser], None],
                     handler: Handler) -> None:
    """Register a sub-command from another module (see :mod:`facelens.commands`)."""
    if name in _COMMANDS:
        raise ValueError(f"facelens command {name!r} is registered twice")
    _COMMANDS[name] = (handler, add_args, help_text)


def _load_command_modules() -> None:
    """Import every module of :mod:`facelens.commands`; each registers its sub-commands on import.

    Command modules keep heavy imports (torch, models) inside their handlers, so ``facelens --help``
    stays fast.
    """
    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}")


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


_print_json = print_json


# -- models ---------------------------------------------------------------------------------------
def run_models(args: argparse.Namespace) -> int:
    from .models import list_models

    rows = list_models()
    if args.json:
        _print_json(rows)
        return 0
    zoo = [r for r in rows if not r.get("user_file")]
    if args.wide:
        _print_table(zoo, ("name", "task", "input", "license", "cached", "source"))
    else:  # fits 100 columns; --wide adds the license and the source
        _print_table([{**r, "input": _clip(str(r["input"]), 46)} for r in zoo], ("name", "task", "input", "cached"))
    users = [{**r, "parity": "n/a" if r["parity_max_abs"] is None else f"{r['parity_max_abs']:.2g}"}
             for r in rows if r.get("user_file")]
    if users:
        print()
        if args.wide:
            _print_table(users, ("name", "task", "input", "preset", "format", "parity", "sha256", "source"))
        else:  # 100 columns: the hash's first 12 digits name the file well enough, --wide shows all
            _print_table([{**r, "name": _clip(str(r["name"]), 30), "sha256": str(r["sha256"])[:12]} for r in users],
                         ("name", "task", "input", "preset", "format", "parity", "sha256"))
    return 0


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_table(rows: list[dict[str, object]], cols: Sequence[str]) -> None:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


@command("models", "list the model zoo: task, input, license, source, whether weights are cached")
def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--wide", action="store_true", help="also show each model's license and weight source")
    p.add_argument("--model", action="append", default=None,
                   help="also load this model file (.onnx, TorchScript) with --preset and list it: preset, input, "
                        "sha256 and its parity with onnxruntime (repeatable)")


# -- embed ----------------------------------------------------------------------------------------
def run_embed(args: argparse.Namespace) -> int:
    from .models import load_model

    model = load_model(args.model)
    vec = model.embed(args.image, face=args.face)
    _print_json({"image": args.image, "model": model.name, "dim": len(vec),
                 "embedding": [round(float(v), 6) for v in vec]})
    return 0


@command("embed", "print the face embedding of an image")
def _embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image")
    p.add_argument("--model", default="dlib-resnet")
    p.add_argument("--face", type=int, default=None, help="index of the face (largest first); default: largest")


# -- predict --------------------------------------------------------------------------------------
def run_predict(args: argparse.Namespace) -> int:
    from .models import load_model

    model = load_model(args.model)
    probs = model.predict(args.image, face=args.face)
    top = dict(list(probs.items())[: args.top])
    out: dict[str, object] = {"image": args.image, "model": model.name, "top": top}
    if model.name == "dlib-age":  # 81 one-year bins: the expected value is the age a person asks for
        import numpy as np

        from .models.dlib_age_gender import expected_age

        out["expected_age"] = round(float(expected_age(np.array([probs[c] for c in model.class_names or []]))), 1)
    _print_json(out)
    return 0


@command("predict", "print a classifier's top classes for the face in an image")
def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image")
    p.add_argument("--model", required=True)
    p.add_argument("--face", type=int, default=None)
    p.add_argument("--top", type=int, default=5)


# -- explain --------------------------------------------------------------------------------------
def run_explain(args: argparse.Namespace) -> int:
    from .explain.api import explain_methods
    from .explain.render import figure_grid
    from .outputs import save_png, write_json

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    target: object = args.target
    if isinstance(target, str) and target.lstrip("-").isdigit():
        target = int(target)
    exps = explain_methods(args.model, args.image, methods, target, reference=args.reference,
                           face=args.face, batch_size=args.batch_size, seed=args.seed)
    out = Path(args.out)
    records = []
    for e in exps:
        paths = e.save(out)
        records.append({**e.summary(), "files": {k: str(v) for k, v in paths.items()}})
    grid = out / "methods_grid.png"
    reference = None
    if args.reference is not None:  # shown beside the input: the grid explains a match with this photo
        from .image import load_image
        from .models import load_model

        model = load_model(args.model)
        reference = model.chip(args.reference).image if not args.on_photo else load_image(args.reference)
    save_png(grid, figure_grid(exps, on="photo" if args.on_photo else "chip",
                               title=f"{exps[0].model}: {exps[0].target}", reference=reference))
    match = _match_line(args, exps[0])
    write_json(out / "explanations.json", {"image": args.image, "reference": args.reference, "match": match,
                                           "explanations": records, "grid": str(grid)})
    if match:
        print(match)
    face = exps[0].chip.face
    if face is not None and face.fallback:
        print(f"face: {face.detection()}")
    rng = exps[0].target_range
    if rng is not None:
        imp = f", impostor median {rng.impostor:.3g}" if rng.impostor is not None else ""
        print(f"target: {exps[0].target} [{rng.unit}]: intact {rng.intact:.3g}, fully blurred {rng.deleted_blur:.3g}, "
              f"mean-filled {rng.deleted_mean:.3g}{imp}")
    unit = f" {rng.unit}" if rng is not None else ""
    for r in records:  # one line per method: what was explained, in which unit, and what it cost
        print(f"{r['method']:<22} {r['seconds'] * 1000:8.1f} ms  {r['target']}: {r['score']:.4g}{unit}")
    print(out / "explanations.json")
    return 0


def _match_line(args: argparse.Namespace, e: object) -> str | None:
    """For a recognizer explained against a reference: the model's own decision, so a map of a non-match is
    never read as the explanation of a match."""
    from .models import load_model

    model = load_model(args.model)
    if args.reference is None or model.task != "embedding":
        return None
    a = model.embed(e.photo, face=e.chip.face)  # type: ignore[attr-defined]
    b = model.embed(args.reference)
    d = model.distance(a, b)
    line = f"match: distance {d:.3f} to the reference"
    if model.match_threshold is not None:
        same = d < model.match_threshold
        verdict = "the same person" if same else "not the same person"
        line += f" {'<' if same else '≥'} {model.match_threshold:g}: {verdict} by {model.name}'s rule"
    if model.cohort is not None and model.cohort.impostor_quantiles:
        q = model.cohort.impostor_quantiles
        line += (f"; strangers score {q['q05']:.2f} to {q['q95']:.2f} on the cohort z-score (5–95 %), the same "
                 f"person about {model.cohort.genuine_quantiles.get('median', float('nan')):.1f}")
    return line


@command("explain", "saliency maps of one face with one or several methods")
def _explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="the photo (the largest face is explained unless --face says otherwise)")
    p.add_argument("--model", default="dlib-resnet",
                   help="a zoo model (see `facelens models`) or your own file with --preset")
    p.add_argument("--method", default="gradcam,occlusion",
                   help="comma-separated, any of: " + ", ".join(METHOD_NAMES))
    p.add_argument("--target", default=None,
                   help="classifiers: class name or index (default: the top class); recognizers: cohort (default: the "
                        "match in impostor SDs), projection, cosine or margin")
    p.add_argument("--reference", default=None, help="a second photo: explain the match (recognizers)")
    p.add_argument("--face", type=int, default=None, help="which face, largest first (0, 1, ...; default: the largest)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per forward pass of the perturbation methods: the one speed/memory knob")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling methods (RISE, LIME, SHAP, SmoothGrad)")
    p.add_argument("--on-photo", action="store_true", help="draw the grid on the photo instead of the chip")
    p.add_argument("--out", default="out/explain", help="folder for the maps (PNG, .npy) and explanations.json")


# -- evaluate -------------------------------------------------------------------------------------
def run_evaluate(args: argparse.Namespace) -> int:
    from .evaluate.runner import evaluate, write_evaluation

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    datasets = [d.strip() for d in args.datasets.split(",")] if args.datasets else None
    result = evaluate(args.manifest, args.model, methods, metrics, datasets=datasets, limit=args.limit,
                      baseline=args.baseline, steps=args.steps, pointing_region=args.pointing_region,
                      batch_size=args.batch_size, seed=args.seed, executor=args.executor, address=args.address,
                      sanity_photos=args.sanity_photos, cohort=args.cohort)
    paths = write_evaluation(result, Path(args.out))
    print(f"{result.rows_out}/{result.rows_in} photos evaluated, {len(result.skipped)} skipped, "
          f"{result.seconds:.1f} s")
    for bad in result.skipped[:10]:
        print(f"  skipped {bad['path']}: {bad['reason']}", file=sys.stderr)
    t = result.target
    if t:
        imp = (f"; impostor median {t['impostor_median']:.3g} ({t.get('impostor_source', '')})"
               if t.get("impostor_median") is not None else "")
        print(f"target: {t['description']} [{t['unit']}]: intact {t['intact']:.3g}, fully blurred "
              f"{t['deleted_blur']:.3g}, mean-filled {t['deleted_mean']:.3g} (means over {t['n']} photos){imp}")
    for line in result.verdicts:
        print(f"  {line}")
    print(paths["json"])
    return 0


@command("evaluate", "score saliency methods on a manifest of photos (deletion, insertion, masking, ...)")
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="CSV with a 'path' column (the ../shared/faces format)")
    p.add_argument("--model", default="dlib-resnet")
    p.add_argument("--methods", default="gradcam,occlusion")
    p.add_argument("--metrics", default="deletion,insertion,masked,agreement",
                   help="comma-separated: deletion, insertion, masked, pointing, agreement, sanity, inpainting "
                        "(the control maps random, edges and centre are always scored beside the methods)")
    p.add_argument("--sanity-photos", type=int, default=8,
                   help="photos the sanity check runs on (a verdict needs at least 8)")
    p.add_argument("--cohort", default="auto", choices=["auto", "manifest", "none"],
                   help="recognizers: the impostor statistics that give the match score its unit: auto (the "
                        "model's shipped cohort, else this manifest's photos), manifest, or none (raw projection)")
    p.add_argument("--datasets", default=None, help="only these manifest datasets (comma-separated)")
    p.add_argument("--limit", type=int, default=None, help="first N rows only")
    p.add_argument("--baseline", default="blur", choices=["blur", "mean", "zero"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--pointing-region", default="eyes")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="where the photos are explained: in this process, or on Ray (see --address)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (ray://host:10001, auto); default: start a local one")
    p.add_argument("--out", default="out/evaluate")


_CORE = frozenset(_COMMANDS)


_PRESET_HELP = ("with a model file (.onnx, .pt, .ts): the chip and normalization it was trained with: arcface, "
                "facenet, dlib or a preset .toml (see facelens.models.presets)")


def _add_preset_options(parser: argparse.ArgumentParser) -> None:
    """Give every (sub-)command that takes ``--model`` a ``--preset``, so each command need not declare it.

    The ``--model`` option's dest is remembered (``_model_dest``): ``report`` collects ``--model`` into
    ``models``.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                _add_preset_options(child)
    model = next((a for a in parser._actions if "--model" in a.option_strings), None)
    if model is not None and not any("--preset" in a.option_strings for a in parser._actions):
        parser.add_argument("--preset", default=None, help=_PRESET_HELP)
        parser.set_defaults(_model_dest=model.dest)


def build_parser() -> argparse.ArgumentParser:
    if not _COMMANDS.keys() - _CORE:
        _load_command_modules()
    parser = argparse.ArgumentParser(prog="facelens", description="Explain face CNNs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, add_args, help_text) in _COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    _add_preset_options(parser)
    return parser


def _preload_user_models(args: argparse.Namespace) -> None:
    """Load model files named by ``--model`` with ``--preset`` once, before the handler runs.

    The registry remembers the preset per file, so the handler's own ``load_model(args.model)`` calls
    (and those deep in studies and the report) get this model from the cache.
    """
    dest = getattr(args, "_model_dest", None)
    if dest is None:
        return
    value = getattr(args, dest, None)
    names = value if isinstance(value, list) else [value]
    preset = getattr(args, "preset", None)
    from .models.registry import is_model_file

    files = [n for n in names if n is not None and is_model_file(n)]
    if preset is not None and not files:
        from .errors import ModelError

        raise ModelError("--preset applies to model files (--model my.onnx); zoo models bring their own")
    if files:
        from .models import load_model

        for name in files:
            load_model(name, preset=preset)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = _COMMANDS[args.command][0]
    try:
        _preload_user_models(args)
        return handler(args)
    except FaceLensError as exc:
        print(f"facelens: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("facelens: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `facelens models | head`: the reader left; nothing went wrong here
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # ``python -m facelens.cli``: use the package module, where commands register
    from facelens.cli import main as package_main

    sys.exit(package_main())
