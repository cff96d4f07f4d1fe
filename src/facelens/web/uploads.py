"""Where the photos browsers send live on the server, and who may read or delete them.

The private upload directory (``GRADIO_TEMP_DIR``, mode 0700) holds::

    u/<random>/<hash>/<name>           gradio's upload route: one random folder per upload request
    sessions/<random>/<random>.<ext>   each browser session's own copies (folder 0700, files 0600)
    <hash>/<name>                      anything else gradio caches by content
    .facelens-serve.pid                the server's process id, for `remove_stale` (not with --keep-uploads)

Why. Gradio names an upload by its content hash (``<hash>/<name>``), so two people sending the
same photo get the same path: one session deleting "its" file deleted the other's, and anyone who
knew a photo's bytes could name that path (as a webcam frame, say) and have it deleted. Hence:

* `separate_uploads` makes gradio's upload route put each request in a fresh random folder,
  ``u/<random>/``. Such a path is known only to the client that uploaded the file.
* A handler never opens the path a client names. `SessionFiles.claim` first checks that it is one
  of this server's uploads (inside the upload directory, not a session's copy, not the pid file);
  anything else (``/etc/passwd``, another session's copy) is refused with a readable error before
  it is opened. Then the file becomes the session's own, in its own folder:

  - an upload under ``u/`` is *moved* there: it is this client's alone, and moving it takes it out
    of gradio's cache at once, where its URL could otherwise still fetch it for an hour;
  - any other file in the cache may be shared by several sessions (content-addressed), so it is
    *copied* and never deleted on a session's behalf: gradio's ``delete_cache`` backstop removes
    it after an hour, and the whole directory goes when the server stops. This is also what
    happens to every upload if a gradio release no longer lets `separate_uploads` hook its route:
    sessions stay apart, gradio's copies just live longer.

* A session deletes only files in its own folder: each webcam frame right after it is read, and
  the whole folder when the session ends (tab closed, or gradio expiring the session's state).
  With ``--keep-uploads`` nothing is moved, copied or deleted; paths are still checked.

A server killed by a signal it cannot catch (SIGKILL, OOM) leaves its directory behind; the next
`facelens serve` removes such directories with `remove_stale`, judging by the pid file inside.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .inputs import UploadError, gone_message, payload_name, payload_path

__all__ = ["PID_FILE", "SERVE_PREFIX", "SESSIONS", "UPLOADS", "SessionFiles", "remove_stale", "separate_uploads",
           "write_pid"]

UPLOADS = "u"
SESSIONS = "sessions"
PID_FILE = ".facelens-serve.pid"
SERVE_PREFIX = "facelens-serve-"

# Claims are quick (a rename, or a copy of at most one upload) and rare; one lock for all sessions
# keeps two events of one session from taking the same file twice. A class attribute would do as
# well, but a module lock is never deep-copied with gradio's per-session copy of the state value.
_LOCK = threading.Lock()


def _refused(name: str) -> UploadError:
    return UploadError(f"{name}: that is not a file this server received from your browser; upload the photo again")


class SessionFiles:
    """The files one browser session owns: its folder under ``sessions/`` and what it took into it.

    Kept in the session's ``gr.State``; gradio deep-copies the initial value for each session, so
    the folder is created at the first claim, never in ``__init__`` (every session would share it).
    """

    def __init__(self, root: Path | str, keep: bool = False) -> None:
        self.root = Path(root)
        self.keep = keep
        self.folder: Path | None = None
        self.owned: dict[str, str] = {}  # the path the client named -> this session's copy
        self.closed = False

    def claim(self, payload: object, what: str = "photo") -> object:
        """The payload to read: this session's own copy of the file the client named.

        Payloads without a server path (None, a data URL, an array) come back unchanged. Raises
        `UploadError` when the path is not one of this server's uploads, or the file is gone.
        """
        path = payload_path(payload)
        if path is None:
            return payload
        name = payload_name(payload, what)
        with _LOCK:
            if self.closed:
                raise UploadError(f"{name}: this browser session has ended; reload the page and upload it again")
            own = self.owned.get(path)
            if own is None:
                real, parts = self._check(path, name)
                if self.keep:
                    return {"path": real, "orig_name": name}
                own = self._take(real, parts, name)
                self.owned[path] = own
        return {"path": own, "orig_name": name}

    def drop(self, payload: object) -> None:
        """Delete this session's copy of a file it claimed (a webcam frame is never needed twice)."""
        path = payload_path(payload)
        with _LOCK:
            own = self.owned.pop(path, None) if path is not None else None
        if own is not None:
            with contextlib.suppress(OSError):
                os.remove(own)

    def delete(self) -> None:
        """The session ended: delete its folder (never anything a client named)."""
        with _LOCK:
            self.closed = True
            folder, self.folder = self.folder, None
            self.owned.clear()
        if folder is not None and not self.keep:
            shutil.rmtree(folder, ignore_errors=True)

    # -- internals --------------------------------------------------------------------------------
    def _check(self, path: str, name: str) -> tuple[str, tuple[str, ...]]:
        """The resolved path and its parts below the upload directory, or `UploadError`."""
        try:
            root = os.path.realpath(self.root)
            real = os.path.realpath(path)
            rel = os.path.relpath(real, root)
        except (OSError, ValueError):  # a NUL byte, a path too long
            raise _refused(name) from None
        parts = Path(rel).parts
        if not parts or rel == os.curdir or parts[0] in (os.pardir, SESSIONS, PID_FILE):
            raise _refused(name)
        return real, parts

    def _take(self, real: str, parts: tuple[str, ...], name: str) -> str:
        try:
            if not stat.S_ISREG(os.lstat(real).st_mode):
                raise _refused(name)
            dest = self._folder() / f"{secrets.token_hex(12)}{_suffix(real)}"
            if parts[0] == UPLOADS and len(parts) >= 3:
                os.rename(real, dest)  # this client's own upload: out of gradio's cache at once
                os.chmod(dest, 0o600)
                _prune(Path(real).parent, self.root / UPLOADS)
            else:
                _copy(real, dest)  # possibly shared with other sessions: left for gradio's backstop
        except FileNotFoundError:
            raise UploadError(gone_message(name)) from None
        except OSError as exc:
            raise UploadError(f"{name}: the server could not store the upload ({exc.strerror or exc})") from None
        return str(dest)

    def _folder(self) -> Path:
        if self.folder is None:
            sessions = self.root / SESSIONS
            sessions.mkdir(mode=0o700, exist_ok=True)
            folder = sessions / secrets.token_hex(16)
            folder.mkdir(mode=0o700)
            self.folder = folder
        return self.folder


