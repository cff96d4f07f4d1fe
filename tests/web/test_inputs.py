"""The app's own upload checks, session files and clean-up, without a browser or a server."""

from __future__ import annotations

import base64
import copy
import io
import os
import stat
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facelens.errors import ImageError
from facelens.web.app import SessionFiles
from facelens.web.inputs import UploadError, read_photo
from facelens.web.uploads import PID_FILE, SESSIONS, UPLOADS, remove_stale, write_pid


def _png(path: Path, shape: tuple[int, int] = (40, 30)) -> np.ndarray:
    rgb = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def test_read_photo_decodes_like_the_api_and_names_the_original_file(tmp_path: Path) -> None:
    rgb = _png(tmp_path / "a1b2c3.png")
    payload = {"path": str(tmp_path / "a1b2c3.png"), "orig_name": "me.png"}
    np.testing.assert_array_equal(read_photo(payload, 10**6), rgb)

    (tmp_path / "x").write_bytes(b"definitely not an image")
    with pytest.raises(ImageError, match=r"^holiday\.jpg: not an image file"):
        read_photo({"path": str(tmp_path / "x"), "orig_name": "holiday.jpg"}, 10**6)


def test_read_photo_enforces_the_size_limit_in_words(tmp_path: Path) -> None:
    _png(tmp_path / "big.png", (200, 200))
    size = (tmp_path / "big.png").stat().st_size
    with pytest.raises(UploadError, match=r"big\.png is .* MB, larger than this server's upload limit"):
        read_photo({"path": str(tmp_path / "big.png"), "orig_name": "big.png"}, size - 1)
    assert read_photo({"path": str(tmp_path / "big.png")}, size).shape == (200, 200, 3)


def test_read_photo_accepts_data_urls_and_says_when_nothing_was_sent(tmp_path: Path) -> None:
    buf = io.BytesIO()
    rgb = np.full((8, 6, 3), 77, np.uint8)
    Image.fromarray(rgb).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    np.testing.assert_array_equal(read_photo({"url": url, "path": None}, 10**6), rgb)
    with pytest.raises(UploadError, match="no photo"):
        read_photo(None, 10**6)
    with pytest.raises(UploadError, match="gone"):
        read_photo({"path": str(tmp_path / "deleted.png"), "orig_name": "deleted.png"}, 10**6)


def test_a_huge_data_url_is_refused_by_its_length_before_any_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "data:image/png;base64," + "A" * 50_000_000  # 37.5 MB once decoded
    monkeypatch.setattr(base64, "b64decode", lambda *a, **k: pytest.fail("the data URL was decoded"))
    tracemalloc.start()
    try:
        with pytest.raises(UploadError, match=r"^big\.png is 37\.5 MB, larger than this server's upload limit"):
            read_photo({"url": url, "path": None, "orig_name": "big.png"}, 10**6)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000, f"refusing a 50 MB data URL allocated {peak} bytes"  # no copy, no slice of the data


@pytest.mark.parametrize("size", [299, 300, 301])  # 0, 2 and 1 padding characters
def test_the_data_url_bound_is_exact_for_clean_base64(size: int) -> None:
    data = bytes(range(256)) * 2
    url = "data:image/png;base64," + base64.b64encode(data[:size]).decode()
    with pytest.raises(ImageError, match=r"^x: "):  # within the limit: decoded (and not an image)
        read_photo({"url": url, "path": None, "orig_name": "x"}, size)
    with pytest.raises(UploadError, match="larger than this server's upload limit"):
        read_photo({"url": url, "path": None, "orig_name": "x"}, size - 1)
    with pytest.raises(ImageError, match="malformed data URL"):
        read_photo({"url": "data:image/png," + "A" * 10, "path": None, "orig_name": "x"}, 10**6)


# -- session files --------------------------------------------------------------------------------
def _upload(root: Path, token: str, name: str, data: bytes) -> Path:
    """A file where gradio's upload route puts it (``u/<random>/<hash>/<name>``)."""
    path = root / UPLOADS / token / "hash" / name
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


