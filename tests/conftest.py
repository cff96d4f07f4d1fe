"""Shared fixtures. Real photos come from ``../shared/faces`` and are never copied into the repo."""

from __future__ import annotations

import os

# Busy-waiting OpenMP threads make torch 10-100× slower when other processes share the 2 cores;
# this must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import csv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_FACES = REPO.parent / "shared" / "faces"


@pytest.fixture(scope="session")
def shared_faces() -> Path:
    """The shared face bundle; tests that need real photos skip, with a reason, only when it is absent."""
    if not (SHARED_FACES / "manifest.csv").is_file():
        pytest.skip(f"real face photos not available: {SHARED_FACES} is absent")
    return SHARED_FACES


@pytest.fixture(scope="session")
def manifest_rows(shared_faces: Path) -> list[dict[str, str]]:
    with open(shared_faces / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))
