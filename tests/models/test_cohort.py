"""Cohort statistics: the z-score's known answers, the file format, and the shipped file's provenance."""

from __future__ import annotations

import doctest
import hashlib
from pathlib import Path

import numpy as np
import pytest

from facelens.errors import ModelError
from facelens.models import cohort as C


def test_doctest() -> None:
    assert doctest.testmod(C).failed == 0


def _people(n_people: int = 60, photos: int = 2, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """A large shared component (every face alike) plus a personal one, plus photo noise."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=dim) * 4
    person = rng.normal(size=(n_people, dim))
    emb = np.concatenate([common + person[i] + 0.2 * rng.normal(size=(photos, dim)) for i in range(n_people)])
    return emb, [str(i) for i in range(n_people) for _ in range(photos)]


def test_impostors_score_near_zero_and_genuine_pairs_far_above() -> None:
    emb, ids = _people()
    c = C.cohort_from_embeddings("toy", emb, ids)
    assert abs(c.impostor_quantiles["median"]) < 0.3
    assert c.genuine_quantiles["median"] > 3.0
    assert c.impostor_quantiles["n_pairs"] == 120 * 118 and c.genuine_quantiles["n_pairs"] == 120
    # the raw cosine cannot tell them apart half as well: the shared component dominates it
    u = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert (u[0] @ u[2]) > 0.9  # two strangers


def test_save_and_read_keep_no_individual_embedding(tmp_path: Path) -> None:
    emb, ids = _people()
    c = C.cohort_from_embeddings("toy", emb, ids, provenance={"source": "synthetic"})
    path = C.save_cohort(c, tmp_path / "c.npz")
    with np.load(path, allow_pickle=False) as data:
        assert set(data.files) == {"mean", "cov", "meta"}  # statistics only
    back = C.read_cohort(path)
    assert np.allclose(back.z(emb[:3], emb[0]), c.z(emb[:3], emb[0]))
    assert back.describe() == "60 people (120 photos) of synthetic"
    (tmp_path / "bad.npz").write_bytes(b"not a cohort")
    with pytest.raises(ModelError, match="not a facelens cohort"):
        C.read_cohort(tmp_path / "bad.npz")
    with pytest.raises(ModelError, match="at least 3 identities"):
        C.cohort_from_embeddings("toy", emb[:4], ["a", "a", "b", "b"])


def test_shipped_cohort_holds_what_its_provenance_says(shared_faces: Path) -> None:
    c = C.load_cohort("dlib-resnet")
    assert c is not None and c.dim == 128 and c.cov.shape == (128, 128)
    assert c.provenance["license"] == "CC-BY-4.0" and set(c.provenance["datasets"]) == {"frl_london", "frl_canada"}
    photos = c.provenance["photos"]
    assert len(photos) == c.n_photos == 194 and c.n_identities == 113
    for p in photos[::25]:  # the listed photos are the bundle's, byte for byte
        assert hashlib.sha256((shared_faces / p["path"]).read_bytes()).hexdigest() == p["sha256"]
    assert c.impostor_quantiles["median"] == pytest.approx(0.0, abs=0.25)
    assert c.genuine_quantiles["median"] > 4.0
