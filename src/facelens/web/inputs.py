"""Photos arriving from the browser: size limit, decoding, and errors in words.

The app's events take the browser's file payloads unprocessed (gradio's ``preprocess=False``):
gradio's own decoding would fail on a corrupt file with a PIL message before facelens could say
which file was wrong and why. Here every photo goes through `facelens.image.load_image`, the
decoder the Python API uses, so the page and the API see the same pixels.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import FaceLensError, ImageError

__all__ = ["UploadError", "gone_message", "payload_name", "payload_path", "read_photo"]


class UploadError(FaceLensError):
    """A photo sent by the browser was refused (too large, missing, unreadable)."""


def payload_name(payload: object, default: str = "photo") -> str:
    """The name the user knows the file by (its original name), never the server's cache path."""
    if isinstance(payload, Mapping):
        name = payload.get("orig_name") or (Path(str(payload["path"])).name if payload.get("path") else None)
        return str(name or default)
    if isinstance(payload, (str, os.PathLike)):
        return Path(payload).name
    return default


def payload_path(payload: object) -> str | None:
    """The server-side file of a payload, when it has one."""
    if isinstance(payload, Mapping):
        path = payload.get("path")
        return str(path) if path else None
    if isinstance(payload, (str, os.PathLike)):
        return os.fspath(payload)
    return None


def gone_message(name: str) -> str:
    return f"{name}: the uploaded file is gone (it is deleted after the session); upload it again"


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


def read_photo(payload: object, max_bytes: int, what: str = "photo") -> np.ndarray:
    """An RGB uint8 photo from a browser payload (file path, data URL or array), or a readable error.

    Raises `UploadError` when there is no photo or it is larger than ``max_bytes``, and
    `ImageError` naming the original file when it cannot be decoded.
    """
    from ..image import load_image

    if payload is None:
        raise UploadError(f"no {what}: upload one (or take one with the webcam) first")
    name = payload_name(payload, what)
    if isinstance(payload, np.ndarray):
        return load_image(payload)
    url = payload.get("url") if isinstance(payload, Mapping) else None
    path = payload_path(payload)
    if path is None and isinstance(url, str) and url.startswith("data:"):
        return _load_named(_decode_data_url(url, max_bytes, name), name)
    if path is None:
        raise UploadError(f"{name}: the browser sent no file")
    try:
        size = os.path.getsize(path)
    except OSError:
        raise UploadError(gone_message(name)) from None
    _check_size(size, max_bytes, name)
    with open(path, "rb") as f:
        return _load_named(f.read(), name)


def _decode_data_url(url: str, max_bytes: int, name: str) -> bytes:
    """The bytes of a base64 data URL, refused by its length before anything is decoded or copied.

    Every 4 base64 characters hold 3 bytes, so ``(len - padding) * 3 // 4`` bounds the decoded
    size from above (whitespace and stray characters only make the bound looser).
    """
    comma = url.find(",", 0, 1024)  # the header ("data:image/png;base64,") is short: never scan the data
    if comma < 0 or ";base64" not in url[:comma]:
        raise ImageError(name, "the browser sent a malformed data URL (no base64 data)")
    chars = len(url) - comma - 1
    bound = (chars - url.count("=", max(comma + 1, len(url) - 2))) * 3 // 4
    _check_size(bound, max_bytes, name)
    try:
        data = base64.b64decode(url[comma + 1:], validate=False)
    except (binascii.Error, ValueError):
        raise ImageError(name, "the browser sent a malformed data URL") from None
    _check_size(len(data), max_bytes, name)
    return data


def _check_size(size: int, max_bytes: int, name: str) -> None:
    if size > max_bytes:
        raise UploadError(f"{name} is {_mb(size)}, larger than this server's upload limit of {_mb(max_bytes)} "
                          "(start facelens serve with a larger --max-upload-mb to accept it)")


def _load_named(data: bytes, name: str) -> np.ndarray:
    from ..image import load_image

    try:
        return load_image(data)
    except ImageError as exc:
        raise ImageError(name, exc.reason) from None
