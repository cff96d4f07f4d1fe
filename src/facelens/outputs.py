"""Write result files so that a reader never sees half of one.

An explanation run can take hours and is often stopped with Ctrl-C, killed by a scheduler or runs out
of disk. Writing straight into ``report.json`` would then leave a truncated file that looks valid to
the next step. Here every file is written to a temporary sibling in the same directory, flushed and
fsynced, then moved over the target with :func:`os.replace`, which is atomic on POSIX and Windows: the
target is either the complete old version or the complete new one. The directory is fsynced too, so
the rename itself survives a power cut.

On an ordinary exception (KeyboardInterrupt included) the temporary file is removed. SIGKILL or a power
cut cannot be cleaned up after; they may leave a hidden ``.<name>.<random>.tmp`` sibling behind, never a
damaged target.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import io
import json
import math
import os
import secrets
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "atomic_dir",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "save_npy",
    "save_png",
    "to_jsonable",
    "write_json",
]

_TMP_SUFFIX = ".tmp"


def _temp_sibling(target: Path, suffix: str = _TMP_SUFFIX) -> Path:
    """A hidden, unguessable name next to ``target``: same filesystem, so the final rename is atomic."""
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}{suffix}")


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable; best effort, since some filesystems refuse fsync on dirs."""
    if sys.platform == "win32":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, encoding: str = "utf-8",
                permissions: int | None = None) -> Iterator[IO[Any]]:
    """Yield a file to write; it replaces ``path`` only if the ``with`` block finishes without an error.

    ``mode`` is ``"wb"`` or ``"w"`` (text without newline translation). Lets large outputs (arrays,
    images, CSV rows) stream to disk instead of being built in memory first. Missing parent directories
    are created; the new file gets the usual permissions (0666 minus umask), or exactly ``permissions``
    (e.g. ``0o600`` for personal data): the temporary file is created with them, so its bytes are never
    readable by others, not even before the rename. A symlink at ``path`` is replaced by the new file,
    not followed.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes only, mode must be 'wb' or 'w', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        temp = _temp_sibling(target)
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                         0o666 if permissions is None else permissions)
            break
        except FileExistsError:
            continue
    try:
        if permissions is not None and hasattr(os, "fchmod"):
            os.fchmod(fd, permissions)  # exact, whatever the umask (which could only have removed bits)
        raw = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        _remove_quietly(temp)
        raise
    try:
        with raw:
            if mode == "w":
                text = io.TextIOWrapper(raw, encoding=encoding, newline="")
                yield text
                text.flush()
                text.detach()
            else:
                yield raw
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(temp, target)
    except BaseException:
        _remove_quietly(temp)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, permissions: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (``permissions``: see :func:`atomic_open`); returns the path."""
    with atomic_open(path, "wb", permissions=permissions) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8",
                      permissions: int | None = None) -> Path:
    """Write ``text`` to ``path`` atomically (no newline translation); returns the path."""
    return atomic_write_bytes(path, text.encode(encoding), permissions=permissions)