def test_a_session_moves_its_upload_into_its_own_private_folder(tmp_path: Path) -> None:
    rgb = _png(tmp_path / "face.png")
    root = tmp_path / "uploads"
    up = _upload(root, "t1", "face.png", (tmp_path / "face.png").read_bytes())
    files = copy.deepcopy(SessionFiles(root))  # what gradio does with the initial state value
    payload = {"path": str(up), "orig_name": "face.png", "meta": {"_type": "gradio.FileData"}}
    own = files.claim(payload, "photo")
    own_path = Path(own["path"])  # type: ignore[index]
    assert own["orig_name"] == "face.png"  # type: ignore[index]
    assert own_path.parent.parent == root / SESSIONS and own_path.suffix == ".png"
    assert stat.S_IMODE(own_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(own_path.parent.stat().st_mode) & 0o077 == 0
    assert not up.exists() and not (root / UPLOADS / "t1").exists()  # out of gradio's cache, folders pruned
    np.testing.assert_array_equal(read_photo(own, 10**6), rgb)
    assert files.claim(payload, "photo") == own  # a second button on the same upload
    files.delete()
    assert not own_path.parent.exists() and (root / SESSIONS).is_dir()
    with pytest.raises(UploadError, match="session has ended"):
        files.claim(payload, "photo")


def test_sessions_sharing_a_cached_file_each_get_a_copy_and_never_delete_it(tmp_path: Path) -> None:
    _png(tmp_path / "face.png")
    root = tmp_path / "uploads"
    shared = root / "contenthash" / "face.png"  # gradio's content-addressed cache: maybe several sessions'
    shared.parent.mkdir(parents=True)
    shared.write_bytes((tmp_path / "face.png").read_bytes())
    template = SessionFiles(root)
    one, two = copy.deepcopy(template), copy.deepcopy(template)
    payload = {"path": str(shared), "orig_name": "face.png"}
    mine, theirs = one.claim(payload), two.claim(payload)
    assert mine != theirs and shared.exists()
    assert Path(mine["path"]).parent != Path(theirs["path"]).parent  # type: ignore[index]
    one.drop(payload)  # the old /live attack: name a file, have it deleted
    one.delete()
    assert shared.exists() and Path(theirs["path"]).exists()  # type: ignore[index]
    assert not Path(mine["path"]).exists()  # type: ignore[index]
    assert read_photo(theirs, 10**6).shape == (40, 30, 3)


def test_a_session_deletes_only_its_own_copies(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    other = SessionFiles(root)
    theirs = Path(other.claim({"path": str(_upload(root, "t1", "a.jpg", b"a"))})["path"])  # type: ignore[index]
    files = SessionFiles(root)
    with pytest.raises(UploadError):
        files.claim({"path": str(theirs)})
    files.drop({"path": str(theirs)})
    files.drop(None)
    files.delete()
    assert theirs.exists()
    live = SessionFiles(root)
    payload = {"path": str(_upload(root, "t2", "frame.jpg", b"f"))}
    own = Path(live.claim(payload, "webcam frame")["path"])  # type: ignore[index]
    live.drop(payload)
    assert not own.exists() and theirs.exists()


@pytest.mark.parametrize("name", ["outside", "dotdot", "session copy", "pid file", "folder", "nul", "root"])
def test_paths_that_are_not_uploads_are_refused_unread(tmp_path: Path, name: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "uploads"
    root.mkdir()
    secret = tmp_path / "secret.png"
    _png(secret)
    write_pid(root)
    other = SessionFiles(root)
    theirs = other.claim({"path": str(_upload(root, "t1", "a.png", secret.read_bytes()))})["path"]  # type: ignore[index]
    path = {"outside": str(secret), "dotdot": str(root / ".." / "secret.png"), "session copy": theirs,
            "pid file": str(root / PID_FILE), "folder": str(root / UPLOADS), "nul": str(root / "a\0b"),
            "root": str(root)}[name]
    files = SessionFiles(root)

    def no_open(f: object, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"{f} was opened")

    with monkeypatch.context() as m:
        m.setattr("builtins.open", no_open)
        m.setattr(os, "open", no_open)
        with pytest.raises(UploadError, match=r"^holiday\.png: that is not a file this server received from your "
                                              r"browser; upload the photo again$"):
            files.claim({"path": path, "orig_name": "holiday.png"}, "photo")
    assert files.folder is None  # nothing was copied
    assert Path(theirs).exists()


def test_with_keep_uploads_paths_are_checked_but_nothing_moves(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    up = _upload(root, "t1", "a.png", b"x")
    files = SessionFiles(root, keep=True)
    assert files.claim({"path": str(up), "orig_name": "a.png"}) == {"path": os.path.realpath(up), "orig_name": "a.png"}
    with pytest.raises(UploadError):
        files.claim({"path": "/etc/passwd"})
    files.delete()
    assert up.exists() and not (root / SESSIONS).exists()


def _pid_file(folder: Path, pid: int, namespace: str | None = None) -> None:
    write_pid(folder)
    fields = (folder / PID_FILE).read_text().split()
    (folder / PID_FILE).write_text(" ".join([str(pid), *([namespace] if namespace else fields[1:])]) + "\n")


def test_folders_of_killed_servers_are_removed_and_no_others(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(done.stdout)  # a process that has exited
    folders = {k: tmp_path / f"facelens-serve-{k}" for k in ("dead", "alive", "nopid", "namespace")}
    for folder in folders.values():
        folder.mkdir()
        (folder / "photo.jpg").write_bytes(b"x")
    _pid_file(folders["dead"], dead_pid)
    _pid_file(folders["alive"], os.getppid())
    _pid_file(folders["namespace"], dead_pid, "pid:[1]")  # a server in another container sharing /tmp
    other = tmp_path / "not-facelens"
    other.mkdir()
    _pid_file(other, dead_pid)
    assert remove_stale(tmp_path) == [folders["dead"]]
    assert not folders["dead"].exists()
    assert all(folders[k].exists() for k in ("alive", "nopid", "namespace")) and other.exists()
