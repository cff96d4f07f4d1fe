"""Photos and detections shared by the face-pipeline tests (read from the shared bundle, never copied)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facelens.datasets import read_tem
from facelens.faces import Face, detect_faces

LONDON_SAMPLE = 20  # neutral London photos with .tem landmarks used by the region tests
LondonPhoto = tuple[str, np.ndarray, np.ndarray, Face]


def load_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="session")
def london_neutral(shared_faces: Path, manifest_rows: list[dict[str, str]]) -> list[LondonPhoto]:
    """(name, photo, 189-point .tem landmarks, detected face) for a spread of neutral London photos."""
    rows = [r for r in manifest_rows
            if r["dataset"] == "frl_london" and r["subset"] == "neutral" and r["landmarks"]]
    assert len(rows) >= LONDON_SAMPLE, "the bundle should hold enough neutral London photos"
    picked = rows[:: max(1, len(rows) // LONDON_SAMPLE)][:LONDON_SAMPLE]
    out = []
    for r in picked:
        image = load_rgb(shared_faces / r["path"])
        faces = detect_faces(image)
        assert len(faces) == 1, f"{r['path']}: expected one face, found {len(faces)}"
        out.append((r["path"], image, read_tem(shared_faces / r["landmarks"]), faces[0]))
    return out


@pytest.fixture(scope="session")
def hopper(shared_faces: Path) -> tuple[np.ndarray, Face]:
    image = load_rgb(shared_faces / "images/demo/grace_hopper.jpg")
    faces = detect_faces(image)
    assert len(faces) == 1
    return image, faces[0]
