"""The gallery on real dlib-resnet embeddings: consent, encryption at rest, keys, erasure, access, audit, retention."""

from __future__ import annotations

import os
import sqlite3
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from facelens.errors import FaceLensError
from facelens.gallery import (
    KEY_ENV,
    KEY_FILE_ENV,
    Consent,
    ConsentError,
    Gallery,
    GalleryError,
    GalleryKeyError,
    generate_key,
)
from facelens.gallery.consent import utc_now


def _consent(subject: str, purpose: str = "lab door access") -> Consent:
    return Consent.now(subject, purpose, "explicit-consent")


def _raw_bytes(db: Path) -> bytes:
    """Every byte SQLite keeps for this database: the file, its WAL and its rollback journal."""
    return b"".join(Path(f"{db}{suffix}").read_bytes() for suffix in ("", "-wal", "-journal")
                    if Path(f"{db}{suffix}").exists())


@pytest.fixture()
def gallery(tmp_path: Path, key: str, real_faces: dict) -> Gallery:
    g = Gallery.create(tmp_path / "g.db", key=key)
    for person, vec in zip(real_faces["people"], real_faces["neutral"][:3], strict=False):
        g.enroll(_consent(f"person {person}"), vec, source=f"{person}_neutral.jpg")
    yield g
    g.close()


def test_identifies_real_faces_like_an_independent_nearest_neighbour(gallery: Gallery, real_faces: dict) -> None:
    enrolled = real_faces["neutral"][:3].astype(np.float64)
    queries = real_faces["smiling"]  # three enrolled people smiling, and a fourth never enrolled
    result = gallery.identify(queries)
    for q, r in zip(queries, result, strict=True):
        d = np.linalg.norm(enrolled - q, axis=1)
        assert r.nearest == f"person {real_faces['people'][int(d.argmin())]}"
        assert r.distance == pytest.approx(d.min(), abs=1e-5)
        assert r.accepted == (d.min() < 0.6)
        assert r.subject == (r.nearest if r.accepted else None)
    # the same people, smiling, are recognised (dlib's rule holds on these photos)
    assert [r.subject for r in result[:3]] == [f"person {p}" for p in real_faces["people"][:3]]


def test_enrollment_requires_a_complete_consent_record(gallery: Gallery, real_faces: dict) -> None:
    vec = real_faces["neutral"][3]
    with pytest.raises(GalleryError, match="Consent record"):
        gallery.enroll({"subject": "x"}, vec)  # type: ignore[arg-type]
    with pytest.raises(ConsentError, match="legal basis"):
        Consent.now("x", "door", "because")
    with pytest.raises(ConsentError, match="purpose is empty"):
        Consent.now("x", " ", "explicit-consent")
    with pytest.raises(ConsentError, match="future"):
        Consent("x", "door", "explicit-consent", utc_now() + timedelta(days=1))
    with pytest.raises(GalleryError, match="128-d"):
        gallery.enroll(_consent("x"), vec[:64])
    assert len(gallery) == 3


def test_nothing_personal_is_stored_in_the_clear(gallery: Gallery, real_faces: dict) -> None:
    gallery.close()
    raw = _raw_bytes(gallery.path)
    for person, vec in zip(real_faces["people"][:3], real_faces["neutral"], strict=False):
        assert f"person {person}".encode() not in raw
        assert f"{person}_neutral.jpg".encode() not in raw
        assert vec.astype("<f4").tobytes()[:32] not in raw
    assert b"lab door access" not in raw


def test_wrong_or_missing_key_is_a_clear_error(gallery: Gallery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               real_faces: dict) -> None:
    gallery.close()
    with pytest.raises(GalleryKeyError, match="wrong gallery key"):
        Gallery.open(gallery.path, key=generate_key())
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    with pytest.raises(GalleryKeyError, match="no gallery key"):
        Gallery.open(gallery.path)
    with pytest.raises(GalleryKeyError, match="base64"):
        Gallery.open(gallery.path, key="not a key")
    loose = tmp_path / "loose.key"
    loose.write_text(generate_key())
    os.chmod(loose, 0o644)
    with pytest.raises(GalleryKeyError, match="readable by other users"):
        Gallery.open(gallery.path, key_file=loose)
    with pytest.raises(GalleryError, match="no gallery file"):
        Gallery.open(tmp_path / "missing.db", key=generate_key())


def test_key_comes_from_env_or_key_file(tmp_path: Path, key: str, key_file: Path, monkeypatch: pytest.MonkeyPatch,
                                       real_faces: dict) -> None:
    monkeypatch.setenv(KEY_ENV, key)
    with Gallery.create(tmp_path / "env.db") as g:
        g.enroll(_consent("a"), real_faces["neutral"][0])
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.setenv(KEY_FILE_ENV, str(key_file))  # the same key, from a file
    with Gallery.open(tmp_path / "env.db") as g:
        assert g.identify(real_faces["smiling"][0])[0].subject == "a"
    assert key.encode() not in _raw_bytes(tmp_path / "env.db")


