"""``facelens report``: the main job (see :mod:`facelens.report.builder`)."""

from __future__ import annotations

import argparse

from ..cli import register_command


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", help="photos to investigate (default: two embedded public-domain portraits)")
    p.add_argument("--model", action="append", dest="models", default=None,
                   help="a zoo model (repeatable; default: dlib-resnet, dlib-age, dlib-gender, fer-emotion)")
    p.add_argument("--manifest", default=None, help="CSV of labelled photos for the studies (e.g. ../shared/faces)")
    p.add_argument("--reference", default=None, help="a photo to explain recognizers' matches against")
    p.add_argument("--methods", default=None,
                   help="comma-separated saliency methods (default: gradcam, integrated-gradients, lrp, occlusion)")
    p.add_argument("--manifest-limit", type=int, default=None, help="photos of the manifest to use (default 200)")
    p.add_argument("--no-sanity", action="store_true", help="skip the randomization sanity checks")
    p.add_argument("--no-filters", action="store_true", help="skip the filter visualizations")
    p.add_argument("--no-studies", action="store_true", help="skip anonymization, one-shot and bias")
    p.add_argument("--no-shipping", action="store_true", help="skip export sizes and latency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/report")


def _run(args: argparse.Namespace) -> int:
    from ..report.builder import build_report, report_settings, write_report

    settings = report_settings(
        args.images, models=args.models, manifest=args.manifest, reference=args.reference,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None,
        manifest_limit=args.manifest_limit, sanity=not args.no_sanity, filters=not args.no_filters,
        studies=not args.no_studies, shipping=not args.no_shipping, seed=args.seed)
    report = build_report(settings)
    paths = write_report(report, args.out)
    failed = [s.title for s in report.sections if s.error]
    print(f"report built in {report.seconds:.1f} s"
          + (f"; not built: {', '.join(failed)}" if failed else ""))
    print(paths["html"].resolve())
    return 0


register_command("report", "write a self-contained HTML report (index.html) and report.json about face models",
                 _add_args, _run)
