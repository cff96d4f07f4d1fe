"""Real dlib-resnet embeddings of a few FRL London faces, computed once per session and shared with the
worker processes of the crash and concurrency tests through a .npy file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from facelens.gallery import generate_key

PEOPLE = ("001", "002", "003", "004")


@pytest.fixture(scope="session")
def real_faces(shared_faces: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """``neutral`` and ``smiling`` embeddings (one row per person of PEOPLE), and a .npy of all of them."""
    from facelens.models import load_model

    model = load_model("dlib-resnet")
    root = shared_faces / "images" / "frl_london"
    neutral = np.stack([model.embed(root / p / f"{p}_neutral.jpg") for p in PEOPLE])
    smiling = np.stack([model.embed(root / p / f"{p}_smiling.jpg") for p in PEOPLE])
    path = tmp_path_factory.mktemp("embeddings") / "real.npy"
    np.save(path, np.concatenate([neutral, smiling]))
    return {"people": list(PEOPLE), "neutral": neutral, "smiling": smiling, "npy": path,
            "images": {p: (root / p / f"{p}_neutral.jpg", root / p / f"{p}_smiling.jpg") for p in PEOPLE}}


@pytest.fixture()
def key() -> str:
    return generate_key()


@pytest.fixture()
def key_file(tmp_path: Path, key: str) -> Path:
    path = tmp_path / "gallery.key"
    path.write_text(key + "\n")
    os.chmod(path, 0o600)
    return path
