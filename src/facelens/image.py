"""Read any image a user may hand us as H×W×3 uint8 RGB, or fail with an :class:`ImageError` that says why.

Face photos arrive from phones, scanners, web scrapes and research sets, so every odd corner of
image files shows up sooner or later: EXIF rotation, CMYK, 16-bit scans, palettes with a transparent
colour, animations, truncated downloads and decompression bombs. One function handles them all, so
that no model or explainer ever sees anything but a clean RGB array.

Conversion rules (the same for files and in-memory images):

* **EXIF orientation** is applied, so the face is upright the way a photo viewer shows it.
* **Alpha** (RGBA, LA, PA, premultiplied RGBa/La, palette or gray/RGB with a transparent colour) is
  composited onto **white**: transparent pixels are almost always cut-out background, and a white
  background is what such images look like in a browser or document, which is how a person judged them.
* **16-bit** (I;16, I;16B, ...) keeps the top byte (``v >> 8``), the exact counterpart of 8-bit data.
* **32-bit integer (I)**: values inside 0..255 are used as they are, values inside 0..65535 as 16-bit
  (``v >> 8``); anything else (negative or larger) is min–max stretched to 0..255, because such data
  has no agreed white level. A constant image, which has no range to stretch, is clipped to 0..255.
* **32-bit float (F)**: values inside [0, 1] are scaled by 255, values inside [0, 255] are rounded;
  anything else is min–max stretched as for I. NaN or infinity is an error.
* Everything else (1, L, P, CMYK, YCbCr, LAB, HSV, RGBX...) goes through PIL's own conversion.
  Embedded ICC profiles are ignored, as OpenCV and the usual training pipelines ignore them, so
  the model sees the pixels it was trained on.
* **Animations and multi-page files** (GIF, APNG, TIFF, WebP): the first frame.

Arrays are taken to be **RGB** (convert OpenCV's BGR first) with shape H×W (gray), H×W×1, H×W×2
(gray + alpha), H×W×3 or H×W×4 (RGBA), and these dtypes:

* ``uint8``: as is; ``bool``: False → 0, True → 255; ``uint16``: ``v >> 8`` as for 16-bit files;
* other integers (int8 … uint64): the values must lie in 0..255, otherwise it is an error;
* floats: all values in [0, 1] → scaled by 255, otherwise all values in [0, 255] → rounded. So a
  [0, 255] image whose brightest pixel is ≤ 1 reads as [0, 1]: pass uint8 to avoid the ambiguity.
  Values outside [0, 255], NaN or infinity are an error, since in an array they nearly always mean a
  bug (say, a mean-subtracted tensor passed by mistake) that silent rescaling would hide.

The returned array is always a fresh, writable, C-contiguous copy, never a view of the caller's data.

Decompression bombs: a file's declared size is checked right after PIL has read its header and before
any pixel is decoded. The limit is ``max_pixels``, else the environment variable ``FACELENS_MAX_PIXELS``,
else 50 megapixels. PIL's own bomb check (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 megapixels) still
applies on top and is reported as an :class:`ImageError` too; we never change PIL's global setting,
since other code in the same process relies on it. To accept larger images, raise both.

Truncated files are errors: we leave ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` at False and decode
fully, because a half-grey padded face would silently poison every explanation computed from it.
Vector formats (EPS, WMF) are refused, since PIL renders them by running outside programs.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeAlias

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import FaceLensError, ImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_PIXELS_ENV",
    "ImageSource",
    "load_image",
    "max_pixels_limit",
    "source_name",
]

ImageSource: TypeAlias = str | os.PathLike | bytes | np.ndarray | Image.Image

DEFAULT_MAX_PIXELS = 50_000_000
MAX_PIXELS_ENV = "FACELENS_MAX_PIXELS"

_PREMULTIPLIED_MODES = ("RGBa", "La")
_ALPHA_MODES = ("LA", "PA", "RGBA")
_VECTOR_FORMATS = ("EPS", "WMF")
_PIL_PIXELS_RE = re.compile(r"\((\d+) pixels\)")


def source_name(src: object) -> str:
    """Name ``src`` in error messages: its path, ``<bytes>``, ``<array HxW>`` or ``<PIL image>``."""
    if isinstance(src, (str, os.PathLike)):
        return os.fsdecode(os.fspath(src))
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(src, np.ndarray):
        if src.ndim >= 2:
            return f"<array {src.shape[0]}x{src.shape[1]}>"
        return f"<array shape {src.shape}>"
    if isinstance(src, Image.Image):
        return "<PIL image>"
    return f"<{type(src).__name__}>"


def max_pixels_limit(max_pixels: int | None = None) -> int:
    """The pixel limit in force: the argument, else ``$FACELENS_MAX_PIXELS``, else 50 megapixels."""
    return _limit_and_hint(max_pixels)[0]


def load_image(src: ImageSource, *, max_pixels: int | None = None, name: str | None = None) -> np.ndarray:
    """Read ``src`` (path, encoded bytes, array or PIL image) as an H×W×3 uint8 RGB array.

    ``name`` replaces the source's own name in error messages (say, the manifest path of a byte
    string). Every problem with the input raises :class:`ImageError`; see the module docstring for
    the conversion rules.
    """
    label = name if name is not None else source_name(src)
    limit, hint = _limit_and_hint(max_pixels)
    if isinstance(src, np.ndarray):
        return _fresh(_array_to_rgb(src, label, limit, hint), src)
    if isinstance(src, Image.Image):
        _check_pixels(src.size, label, limit, hint)
        with _pil_bomb_guard(label, limit, hint) as pil_warnings:
            _decode_fully(src, label)
            _refuse_if_pil_warned(pil_warnings, src.size, label)
            return _fresh(_pil_to_rgb(src, label), None)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise ImageError(label, "empty file (0 bytes)")
        return _decode_stream(io.BytesIO(data), label, limit, hint)
    if isinstance(src, (str, os.PathLike)):
        with _open_file(os.fspath(src), label) as stream:
            return _decode_stream(stream, label, limit, hint)
    raise ImageError(
        label,
        f"unsupported image source of type {type(src).__name__} (give a path, bytes, array or PIL image)",
    )


# ---------------------------------------------------------------------------------------------------
# limits


def _limit_and_hint(max_pixels: int | None) -> tuple[int, str]:
    """The limit and how a user raises it; a bad setting is a configuration error, not an image error."""
    if max_pixels is not None:
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0:
            raise FaceLensError(f"max_pixels must be a positive integer, got {max_pixels!r}")
        return int(max_pixels), "pass a larger max_pixels to raise it"
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    hint = f"set {MAX_PIXELS_ENV} to raise it"
    if not text:
        return DEFAULT_MAX_PIXELS, hint
    try:
        value = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            number = float("nan")
        value = int(number) if np.isfinite(number) and number == int(number) else 0
    if value <= 0:
        raise FaceLensError(f"{MAX_PIXELS_ENV} must be a positive whole number of pixels, got {text!r}")
    return value, hint


def _megapixels(pixels: int) -> str:
    """120000000 → "120", 89478485 → "89.478485", 5000 → "0.005": never scientific notation."""
    return np.format_float_positional(pixels / 1e6, precision=6, trim="-")


def _check_pixels(size: tuple[int, int], label: str, limit: int, hint: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(label, f"image has {width}×{height} pixels")
    pixels = width * height
    if pixels > limit:
        raise ImageError(
            label,
            f"{width}×{height} = {_megapixels(pixels)} megapixels exceeds the limit of "
            f"{_megapixels(limit)} ({hint})",
        )


@contextmanager
def _pil_bomb_guard(label: str, limit: int, hint: str) -> Iterator[list[warnings.WarningMessage]]:
    """Turn PIL's own decompression-bomb error into an ImageError and record the warnings PIL gives.

    Warnings are recorded rather than raised so that the caller can still report the image's
    width×height (see :func:`_refuse_if_pil_warned`); other warnings are passed on afterwards.
    Like every use of ``warnings.catch_warnings`` this briefly swaps process-wide state, so a warning
    from another thread may be recorded here; it is passed on all the same, never lost.
    """
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            yield caught
    except Image.DecompressionBombError as exc:
        raise ImageError(label, _pil_bomb_reason(str(exc), limit, hint)) from None
    finally:
        for w in caught:
            if not issubclass(w.category, Image.DecompressionBombWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _pil_bomb_reason(message: str, limit: int, hint: str) -> str:
    match = _PIL_PIXELS_RE.search(message)
    if match is None:
        return f"refused by PIL as a possible decompression bomb ({message})"
    pixels = int(match.group(1))
    if pixels > limit:
        return f"{_megapixels(pixels)} megapixels exceeds the limit of {_megapixels(limit)} ({hint})"
    return _pil_limit_reason(f"{_megapixels(pixels)} megapixels")


def _pil_limit_reason(what: str) -> str:
    pil_limit = Image.MAX_IMAGE_PIXELS or 0
    return (
        f"{what} exceeds PIL's decompression-bomb limit of {_megapixels(pil_limit)} megapixels "
        "(raise PIL.Image.MAX_IMAGE_PIXELS as well)"
    )


def _refuse_if_pil_warned(caught: list[warnings.WarningMessage], size: tuple[int, int], label: str) -> None:
    if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
        width, height = size
        pixels = f"{width}×{height} = {_megapixels(width * height)} megapixels"
        raise ImageError(label, _pil_limit_reason(pixels))


# ---------------------------------------------------------------------------------------------------
# files and bytes


@contextmanager
def _open_file(path: str | bytes, label: str) -> Iterator[io.BufferedReader]:
    """Open ``path`` for reading, naming the usual failures in words a user understands."""
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed by the with below; open errors need their own words
    except FileNotFoundError:
        raise ImageError(label, "file not found") from None
    except IsADirectoryError:
        raise ImageError(label, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageError(label, "permission denied") from None
    except OSError as exc:
        raise ImageError(label, f"cannot open file ({exc.strerror or exc})") from None
    with stream:
        try:
            info = os.fstat(stream.fileno())
        except OSError as exc:
            raise ImageError(label, f"cannot read file ({exc.strerror or exc})") from None
        if stat.S_ISREG(info.st_mode) and info.st_size == 0:
            raise ImageError(label, "empty file (0 bytes)")
        yield stream


def _decode_stream(stream: io.IOBase, label: str, limit: int, hint: str) -> np.ndarray:
    with _pil_bomb_guard(label, limit, hint) as pil_warnings:
        try:
            img = Image.open(stream, formats=_raster_formats())
        except UnidentifiedImageError:
            raise ImageError(label, _unidentified_reason(stream)) from None
        except Image.DecompressionBombError:
            raise
        except Exception as exc:  # PIL raises many types on malformed headers
            raise ImageError(label, _decode_reason(exc)) from None
        with img:
            _check_pixels(img.size, label, limit, hint)  # header only: nothing decoded yet
            _refuse_if_pil_warned(pil_warnings, img.size, label)
            _decode_fully(img, label)
            return _fresh(_pil_to_rgb(img, label), None)


def _raster_formats() -> list[str]:
    """Every format PIL knows except the vector ones, which PIL renders with outside programs.

    EPS is a PostScript program that PIL hands to Ghostscript, and WMF is drawn by the Windows GDI;
    a photo never needs either, and running an untrusted program is not what "load an image" means.
    """
    Image.init()
    return [name for name in Image.OPEN if name not in _VECTOR_FORMATS]


def _unidentified_reason(stream: io.IOBase) -> str:
    with contextlib.suppress(Exception):
        stream.seek(0)
        with Image.open(stream, formats=list(_VECTOR_FORMATS)) as vector:  # header only, nothing is run
            return f"{vector.format} is a vector format and is not read (it needs an outside renderer)"
    return "not an image file (PIL cannot identify it)"


def _decode_fully(img: Image.Image, label: str) -> None:
    """Decode every pixel of the current frame now, so damage shows up here as an ImageError."""
    try:
        img.load()
    except Image.DecompressionBombError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, EOFError... on bad data
        raise ImageError(label, _decode_reason(exc)) from None


def _decode_reason(exc: Exception) -> str:
    message = str(exc)
    if isinstance(exc, EOFError) or "truncated" in message.lower() or "broken data stream" in message:
        return "truncated image data"
    return f"corrupt image data ({type(exc).__name__}: {message or 'no details'})"


# ---------------------------------------------------------------------------------------------------
# PIL images


def _pil_to_rgb(img: Image.Image, label: str) -> np.ndarray:
    # a broken EXIF block does not make the pixels unreadable: keep them as stored
    with contextlib.suppress(Exception):
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in _PREMULTIPLIED_MODES:
        bands = np.stack([np.asarray(band) for band in img.split()], axis=-1).astype(np.int16)
        # premultiplied colour already holds colour×alpha, so white×(1 − alpha) is simply added
        return _gray_or_rgb(np.clip(bands[..., :-1] + (255 - bands[..., -1:]), 0, 255).astype(np.uint8))
    if mode.startswith("I;16"):
        raw = np.asarray(img)
        gray = (raw >> 8).astype(np.uint8)
        transparent = img.info.get("transparency")
        if isinstance(transparent, int):
            alpha = np.where(raw == transparent, 0, 255).astype(np.uint8)
            return _composite_on_white(_gray_or_rgb(gray), alpha[..., None])
        return _gray_or_rgb(gray)
    if mode == "I":
        return _gray_or_rgb(_wide_int_to_uint8(np.asarray(img)))
    if mode == "F":
        return _gray_or_rgb(_float_to_uint8(np.asarray(img), label, strict=False))
    try:
        if mode in _ALPHA_MODES or "transparency" in img.info:
            rgba = np.asarray(img.convert("RGBA"))
            return _composite_on_white(rgba[..., :3], rgba[..., 3:])
        return np.asarray(img.convert("RGB"))
    except ValueError as exc:
        raise ImageError(label, f"unsupported image mode {mode!r} ({exc})") from None


def _wide_int_to_uint8(values: np.ndarray) -> np.ndarray:
    lo, hi = int(values.min()), int(values.max())
    if lo >= 0 and hi <= 255:
        return values.astype(np.uint8)
    if lo >= 0 and hi <= 65535:
        return (values >> 8).astype(np.uint8)
    return _stretch(values.astype(np.float64), lo, hi)


def _stretch(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi == lo:
        return np.clip(values, 0, 255).astype(np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# arrays


def _array_to_rgb(arr: np.ndarray, label: str, limit: int, hint: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4) and arr.shape[0] in (1, 3, 4):
        raise ImageError(label, f"array shape {arr.shape} looks channel-first; transpose it to H×W×C")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 2, 3, 4))):
        expected = "H×W, H×W×1, H×W×2, H×W×3 or H×W×4"
        raise ImageError(label, f"unsupported array shape {arr.shape}; expected {expected}")
    _check_pixels((arr.shape[1], arr.shape[0]), label, limit, hint)
    values = _array_to_uint8(arr, label)
    if values.ndim == 2:
        values = values[..., None]
    channels = values.shape[-1]
    if channels in (2, 4):
        return _composite_on_white(_gray_or_rgb(values[..., :-1]), values[..., -1:])
    return _gray_or_rgb(values)


def _array_to_uint8(arr: np.ndarray, label: str) -> np.ndarray:
    kind = arr.dtype.kind
    if arr.dtype == np.uint8:
        return arr
    if kind == "b":
        return arr.astype(np.uint8) * np.uint8(255)
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    if kind in "iu":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ImageError(
                label, f"{arr.dtype} values span {lo}..{hi}; expected 0..255 (use uint16 for 16-bit data)"
            )
        return arr.astype(np.uint8)
    if kind == "f":
        return _float_to_uint8(arr, label, strict=True)
    raise ImageError(label, f"unsupported array dtype {arr.dtype}")


def _float_to_uint8(values: np.ndarray, label: str, *, strict: bool) -> np.ndarray:
    """Floats in [0, 1] or [0, 255]; out of range is an error for arrays (strict) and stretched for files."""
    values = values.astype(np.float32 if values.dtype.itemsize <= 4 else np.float64, copy=False)
    if not np.all(np.isfinite(values)):
        raise ImageError(label, "image contains NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0 and hi <= 1:
        return np.rint(values * 255).astype(np.uint8)
    if lo >= 0 and hi <= 255:
        return np.rint(values).astype(np.uint8)
    if strict:
        raise ImageError(label, f"float values span {lo:g}..{hi:g}; expected 0..1 or 0..255")
    return _stretch(values, lo, hi)


# ---------------------------------------------------------------------------------------------------
# shared


def _gray_or_rgb(values: np.ndarray) -> np.ndarray:
    """H×W or H×W×1 gray becomes H×W×3; H×W×3 passes through."""
    if values.ndim == 2:
        values = values[..., None]
    return np.repeat(values, 3, axis=-1) if values.shape[-1] == 1 else values


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``rgb·a + 255·(1 − a)`` in exact integer arithmetic, rounded half up."""
    a = alpha.astype(np.uint32)
    blended = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return blended.astype(np.uint8)


def _fresh(rgb: np.ndarray, original: np.ndarray | None) -> np.ndarray:
    """A writable C-contiguous uint8 array that shares no memory with the caller's input."""
    if original is not None and np.may_share_memory(rgb, original):
        return np.array(rgb, dtype=np.uint8, order="C", copy=True)
    return np.require(rgb, dtype=np.uint8, requirements=["C_CONTIGUOUS", "WRITEABLE", "OWNDATA"])
