"""The report's sections: each calls one part of the library and files its numbers and HTML.

Each function fills a :class:`~facelens.report.builder.SectionResult` in place. Budgets are the small
defaults that keep ``facelens report`` (no arguments) within 90 s on a 2-core CPU; a manifest makes the
studies use real identities instead of the portraits' altered copies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..evaluate.verdict import MIN_N
from ..models.base import FaceModel
from . import html as H
from .inputs import InputPhoto

if TYPE_CHECKING:
    from .builder import ReportSettings, SectionResult

__all__ = ["anonymization", "bias", "filters", "looks", "one_shot", "shipping"]

PRIVACY_NOTES = (
    "Face embeddings are biometric data under GDPR Art. 9: processing them to identify a person needs an "
    "explicit legal basis (usually explicit consent), a stated purpose and a retention period.",
    "facelens' gallery (`facelens gallery`) stores embeddings encrypted at rest (key outside the database), "
    "records consent per enrollment, purges expired rows, forgets a subject without leaving recoverable "
    "copies in the database file, exports everything held on a person (Art. 15), and keeps an append-only "
    "audit log.",
    "An embedding is not anonymous: the anonymization section shows how often masked photos are still "
    "re-identified. Treat masked photos of faces as personal data unless that rate is near chance.",
    "Keep explanation outputs with the photo they explain: saliency overlays show the face.",
)


ILLUSTRATION_NOTICE = ('<p class="note">Illustration, not a measurement: no manifest was given, so this study runs '
                       "on the input photos and altered copies of them (each photo its own identity). The numbers "
                       "below show that the pipeline runs; they support no verdict.</p>")


def _recognizer(models: list[FaceModel]) -> FaceModel | None:
    return next((m for m in models if m.task == "embedding"), None)


def supported(lines: list[str]) -> list[str]:
    """The verdict sentences the rule marked "supported" (:meth:`facelens.evaluate.verdict.Verdict.sentence`)."""
    return [line for line in lines if ": supported — " in line]


def looks(sec: SectionResult, models: list[FaceModel], photos: list[InputPhoto], reference: InputPhoto | None,
          s: ReportSettings) -> None:
    from .looks import DEFAULT_METHODS, where_it_looks

    methods = s.methods or list(DEFAULT_METHODS)
    usable = sum(p.image is not None for p in photos)
    parts = [] if usable >= MIN_N else [
        f'<p class="note">Illustration for the faithfulness and sanity numbers: {usable} photo(s), and a verdict needs '
        f"at least {MIN_N}. The maps show what each method computes on these photos; whether a method can be "
        f"trusted is decided by <code>facelens evaluate --metrics deletion,insertion,sanity</code> on a manifest, "
        f"or by this report with <code>--manifest</code> and more photos.</p>"]
    for m in models:
        res = where_it_looks(m, photos, methods=methods, reference=reference, sanity=s.sanity, seed=s.seed)
        sec.data[m.name] = res.data
        sec.findings.extend(res.data.get("findings", []))
        parts.append(res.html)
        for err in res.errors:
            sec.notes.append(f"{m.name}: {err['photo']} left out: {err['reason']}")
    sec.data["methods"] = methods
    sec.html = "\n".join(parts)


def filters(sec: SectionResult, models: list[FaceModel], s: ReportSettings) -> None:
    from ..internals import filters_report

    rows = _manifest_rows(s)
    parts = []
    for m in models:
        # the report's budget: 6 units per depth, 16 steps; real faces for the statistics when a manifest is given
        res = filters_report(m, channels=6, steps=16, manifest=rows, faces=24, view_channels=2, k=5, seed=s.seed)
        sec.data[m.name] = res.as_json()
        parts.append(res.html(level=3))
    sec.html = "\n".join(parts)


def _manifest_rows(s: ReportSettings) -> list[Any] | None:
    """The manifest's rows, a seeded sample of ``manifest_limit`` that keeps whole identities together."""
    if not s.manifest:
        return None
    import random

    from ..datasets import read_manifest

    rows = read_manifest(s.manifest)
    if len(rows) <= s.manifest_limit:
        return rows
    by_identity: dict[str, list[Any]] = {}
    for r in rows:
        by_identity.setdefault(r.identity or str(r.path), []).append(r)
    keys = sorted(by_identity)
    random.Random(s.seed).shuffle(keys)
    picked: list[Any] = []
    for k in keys:
        if len(picked) >= s.manifest_limit:
            break
        picked.extend(by_identity[k])
    return picked


