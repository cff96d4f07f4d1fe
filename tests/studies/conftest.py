"""Fixtures for the study tests: manifest rows of the shared face bundle, and small subsets of them.

Photos are read in place from ``../shared/faces`` (never copied); odd inputs are built in ``tmp_path``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from facelens.datasets import ManifestRow, read_manifest

PickRows = Callable[..., list[ManifestRow]]


@pytest.fixture(scope="session")
def shared_rows(shared_faces: Path) -> list[ManifestRow]:
    """Every row of the shared manifest, with absolute paths."""
    return read_manifest(shared_faces / "manifest.csv")


@pytest.fixture(scope="session")
def pick_rows(shared_rows: list[ManifestRow]) -> PickRows:
    """``pick_rows(dataset, n_identities, per_identity=None)``: the first identities (sorted) of a dataset and
    their first photos (sorted by path), so subsets are the same on every run."""

    def pick(dataset: str, n_identities: int, per_identity: int | None = None) -> list[ManifestRow]:
        rows = sorted((r for r in shared_rows if r.dataset == dataset and r.identity), key=lambda r: str(r.path))
        ids = sorted({r.identity for r in rows})[:n_identities]
        out: list[ManifestRow] = []
        for ident in ids:
            mine = [r for r in rows if r.identity == ident]
            out.extend(mine if per_identity is None else mine[:per_identity])
        return out

    return pick


def write_manifest(path: Path, rows: Sequence[ManifestRow]) -> Path:
    """A manifest CSV (absolute photo paths) in the shared bundle's columns."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "identity", "sex", "dataset", "subset"])
        for r in rows:
            w.writerow([str(r.path), r.identity or "", r.sex or "", r.dataset or "", r.subset or ""])
    return path
