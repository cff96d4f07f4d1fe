"""What every study returns and how it is written: JSON, CSV tables, PNG figures and an HTML section.

A :class:`StudyResult` holds numbers only (no models, no tensors), so the report and the web app can
arrange it without computing anything. ``summary`` holds the headline numbers, ``tables`` the rows
behind them (each written as a CSV), ``figures`` RGB arrays with a caption each, ``verdicts`` the plain
sentences an auditor reads, and ``counts`` the rows in and out (nothing is silently dropped).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..outputs import atomic_write_text, save_png, write_json

__all__ = ["STUDIES", "StudyResult", "StudySpec", "load_studies", "register_study"]


@dataclass
class StudyResult:
    """The outcome of one study run (see the module docstring)."""

    study: str
    model: str
    settings: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    figures: dict[str, np.ndarray] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    verdicts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def add_figure(self, name: str, rgb: np.ndarray, caption: str) -> None:
        """Add a figure; every figure needs a caption that a non-specialist can read."""
        if not caption:
            raise ValueError(f"figure {name!r} needs a caption")
        self.figures[name] = np.asarray(rgb)
        self.captions[name] = caption

    def as_json(self) -> dict[str, Any]:
        """Everything but the pixels (figures are listed by name and caption)."""
        return {"study": self.study, "model": self.model, "settings": self.settings, "summary": self.summary,
                "verdicts": self.verdicts, "notes": self.notes, "counts": self.counts,
                "failures": self.failures, "seconds": round(self.seconds, 3), "tables": self.tables,
                "figures": {k: self.captions.get(k, "") for k in self.figures}}

    def html(self, *, level: int = 2, how: str | None = None) -> str:
        """An HTML section (figures embedded) for the report; verdicts first, then figures, then tables."""
        from ..report import html as H

        parts: list[str] = []
        if self.verdicts:
            parts.append("<ul>" + "".join(f"<li>{H.escape(v)}</li>" for v in self.verdicts) + "</ul>")
        for name, rgb in self.figures.items():
            parts.append(H.figure(rgb, self.captions.get(name, name)))
        for name, rows in self.tables.items():
            parts.append(H.table(rows, caption=name.replace("_", " ")))
        for note in self.notes:
            parts.append(f'<p class="note">{H.escape(note)}</p>')
        if self.failures:
            items = "".join(f"<li>{H.escape(f['path'])}: {H.escape(f['reason'])}</li>" for f in self.failures[:50])
            more = f"<li>… and {len(self.failures) - 50} more</li>" if len(self.failures) > 50 else ""
            parts.append(f'<div class="bad">Photos skipped ({len(self.failures)}):<ul>{items}{more}</ul></div>')
        if self.counts:
            parts.append(f'<p class="how">Rows: {H.escape(", ".join(f"{k} {v}" for k, v in self.counts.items()))}.</p>')
        title = f"{self.study.replace('_', ' ').capitalize()} — {self.model}"
        return H.section(title, parts, anchor=f"study-{self.study}", level=level, how=how)

    def write(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``<study>.json``, one CSV per table, one PNG per figure and ``<study>.html`` into ``out``."""
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        for name, rows in self.tables.items():
            paths[f"csv:{name}"] = atomic_write_text(out_dir / f"{self.study}_{name}.csv", rows_to_csv(rows))
        for name, rgb in self.figures.items():
            paths[f"png:{name}"] = save_png(out_dir / f"{self.study}_{name}.png", rgb)
        paths["html"] = atomic_write_text(out_dir / f"{self.study}.html", self.html())
        data = self.as_json()
        data["files"] = {k: p.name for k, p in paths.items()}
        paths["json"] = write_json(out_dir / f"{self.study}.json", data)
        return paths


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


@dataclass(frozen=True)
class StudySpec:
    """A study as the CLI sees it: its own arguments, and a function from parsed arguments to a result.

    ``run(args)`` receives the common arguments of ``facelens audit`` (``manifest``, ``model``,
    ``datasets``, ``limit``, ``executor``, ``address``, ``batch_size``, ``seed``, ``out``) plus its own.
    """

    name: str
    help: str
    run: Callable[[argparse.Namespace], StudyResult]
    add_args: Callable[[argparse.ArgumentParser], None] | None = None
    default_model: str = "dlib-resnet"


STUDIES: dict[str, StudySpec] = {}


def register_study(spec: StudySpec) -> StudySpec:
    if spec.name in STUDIES and STUDIES[spec.name] is not spec:
        raise ValueError(f"study {spec.name!r} is registered twice")
    STUDIES[spec.name] = spec
    return spec


def load_studies() -> dict[str, StudySpec]:
    """Import every module of this package so that each registers its studies."""
    from .. import studies

    for info in pkgutil.iter_modules(studies.__path__):
        if info.name != "base":
            importlib.import_module(f"{studies.__name__}.{info.name}")
    return STUDIES