def _suffix(path: str) -> str:
    """The file's extension when it is a plain one (".jpg"), else none: the decoder sniffs the bytes."""
    suffix = Path(path).suffix.lower()
    return suffix if 1 < len(suffix) <= 6 and suffix[1:].isascii() and suffix[1:].isalnum() else ""


def _copy(src: str, dest: Path) -> None:
    with open(src, "rb") as fin:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fout:
            shutil.copyfileobj(fin, fout)


def _prune(folder: Path, stop: Path) -> None:
    """Remove the now-empty folders an upload came in (``u/<random>/<hash>``), up to ``stop``."""
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


# -- gradio's upload route ----------------------------------------------------------------------------
def separate_uploads() -> bool:
    """Make gradio store each upload request in its own random folder (``u/<random>/``).

    Gradio's ``/upload`` route calls ``gradio.routes.upload_fn(request, upload_dir, ...)`` at
    request time; this wraps it with ``upload_dir/u/<random>``. Returns False, changing nothing,
    when the installed gradio has no such hook (uploads are then copied per session instead).
    """
    try:
        from gradio import routes
    except ImportError:
        return False
    original: Callable[..., Any] | None = getattr(routes, "upload_fn", None)
    if original is None or not callable(original):
        return False
    if getattr(original, "facelens_separate", False):
        return True

    async def upload_fn(request: Any, upload_dir: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        folder = Path(upload_dir) / UPLOADS / secrets.token_hex(16)
        try:
            result = await original(request, str(folder), *args, **kwargs)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if isinstance(result, tuple) and result and not result[0]:  # nothing was uploaded
            shutil.rmtree(folder, ignore_errors=True)
        return result

    upload_fn.facelens_separate = True  # type: ignore[attr-defined]
    routes.upload_fn = upload_fn
    return True


# -- directories left by killed servers -------------------------------------------------------------
def _pid_namespace() -> str:
    """This process's pid namespace (containers sharing /tmp see different pids), "" where unknown."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def write_pid(folder: Path) -> None:
    """Mark ``folder`` as this server's, so a later server can tell when it was left behind."""
    (folder / PID_FILE).write_text(f"{os.getpid()} {_pid_namespace()}\n", encoding="ascii")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user's
        return True
    return True


def remove_stale(parent: Path | str) -> list[Path]:
    """Delete the ``facelens-serve-*`` directories in ``parent`` whose server process is gone.

    Only directories of this user that hold a pid file (written by `write_pid`, never with
    --keep-uploads) naming a process that no longer exists in this pid namespace; anything else
    (no pid file, another namespace, a live or reused pid) is left alone.
    """
    removed: list[Path] = []
    here = _pid_namespace()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        try:
            if not entry.name.startswith(SERVE_PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            fields = (Path(entry.path) / PID_FILE).read_text(encoding="ascii").split()
            pid, namespace = int(fields[0]), (fields[1] if len(fields) > 1 else "")
        except (OSError, ValueError, IndexError):
            continue
        if pid <= 0 or pid == os.getpid() or namespace != here or _alive(pid):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed
