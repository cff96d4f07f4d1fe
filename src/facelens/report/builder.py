"""``facelens report``: one self-contained HTML investigation of face models, and every number as JSON.

The builder runs the library's parts in a fixed order of sections and only arranges what they return.
A section that cannot be built (a photo without a face, a study with too few identities) becomes a
visible note in the report and a line on stderr; the other sections are still produced. The whole
report folder is built aside and moved into place in one step, so Ctrl-C never leaves half a report.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FaceLensError
from ..outputs import atomic_dir, atomic_write_text, to_jsonable, write_json
from . import html as H
from .glossary import glossary_for
from .inputs import InputPhoto, load_inputs

__all__ = ["DEFAULT_MODELS", "Report", "ReportSettings", "SectionResult", "build_report", "write_report"]

DEFAULT_MODELS: tuple[str, ...] = ("dlib-resnet", "dlib-age", "dlib-gender", "fer-emotion")


@dataclass
class ReportSettings:
    """Everything that shapes a report; written into ``report.json`` so a run can be repeated."""

    images: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    manifest: str | None = None
    reference: str | None = None
    methods: list[str] = field(default_factory=list)
    sanity: bool = True
    filters: bool = True
    studies: bool = True
    shipping: bool = True
    manifest_limit: int = 200
    seed: int = 0


@dataclass
class SectionResult:
    """One section: its HTML, its numbers, and what went wrong (if anything)."""

    key: str
    title: str
    html: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    #: supported verdicts only, one sentence each (with n and interval), for the report's Key findings
    findings: list[str] = field(default_factory=list)


@dataclass
class Report:
    settings: ReportSettings
    inputs: list[InputPhoto]
    sections: list[SectionResult]
    seconds: float
    environment: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        return {
            "facelens_report": 1,
            "settings": self.settings.__dict__,
            "environment": self.environment,
            "inputs": [p.as_dict() for p in self.inputs],
            "bad_inputs": [p.as_dict() for p in self.inputs if not p.ok],
            "key_findings": [{"section": s.key, "finding": f} for s in self.sections for f in s.findings],
            "sections": {s.key: {"title": s.title, "seconds": round(s.seconds, 3), "error": s.error,
                                 "notes": s.notes, "findings": s.findings, "data": s.data} for s in self.sections},
            "seconds": round(self.seconds, 3),
        }

    def html(self) -> str:
        toc = "".join(f'<li><a href="#{H.escape(s.key)}">{H.escape(s.title)}</a>'
                      f'{" — not built" if s.error else ""}</li>' for s in self.sections)
        intro = [
            "<p>This report was generated offline by facelens. It shows where face models look when they decide, "
            "whether those explanations can be trusted, and what follows for privacy and fairness. Every number "
            "says how it was measured; every figure has a caption.</p>",
            _key_findings_html(self.sections, self.settings),
            f'<nav><ol>{toc}<li><a href="#glossary">Glossary</a></li></ol></nav>',
            _inputs_html(self.inputs),
        ]
        body = list(intro)
        for s in self.sections:
            parts = [s.html] if s.html else []
            parts += [f'<p class="note">{H.escape(n)}</p>' for n in s.notes]
            if s.error:
                parts.append(f'<p class="bad">This section could not be built: {H.escape(s.error)}</p>')
            parts.append(f'<p class="how">Section time: {s.seconds:.1f} s.</p>')
            body.append(H.section(s.title, parts, anchor=s.key))
        terms = glossary_for(" ".join(body))
        if terms:
            items = "".join(f"<dt>{H.escape(t)}</dt><dd>{H.escape(m)}</dd>" for t, m in terms.items())
            body.append(H.section("Glossary", [f"<dl>{items}</dl>"], anchor="glossary"))
        env = ", ".join(f"{k} {v}" for k, v in self.environment.items())
        body.append(f'<footer class="how">Built in {self.seconds:.1f} s on {H.escape(env)}.</footer>')
        return H.page("facelens report", body)


KEY_FINDINGS_PER_SECTION = 4


def _key_findings_html(sections: list[SectionResult], settings: ReportSettings) -> str:
    """Only what the data support (the verdict rule said "supported"), each linked to its section; at most
    a few per section, so that no one section's list buries the others."""
    items = []
    for s in sections:
        link = f'<a href="#{H.escape(s.key)}">({H.escape(s.title)})</a>'
        items += [f"<li>{H.escape(f)} {link}</li>" for f in s.findings[:KEY_FINDINGS_PER_SECTION]]
        if len(s.findings) > KEY_FINDINGS_PER_SECTION:
            items.append(f"<li>… and {len(s.findings) - KEY_FINDINGS_PER_SECTION} more supported findings in "
                         f"{link}</li>")
    parts = []
    if not settings.manifest:
        parts.append('<p class="note">No manifest was given: the maps, the anonymization and the one-shot study run '
                     "on the input photos and altered copies of them. They illustrate the methods, are not "
                     "measurements of the models, and give no verdict; the findings below can only be about what "
                     "does not depend on the photos (the timing of the exports). For findings about the models, run "
                     "with <code>--manifest</code> (a CSV of photos with identities and labels).</p>")
    if items:
        parts.append(f"<ul>{''.join(items)}</ul>")
        quiet = [f'<a href="#{H.escape(s.key)}">{H.escape(s.title)}</a>' for s in sections
                 if not s.findings and not s.error and not s.data.get("skipped")]
        if quiet:
            parts.append(f"<p>No supported finding in: {', '.join(quiet)}. Their numbers are shown with their "
                         "intervals, but rest on too few photos or people, or their intervals contain the "
                         "threshold.</p>")
    else:
        parts.append("<p>No finding is supported by this run's data. Most verdicts below are inconclusive: they rest "
                     "on fewer photos than the 8 a verdict needs, or their intervals contain the threshold. That is "
                     "an answer too: these numbers cannot carry a conclusion.</p>")
    parts.append('<p class="how">A finding is listed only when its whole interval (95%, or wider where adjusted for '
                 "several comparisons) lies on the claimed side of the stated threshold, on at least 8 independent "
                 "units: photos, people, or timing rounds.</p>")
    return H.section("Key findings", parts, anchor="key-findings", level=2)