def to_jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types: numpy values, paths, tuples and sets converted; NaN and ±inf → None.

    Non-finite numbers become ``null`` rather than an error: a report legitimately holds undefined
    values (an AUC over one class, a correlation of a constant), a run of hours must not die while
    saving them, and ``null`` is what every JSON reader understands as "no value". Python's own
    ``NaN`` token is not JSON and breaks browsers and most other parsers.
    """
    if isinstance(obj, (np.generic, np.ndarray)):
        return to_jsonable(obj.tolist())  # plain Python scalars and nested lists
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {_json_key(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(item) for item in obj]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(item) for item in sorted(obj, key=repr)]
    if isinstance(obj, os.PathLike):
        return os.fsdecode(os.fspath(obj))
    raise TypeError(f"cannot write an object of type {type(obj).__name__} as JSON")


def _json_key(key: Any) -> str | int | float | bool | None:
    if isinstance(key, np.generic):
        key = key.item()
    if isinstance(key, os.PathLike):
        key = os.fsdecode(os.fspath(key))
    if key is None or isinstance(key, (str, int, float, bool)):
        return key
    raise TypeError(f"cannot use a key of type {type(key).__name__} in JSON")


def write_json(path: str | os.PathLike, obj: Any, *, permissions: int | None = None) -> Path:
    """Write ``obj`` as indented UTF-8 JSON, atomically (see :func:`to_jsonable` for conversions).

    The whole text is built before the file is touched, so an unserialisable object leaves the
    previous file as it was. ``permissions``: see :func:`atomic_open`.
    """
    text = json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write_text(path, text, permissions=permissions)


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Save an H×W (gray), H×W×1, H×W×3 (RGB) or H×W×4 (RGBA) uint8 or bool array as PNG, atomically.

    uint16 gray is saved as a 16-bit PNG. Floats are refused rather than guessed at: the caller knows
    whether 1.0 means white, we do not.
    """
    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ValueError(f"save_png needs an H×W, H×W×3 or H×W×4 array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"save_png got an empty image of shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * np.uint8(255)
    if arr.dtype == np.uint16 and arr.ndim == 2:
        picture = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint16))
    elif arr.dtype == np.uint8:
        picture = Image.fromarray(np.ascontiguousarray(arr))
    else:
        raise ValueError(f"save_png needs uint8 (or bool, or uint16 gray) data, got {arr.dtype}")
    with atomic_open(path, "wb") as f:
        picture.save(f, format="PNG")
    return Path(path)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save ``array`` in ``.npy`` format atomically; object arrays are refused (they would need pickle)."""
    arr = np.asanyarray(array)
    if arr.dtype.hasobject:
        raise ValueError("save_npy refuses object arrays: loading them back would need pickle")
    with atomic_open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
    return Path(path)


# ---------------------------------------------------------------------------------------------------
# directories


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a hidden temporary sibling and move it to ``path`` when the block succeeds.

    Yields the temporary directory to fill. On success every file in it is fsynced and it takes the
    place of ``path``; an existing directory there is swapped out in one atomic step on Linux
    (``renameat2(RENAME_EXCHANGE)``), elsewhere by two renames with the old one kept until the new one
    is in place, and then deleted. On error the temporary directory is removed and an existing
    ``path`` is left untouched, so a report folder is always either the old report or the new one.
    After SIGKILL or a power cut a hidden ``.<name>.<random>.tmp`` (or ``.old``) folder may remain.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, "atomic_dir target exists and is not a directory", str(target)
        )
    while True:
        building = _temp_sibling(target)
        try:
            os.mkdir(building, 0o777)
            break
        except FileExistsError:
            continue
    try:
        yield building
        _fsync_tree(building)
        _move_into_place(building, target)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    _fsync_dir(target.parent)


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            file_path = Path(folder, name)
            if file_path.is_symlink():
                continue
            with open(file_path, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def _move_into_place(building: Path, target: Path) -> None:
    if not os.path.lexists(target):
        try:
            os.rename(building, target)
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # someone created the target meanwhile: replace it below
    if _exchange(building, target):
        _remove_tree(building)  # now holds the old contents
        return
    retired = _temp_sibling(target, ".old")
    os.rename(target, retired)
    try:
        os.rename(building, target)
    except BaseException:
        os.rename(retired, target)
        raise
    _remove_tree(retired)


def _remove_tree(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2; False where that is unavailable.

    The standard library has no atomic swap, and without one a crash between two renames would
    leave no directory at the target.
    """
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # kernel or filesystem without RENAME_EXCHANGE
    raise OSError(code, os.strerror(code), str(b))


_RENAMEAT2_CACHE: list[Any] = []


def _renameat2() -> Any:
    if not _RENAMEAT2_CACHE:
        function = None
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            function = libc.renameat2
            function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            function.restype = ctypes.c_int
        _RENAMEAT2_CACHE.append(function)
    return _RENAMEAT2_CACHE[0]