def test_moved_ciphertext_fails_instead_of_matching_someone_else(gallery: Gallery, real_faces: dict) -> None:
    """Swapping two people's sealed embeddings in the file must not make one identify as the other."""
    raw = sqlite3.connect(gallery.path)
    (a, ea), (b, eb) = raw.execute("SELECT id, embedding_enc FROM templates ORDER BY id LIMIT 2").fetchall()
    with raw:
        raw.execute("UPDATE templates SET embedding_enc = ? WHERE id = ?", (eb, a))
        raw.execute("UPDATE templates SET embedding_enc = ? WHERE id = ?", (ea, b))
    raw.close()
    with pytest.raises(GalleryKeyError, match="cannot decrypt an embedding"):
        gallery.identify(real_faces["smiling"][0])


def test_forget_leaves_no_copy_of_the_ciphertext_in_the_files(gallery: Gallery, real_faces: dict) -> None:
    raw = sqlite3.connect(gallery.path)
    secrets_of_001 = [bytes(v) for row in raw.execute(
        "SELECT t.embedding_enc, t.subject_enc, t.source_enc, c.subject_enc, c.purpose_enc FROM templates t "
        "JOIN consents c ON c.id = t.consent_id WHERE t.id = 1") for v in row]
    raw.close()
    assert len(secrets_of_001) == 5
    assert all(s in _raw_bytes(gallery.path) for s in secrets_of_001)  # the search can find them
    result = gallery.forget("person 001")
    assert (result.templates, result.consents, result.scrubbed) == (1, 1, True)
    leftover = _raw_bytes(gallery.path)
    assert not [s for s in secrets_of_001 if s in leftover]
    assert gallery.integrity_check() == "ok"
    assert [s["subject"] for s in gallery.subjects()] == ["person 002", "person 003"]
    assert gallery.identify(real_faces["smiling"][0])[0].nearest != "person 001"
    assert gallery.export("person 001")["templates"] == []


def test_a_plain_delete_would_leave_the_ciphertext_in_the_wal(tmp_path: Path, key: str, real_faces: dict) -> None:
    """Why forget scrubs: deleting the row alone leaves its old page in the write-ahead log."""
    with Gallery.create(tmp_path / "plain.db", key=key) as g:
        g.enroll(_consent("x"), real_faces["neutral"][0])
        raw = sqlite3.connect(g.path)
        blob = bytes(raw.execute("SELECT embedding_enc FROM templates").fetchone()[0])
        with raw:
            raw.execute("PRAGMA secure_delete=ON")
            raw.execute("DELETE FROM templates")
        assert blob in _raw_bytes(g.path)
        raw.close()
        assert g.scrub()
        assert blob not in _raw_bytes(g.path)


def test_export_returns_everything_held_and_is_logged(gallery: Gallery, real_faces: dict) -> None:
    data = gallery.export("person 002")
    assert data["subject"] == "person 002"
    [consent] = data["consents"]
    assert (consent["purpose"], consent["legal_basis"]) == ("lab door access", "explicit-consent")
    assert "Art. 9(2)(a)" in consent["legal_basis_text"]
    [template] = data["templates"]
    assert template["source"] == "002_neutral.jpg"
    np.testing.assert_array_equal(np.float32(template["embedding"]), real_faces["neutral"][1].astype(np.float32))
    assert [e["action"] for e in data["audit"]] == ["enroll", "export"]


def test_audit_log_is_append_only_and_chained(gallery: Gallery, real_faces: dict) -> None:
    gallery.identify(real_faces["smiling"][:2])
    gallery.forget("person 003")
    actions = [e.action for e in gallery.audit_log()]
    assert actions == ["create", "enroll", "enroll", "enroll", "identify", "identify", "forget"]
    assert gallery.verify_audit() == (True, None)
    raw = sqlite3.connect(gallery.path)
    for statement in ("UPDATE audit SET action = 'nothing' WHERE seq = 2", "DELETE FROM audit WHERE seq = 2"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"), raw:
            raw.execute(statement)
    with raw:  # someone with file access drops the trigger and rewrites an entry: the chain notices
        raw.execute("DROP TRIGGER audit_no_update")
        raw.execute("UPDATE audit SET detail = '{}' WHERE seq = 3")
    raw.close()
    assert gallery.verify_audit() == (False, 3)


def test_retention_hides_then_purge_removes_expired_templates(tmp_path: Path, key: str, real_faces: dict) -> None:
    with Gallery.create(tmp_path / "r.db", key=key, retention_days=30) as g:
        old = utc_now() - timedelta(days=31)
        g.enroll(Consent("old", "door", "explicit-consent", old), real_faces["neutral"][0], now=old)
        g.enroll(_consent("new"), real_faces["neutral"][1])
        assert g.identify(real_faces["smiling"][0])[0].nearest == "new"  # the expired one is not used
        assert [s["expired"] for s in g.subjects()] == [True, False]
        result = g.purge()
        assert (result["templates"], result["consents"], result["scrubbed"]) == (1, 1, True)
        assert [s["subject"] for s in g.subjects()] == ["new"]
        assert g.export("old")["consents"] == []
        with pytest.raises(GalleryError, match="retention period must be positive"):
            Gallery.create(tmp_path / "bad.db", key=key, retention_days=0)


def test_create_refuses_to_overwrite(gallery: Gallery, key: str) -> None:
    with pytest.raises(FaceLensError, match="already exists"):
        Gallery.create(gallery.path, key=key)
