"""Crash safety and concurrency, with real worker processes (see workers.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facelens.gallery import Gallery

WORKERS = Path(__file__).with_name("workers.py")


def _worker(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKERS), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigkill_during_enrollment_loses_nothing_committed(tmp_path: Path, key: str, key_file: Path,
                                                           real_faces: dict) -> None:
    db = tmp_path / "crash.db"
    Gallery.create(db, key=key).close()
    proc = _worker("enroll", db, key_file, real_faces["npy"], 10_000, 2)
    committed: list[str] = []
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while len(committed) < 25 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        committed.append(line.split()[1])
    proc.send_signal(signal.SIGKILL)  # in the middle of the next enrollments
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    assert len(committed) == 25
    with Gallery.open(db, key=key) as g:
        assert g.integrity_check() == "ok"
        held = {s["subject"]: s["templates"] for s in g.subjects()}
        assert set(committed) <= set(held)  # every committed enrollment is there
        assert set(held.values()) == {2}  # and none is half there
        assert g.verify_audit() == (True, None)
        assert len(g.audit_log()) == 1 + len(held)  # create + one entry per enrollment


def test_readers_identify_while_a_writer_enrolls(tmp_path: Path, key: str, key_file: Path, real_faces: dict) -> None:
    db = tmp_path / "busy.db"
    Gallery.create(db, key=key).close()
    stop = tmp_path / "stop"
    readers = [_worker("identify", db, key_file, real_faces["npy"], 3, stop) for _ in range(3)]
    for r in readers:
        assert r.stdout is not None and r.stdout.readline().strip() == "ready", r.stderr.read() if r.stderr else ""
    writer = _worker("enroll", db, key_file, real_faces["npy"], 40, 3, 0.02)
    try:
        out, err = writer.communicate(timeout=120)
    finally:
        stop.touch()
    assert writer.returncode == 0, err
    assert out.count("committed") == 40
    partial_views = set()
    for r in readers:
        out, err = r.communicate(timeout=120)
        assert r.returncode == 0, err
        assert int(out.split()[-1]) >= 1
        seen = {int(c) for c in out.split("seen ")[1].split()[0].split(",")}
        partial_views |= {c for c in seen if 0 < c < 40}
    # the readers really ran while the writer was enrolling: they saw the gallery part-way filled
    assert partial_views, "no reader saw the gallery during enrollment, so concurrency was not exercised"
    with Gallery.open(db, key=key) as g:
        assert len(g) == 120
        assert g.integrity_check() == "ok"
        assert g.verify_audit() == (True, None)
        actions = [e.action for e in g.audit_log()]
    # the readers really ran while the writer was enrolling: their entries sit between its first and last
    first, last = actions.index("enroll"), len(actions) - 1 - actions[::-1].index("enroll")
    assert "identify" in actions[first:last]


@pytest.mark.parametrize("wrong", ["other key", "truncated"])
def test_wrong_key_in_another_process_fails_clearly(tmp_path: Path, key: str, wrong: str) -> None:
    from facelens.gallery import generate_key

    db = tmp_path / "k.db"
    Gallery.create(db, key=key).close()
    bad = generate_key() if wrong == "other key" else key[:20]
    code = (f"import sys; sys.path.insert(0, {str(WORKERS.parent)!r}); import workers; "
            f"from facelens.gallery import Gallery; Gallery.open({str(db)!r}, key={bad!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("facelens.gallery.crypto.GalleryKeyError")
    assert ("wrong gallery key" in last) if wrong == "other key" else ("base64" in last)