def _inputs_html(inputs: list[InputPhoto]) -> str:
    rows = [{"photo": p.name, "source": p.source, "size": "×".join(map(str, p.as_dict().get("size", []))) or "—",
             "status": "used" if p.ok else f"skipped: {p.error}", "credit": p.credit or "—"} for p in inputs]
    bad = [p for p in inputs if not p.ok]
    warn = (f'<p class="bad">{len(bad)} input photo(s) could not be used and are left out of every section: '
            + "; ".join(H.escape(f"{p.source}: {p.error}") for p in bad) + "</p>") if bad else ""
    return H.section("Input photos", [H.table(rows, caption="The photos this report is about."), warn],
                     anchor="inputs", level=2)


Progress = Callable[[str], None]


def _run(key: str, title: str, fn: Callable[[SectionResult], None], on_error: Callable[[str], None]) -> SectionResult:
    """Build one section; a failure is recorded in it (and reported), never fatal to the report."""
    sec = SectionResult(key, title)
    t0 = time.perf_counter()
    try:
        fn(sec)
    except FaceLensError as exc:
        sec.error = str(exc)
    except Exception as exc:  # a bug in one section must not cost the user the rest of the report
        sec.error = f"{type(exc).__name__}: {exc}"
        sec.data["traceback"] = traceback.format_exc(limit=8)
    sec.seconds = time.perf_counter() - t0
    if sec.error:
        on_error(f"facelens report: section '{title}' not built: {sec.error}")
    return sec


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def build_report(settings: ReportSettings | None = None, *, progress: bool | None = None,
                 on_error: Callable[[str], None] = _stderr) -> Report:
    """Run every section for the settings' photos, models and manifest (see :class:`ReportSettings`)."""
    from tqdm import tqdm

    from ..models import load_model

    s = settings or ReportSettings()
    t0 = time.perf_counter()
    inputs = load_inputs(s.images)
    for p in inputs:
        if not p.ok:
            on_error(f"facelens report: skipping {p.source}: {p.error}")
    usable = [p for p in inputs if p.ok]
    reference = None
    if s.reference:
        (reference,) = load_inputs([s.reference])
        if not reference.ok:
            raise FaceLensError(f"reference photo {s.reference}: {reference.error}")
    models = [load_model(name) for name in s.models]
    disable = (not sys.stderr.isatty()) if progress is None else not progress

    sections: list[SectionResult] = []
    stages = _stages(s, models, usable, reference)
    bar = tqdm(stages, desc="report", unit="section", disable=disable, file=sys.stderr)
    for key, title, fn in bar:
        bar.set_description(f"report: {title}")  # the stage that is running now
        sections.append(_run(key, title, fn, on_error))
    env = {"facelens": _version(), "python": platform.python_version(), "torch": _torch_version(),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU"}
    return Report(s, inputs, sections, time.perf_counter() - t0, env)


def _stages(s: ReportSettings, models: list[Any], photos: list[InputPhoto],
            reference: InputPhoto | None) -> list[tuple[str, str, Callable[[SectionResult], None]]]:
    from . import sections as S

    stages: list[tuple[str, str, Callable[[SectionResult], None]]] = [
        ("looks", "Where the network looks", lambda sec: S.looks(sec, models, photos, reference, s)),
    ]
    if s.filters:
        stages.append(("filters", "What the filters detect", lambda sec: S.filters(sec, models, s)))
    if s.studies:
        stages.append(("anonymization", "Anonymization: is masking the eyes enough?",
                       lambda sec: S.anonymization(sec, models, photos, s)))
        stages.append(("one_shot", "One-shot recognition", lambda sec: S.one_shot(sec, models, photos, s)))
        stages.append(("bias", "Bias summary", lambda sec: S.bias(sec, models, s)))
    if s.shipping:
        stages.append(("shipping", "Shipping: size, speed and privacy", lambda sec: S.shipping(sec, models, s)))
    return stages


def write_report(report: Report, out: str | os.PathLike) -> dict[str, Path]:
    """Write ``index.html`` and ``report.json`` into ``out``, all at once (see the module docstring).

    An existing ``out`` folder is replaced only if it is empty or an earlier report (it holds a
    ``report.json``), so a mistyped ``--out`` never swaps away a folder of the user's.
    """
    target = Path(out)
    if target.exists():
        if not target.is_dir():
            raise FaceLensError(f"{target}: exists and is not a folder")
        if any(target.iterdir()) and not (target / "report.json").is_file():
            raise FaceLensError(f"{target}: folder is not empty and holds no earlier report; choose another --out")
    data = to_jsonable(report.as_json())  # fail before touching the disk if anything is not serialisable
    page = report.html()
    with atomic_dir(target) as building:
        write_json(building / "report.json", data)
        atomic_write_text(building / "index.html", page)
    return {"html": target / "index.html", "json": target / "report.json"}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("facelens")
    except PackageNotFoundError:
        return "unknown"


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def report_settings(images: Sequence[str] = (), **kwargs: Any) -> ReportSettings:
    """Settings from keyword arguments, ignoring those left at None (the CLI's unset options)."""
    return ReportSettings(images=list(images), **{k: v for k, v in kwargs.items() if v is not None})
