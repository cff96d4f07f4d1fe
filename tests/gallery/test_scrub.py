"""``forget`` while another connection keeps a read transaction open: bounded wait, then a pending scrub
that a later open, write or ``finish_scrub`` completes, leaving no byte of the ciphertext in any file.

Every call that could hang runs in a thread or a subprocess with a time limit, so a regression fails
instead of hanging the suite; the limit is far above the documented bound and the bound itself is
asserted on the measured time.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from facelens.cli import main
from facelens.gallery import SCRUB_WAIT_S, Consent, Gallery
from facelens.gallery import store as gallery_store

WORKERS = Path(__file__).with_name("workers.py")
MARGIN_S = 1.5  # on top of SCRUB_WAIT_S: the VACUUM of a small file and the thread's start
HANG_S = 60.0  # a call still running after this is a hang (the old code could wait ~50 minutes)


def _raw_bytes(db: Path) -> bytes:
    """Every byte SQLite keeps for this database: the file, its WAL and its rollback journal."""
    return b"".join(Path(f"{db}{suffix}").read_bytes() for suffix in ("", "-wal", "-journal")
                    if Path(f"{db}{suffix}").exists())


def _sealed_values(db: Path, template_id: int) -> list[bytes]:
    """The sealed values of one template and its consent record, and each one's 16-byte GCM tag."""
    raw = sqlite3.connect(db)
    try:
        blobs = [bytes(v) for row in raw.execute(
            "SELECT t.embedding_enc, t.subject_enc, t.source_enc, c.subject_enc, c.purpose_enc FROM templates t "
            "JOIN consents c ON c.id = t.consent_id WHERE t.id = ?", (template_id,)) for v in row]
    finally:
        raw.close()
    assert len(blobs) == 5 and all(len(b) > 28 for b in blobs)
    return blobs + [b[-16:] for b in blobs]


def _leftovers(db: Path, secrets: list[bytes]) -> list[bytes]:
    raw = _raw_bytes(db)
    return [s for s in secrets if s in raw]


@contextmanager
def _reader(db: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection holding a read transaction (and so its snapshot) open."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN")
        assert conn.execute("SELECT COUNT(*) FROM templates").fetchone()[0] >= 1
        yield conn
    finally:
        conn.close()  # ends the transaction: also frees a call that hung on it


