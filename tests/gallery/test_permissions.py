"""Biometric files are their owner's only, from the moment they exist: the gallery with its WAL and
shared-memory index, the key file and the exports, under a permissive umask too."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from facelens.cli import main
from facelens.gallery import Consent, Gallery, GalleryError


def _mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o000], ids=["umask-022", "umask-000"])
def permissive_umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under a umask that lets new files be read by others (0666 & ~umask)."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _vector(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=128).astype(np.float32)


def test_gallery_wal_and_shm_are_0600_from_creation(tmp_path: Path, key: str, permissive_umask: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "g.db"
    modes_at_connect: list[int] = []
    real_connect = sqlite3.connect

    def connect(*args: object, **kwargs: object) -> sqlite3.Connection:
        if db.exists():  # the file SQLite is about to open already exists, and already with its final mode
            modes_at_connect.append(_mode(db))
        else:
            modes_at_connect.append(-1)
        return real_connect(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sqlite3, "connect", connect)
    with Gallery.create(db, key=key) as g:
        g.enroll(Consent.now("someone", "door", "explicit-consent"), _vector())
        for suffix in ("", "-wal", "-shm"):  # while it is open, SQLite keeps the WAL and its index beside it
            path = Path(f"{db}{suffix}")
            assert path.exists(), suffix
            assert _mode(path) == 0o600, (suffix, oct(_mode(path)))
    assert modes_at_connect == [0o600]
    assert _mode(db) == 0o600
    with Gallery.open(db, key=key) as g:  # reopening recreates the WAL and index: the same mode
        g.enroll(Consent.now("someone else", "door", "explicit-consent"), _vector(1))
        assert [_mode(f"{db}{s}") for s in ("", "-wal", "-shm")] == [0o600] * 3


def test_create_refuses_leftover_sqlite_files(tmp_path: Path, key: str) -> None:
    """A stale WAL next to a new file would be replayed into it (and keep its old, wider mode)."""
    db = tmp_path / "g.db"
    Path(f"{db}-wal").write_bytes(b"stale")
    with pytest.raises(GalleryError, match="left over"):
        Gallery.create(db, key=key)
    assert not db.exists()


def test_open_never_creates_a_file(tmp_path: Path, key: str) -> None:
    db = tmp_path / "g.db"
    Gallery.create(db, key=key).close()
    with pytest.raises(GalleryError):
        Gallery._connect(tmp_path / "nothing.db")  # what open() would reach if the file vanished meanwhile
    assert not (tmp_path / "nothing.db").exists()


def test_export_is_written_0600_before_it_is_moved_into_place(tmp_path: Path, key: str, key_file: Path,
                                                              permissive_umask: int,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    db, out = tmp_path / "g.db", tmp_path / "someone.json"
    with Gallery.create(db, key=key) as g:
        g.enroll(Consent.now("someone", "door", "explicit-consent"), _vector())
    out.write_text("an older export, world-readable\n")
    os.chmod(out, 0o644)
    created: list[int] = []
    moved: list[int] = []
    real_open, real_replace = os.open, os.replace

    def open_(path: object, flags: int, mode: int = 0o777, *args: object, **kwargs: object) -> int:
        if Path(os.fsdecode(path)).name.startswith(f".{out.name}."):  # the temporary sibling
            created.append(mode)
        return real_open(path, flags, mode, *args, **kwargs)  # type: ignore[arg-type]

    def replace(src: object, dst: object, *args: object, **kwargs: object) -> None:
        if Path(os.fsdecode(dst)) == out:
            moved.append(_mode(src))  # the bytes are all there: who can read them before the rename?
        real_replace(src, dst, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "replace", replace)
    assert main(["gallery", "export", "someone", "--out", str(out), "--db", str(db), "--key-file", str(key_file)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert created == [0o600]  # created with 0600, not created 0644 and narrowed later
    assert moved == [0o600]
    assert _mode(out) == 0o600
    assert '"subject": "someone"' in out.read_text()


def test_keygen_creates_the_key_0600(tmp_path: Path, permissive_umask: int, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gallery.key"
    created: list[int] = []
    real_open = os.open

    def open_(path: object, flags: int, mode: int = 0o777, *args: object, **kwargs: object) -> int:
        if Path(os.fsdecode(path)) == out:
            created.append(mode)
            assert flags & os.O_EXCL  # never over an existing key
        return real_open(path, flags, mode, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", open_)
    assert main(["gallery", "keygen", "--out", str(out)]) == 0
    capsys.readouterr()
    assert created == [0o600]
    assert _mode(out) == 0o600
    assert len(out.read_text().strip()) == 44