def _as_portraits(photos: list[InputPhoto]) -> list[Any]:
    from ..portraits import Portrait

    return [Portrait(p.name, p.image, p.credit) for p in photos if p.image is not None]


def anonymization(sec: SectionResult, models: list[FaceModel], photos: list[InputPhoto], s: ReportSettings) -> None:
    from ..studies.anonymization import anonymization_audit

    rows = _manifest_rows(s)
    parts = [] if rows is not None else [ILLUSTRATION_NOTICE]
    for m in models:
        res = anonymization_audit(rows if rows is not None else _as_portraits(photos), m, seed=s.seed)
        sec.data[m.name] = res.as_json()
        sec.findings.extend(f"{m.name}: {v}" for v in supported(res.verdicts))
        parts.append(res.html(level=3))
    sec.html = "\n".join(parts)


def one_shot(sec: SectionResult, models: list[FaceModel], photos: list[InputPhoto], s: ReportSettings) -> None:
    from ..studies.recognition import one_shot_audit

    rec = _recognizer(models)
    if rec is None:
        sec.notes.append("No recognizer among the models: one-shot recognition needs an embedding model.")
        sec.data["skipped"] = "no recognizer"
        return
    rows = _manifest_rows(s)
    res = one_shot_audit(rows if rows is not None else _as_portraits(photos), rec, seed=s.seed)
    sec.data[rec.name] = res.as_json()
    sec.findings.extend(f"{rec.name}: {v}" for v in supported(res.verdicts))
    sec.html = ("" if rows is not None else ILLUSTRATION_NOTICE) + res.html(level=3)


def bias(sec: SectionResult, models: list[FaceModel], s: ReportSettings) -> None:
    rows = _manifest_rows(s)
    if rows is None or not any(r.sex or r.age is not None or r.race for r in rows):
        sec.notes.append("No manifest with sex, age or race labels was given (--manifest), so there is nothing to "
                         "compare between groups. Run `facelens report --manifest ../shared/faces/manifest.csv`.")
        sec.data["skipped"] = "no labelled manifest"
        return
    import argparse

    from ..commands.audit import _add_args
    from ..studies.base import STUDIES

    parser = argparse.ArgumentParser(prog="facelens audit")
    _add_args(parser)  # the study's own CLI defaults, so the report and `facelens audit bias` agree
    rec = _recognizer(models)
    argv = ["bias", "--manifest", str(s.manifest), "--seed", str(s.seed)]
    if rec is not None:
        argv += ["--model", rec.name]
    args = parser.parse_args(argv)
    args.datasets = None
    args.rows = rows
    res = STUDIES["bias"].run(args)
    sec.data = res.as_json()
    sec.findings.extend(supported(res.verdicts))
    sec.html = res.html(level=3)


def shipping(sec: SectionResult, models: list[FaceModel], s: ReportSettings) -> None:
    from pathlib import Path

    from ..export import shipping_table

    folder = Path(s.manifest).parent if s.manifest else None
    faces = folder if folder is not None and (folder / "manifest.csv").is_file() else None
    parts = [] if faces is not None else [
        '<p class="note">The agreement columns below are measured on the input portraits and altered copies of them '
        "(no face folder with manifest.csv and pairs_verification.csv was given): a smoke test of each export, not "
        "of its accuracy (run <code>facelens export --table --faces DIR</code> for that). Timings do not depend on "
        "which faces are used.</p>"]
    for m in models:
        res = shipping_table(m, faces, seed=s.seed)
        sec.data[m.name] = res.as_json()
        sec.findings.extend(f"{m.name}: {v}" for v in supported(res.verdicts()))
        parts.append(res.html(level=3))
    parts.append(H.section("Privacy notes for biometric data", "<ul>" + "".join(
        f"<li>{H.escape(n)}</li>" for n in PRIVACY_NOTES) + "</ul>", level=3))
    sec.data["privacy_notes"] = list(PRIVACY_NOTES)
    sec.html = "\n".join(parts)