def _bounded(fn: Callable[[], Any], limit: float = HANG_S) -> Any:
    """``fn()`` in a thread; fails (instead of hanging) if it is still running after ``limit`` seconds."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        raise AssertionError(f"still running after {limit} s: it waits on the open reader")
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture()
def call() -> Iterator[Callable[..., Any]]:
    """Run gallery calls in one worker thread (sqlite3 keeps a connection to the thread that made it),
    failing a call still running after HANG_S instead of hanging the suite."""
    pool = ThreadPoolExecutor(1)

    def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return pool.submit(fn, *args, **kwargs).result(timeout=HANG_S)
        except TimeoutError:
            raise AssertionError(f"{fn} still running after {HANG_S} s: it waits on the open reader") from None

    yield run
    pool.shutdown(wait=False, cancel_futures=True)


@pytest.fixture()
def db(tmp_path: Path, key: str, real_faces: dict) -> Path:
    path = tmp_path / "g.db"
    with Gallery.create(path, key=key) as g:
        for person, vec in zip(real_faces["people"][:3], real_faces["neutral"], strict=False):
            g.enroll(Consent.now(f"person {person}", "lab door access", "explicit-consent"), vec,
                     source=f"{person}_neutral.jpg")
    return path


def test_forget_returns_in_bounded_time_with_a_reader_open_and_finish_scrub_completes(
        db: Path, key: str, call: Callable[..., Any]) -> None:
    secrets = _sealed_values(db, 1)
    assert _leftovers(db, secrets) == secrets  # the search finds them while they are there
    g = call(Gallery.open, db, key=key)
    try:
        with _reader(db) as reader:
            start = time.monotonic()
            result = call(g.forget, "person 001")
            elapsed = time.monotonic() - start
            assert (result.templates, result.consents, result.scrubbed) == (1, 1, False)
            assert elapsed < SCRUB_WAIT_S + MARGIN_S, f"forget took {elapsed:.2f} s with a reader open"
            assert elapsed >= SCRUB_WAIT_S * 0.9  # it did wait for the reader, up to the bound
            # the reader's snapshot still shows the row (SQLite must keep those pages for it) ...
            assert reader.execute("SELECT COUNT(*) FROM templates").fetchone()[0] == 3
            assert _leftovers(db, secrets) == secrets
            # ... but the deletion is committed: no new query sees it
            with Gallery.open(db, key=key) as other:
                assert [s["subject"] for s in other.subjects()] == ["person 002", "person 003"]
                assert other.export("person 001")["templates"] == []
            assert call(lambda: g.scrub_pending)
            start = time.monotonic()
            assert call(g.finish_scrub, wait_s=0.3) is False
            assert time.monotonic() - start < 0.3 + MARGIN_S
        # the reader has gone: the pending scrub completes
        assert call(g.finish_scrub) is True
        assert not call(lambda: g.scrub_pending)
        assert call(g.integrity_check) == "ok"
        assert call(g.verify_audit) == (True, None)
        entry = call(g.audit_log)[-1]
        assert entry.action == "scrub" and entry.subject_ref is None and "pending_since" in entry.detail
        assert _leftovers(db, secrets) == []
    finally:
        call(g.close)
    assert _leftovers(db, secrets) == []
    assert len(secrets) == 10  # five sealed values and their five tags


def test_a_pending_scrub_survives_a_restart_and_finishes_at_the_next_open(db: Path, key: str, key_file: Path) -> None:
    secrets = _sealed_values(db, 2)
    with _reader(db):
        proc = subprocess.run([sys.executable, str(WORKERS), "forget", db, key_file, "person 002"],
                              capture_output=True, text=True, timeout=HANG_S)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert (out["templates"], out["consents"], out["scrubbed"]) == (1, 1, False)
        assert out["elapsed"] < SCRUB_WAIT_S + MARGIN_S
        raw = sqlite3.connect(db)  # the process is gone; what it owes is recorded in the file
        pending = raw.execute("SELECT value FROM meta WHERE key = 'pending_scrub'").fetchone()
        raw.close()
        assert pending is not None
        assert _leftovers(db, secrets) == secrets
    with Gallery.open(db, key=key) as g:  # a fresh process would do the same: nothing is kept in memory
        assert not g.scrub_pending
        assert g.audit_log()[-1].detail == {"pending_since": pending[0]}
        assert _leftovers(db, secrets) == []
        assert [s["subject"] for s in g.subjects()] == ["person 001", "person 003"]
    assert _leftovers(db, secrets) == []


def test_a_pending_scrub_finishes_at_the_next_write(db: Path, key: str, real_faces: dict,
                                                    call: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gallery_store, "SCRUB_WAIT_S", 0.2)  # the bound itself is tested above
    secrets = _sealed_values(db, 3)
    g = call(Gallery.open, db, key=key)
    try:
        with _reader(db):
            assert call(g.forget, "person 003").scrubbed is False
            call(g.identify, real_faces["smiling"][0])  # a write (its audit entry) while the reader is there
            assert call(lambda: g.scrub_pending)
        call(g.identify, real_faces["smiling"][1])  # the next write after it left finishes the scrub
        assert not call(lambda: g.scrub_pending)
        assert _leftovers(db, secrets) == []
        assert [e.action for e in call(g.audit_log)][-4:] == ["forget", "identify", "identify", "scrub"]
    finally:
        call(g.close)


def test_cli_forget_says_whether_the_scrub_finished_or_is_pending(db: Path, key_file: Path, key: str,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    common = ["--db", str(db), "--key-file", str(key_file)]
    secrets = _sealed_values(db, 1)
    with _reader(db):
        assert _bounded(lambda: main(["gallery", "forget", "person 001", *common])) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out) == {"subject": "person 001", "templates_deleted": 1, "consents_deleted": 1,
                                            "file_scrubbed": False, "scrub_pending": True}
        assert "scrub PENDING" in captured.err and "next open" in captured.err
    assert main(["gallery", "list", *common]) == 0  # any command opens the gallery, which finishes the scrub
    assert [r["subject"] for r in json.loads(capsys.readouterr().out)] == ["person 002", "person 003"]
    assert _leftovers(db, secrets) == []
    assert main(["gallery", "forget", "person 002", *common]) == 0  # no reader: scrubbed at once
    captured = capsys.readouterr()
    assert json.loads(captured.out)["file_scrubbed"] is True
    assert "scrub finished" in captured.err
    with Gallery.open(db, key=key) as g:
        assert not g.scrub_pending
        assert [e.action for e in g.audit_log()][-3:] == ["forget", "scrub", "forget"]
