"""The gallery key: where it comes from, what is derived from it, and how rows are sealed with it.

Face embeddings are biometric data (GDPR Art. 9), so the gallery never stores one, nor a subject's name,
in the clear. One 256-bit master key, taken from ``FACELENS_GALLERY_KEY`` (base64) or a key file and
**never written to the database**, is stretched with HKDF into three independent sub-keys:

* an AES-256-GCM key that seals every personal value; each seal carries its own random 96-bit nonce and
  is bound (as associated data) to the table, column and subject it belongs to, so a ciphertext copied
  into another row fails to open instead of being read as someone else's face;
* an HMAC key for *subject references*: the database finds a person's rows by ``HMAC(key, subject)``,
  which names no one to a reader of the file without the key;
* an HMAC key for the audit log's hash chain, so the log cannot be rewritten consistently without it.

A *key-check value* (a known constant sealed with the key) sits in the database; opening a gallery
with another key fails on it with a clear :class:`GalleryKeyError`, before any row is read. AES-GCM is
used through the ``cryptography`` package; nothing here implements a cipher.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import FaceLensError

__all__ = ["KEY_ENV", "KEY_FILE_ENV", "GalleryKey", "GalleryKeyError", "generate_key", "resolve_key"]

KEY_ENV = "FACELENS_GALLERY_KEY"
KEY_FILE_ENV = "FACELENS_GALLERY_KEY_FILE"
_KEY_BYTES = 32
_NONCE_BYTES = 12
_CHECK_PLAINTEXT = b"facelens gallery key check v1"
_CHECK_AAD = b"facelens/meta/key_check"


class GalleryKeyError(FaceLensError):
    """No key, a malformed key, or the wrong key for this gallery."""


def generate_key() -> str:
    """A new random 256-bit key, base64 (URL-safe) encoded: the form the env var and key files hold."""
    return base64.urlsafe_b64encode(secrets.token_bytes(_KEY_BYTES)).decode("ascii")


def _decode(text: str, where: str) -> bytes:
    cleaned = text.strip()
    try:
        raw = base64.urlsafe_b64decode(cleaned.encode("ascii") + b"=" * (-len(cleaned) % 4))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raw = b""
    if len(raw) != _KEY_BYTES:
        raise GalleryKeyError(f"{where}: a gallery key is {_KEY_BYTES} random bytes in base64 "
                              "(make one with `facelens gallery keygen`)")
    return raw


def _read_key_file(path: Path) -> bytes:
    try:
        info = path.stat()
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise GalleryKeyError(f"{path}: key file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GalleryKeyError(f"{path}: cannot read key file ({exc})") from None
    if os.name == "posix" and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        # as ssh does for private keys: a key others can read protects nothing
        raise GalleryKeyError(f"{path}: key file is readable by other users (mode {stat.filemode(info.st_mode)}); "
                              f"run chmod 600 {path}")
    return _decode(text, str(path))


def resolve_key(key: str | bytes | None = None, key_file: str | os.PathLike | None = None) -> GalleryKey:
    """The gallery key from, in order: ``key`` (base64 text or 32 raw bytes), ``key_file``, the
    ``FACELENS_GALLERY_KEY`` environment variable, or the file named by ``FACELENS_GALLERY_KEY_FILE``."""
    if isinstance(key, bytes) and len(key) == _KEY_BYTES:
        return GalleryKey(key)
    if key is not None:
        text = key.decode("ascii", "replace") if isinstance(key, bytes) else key
        return GalleryKey(_decode(text, "the given key"))
    if key_file is not None:
        return GalleryKey(_read_key_file(Path(key_file)))
    if os.environ.get(KEY_ENV):
        return GalleryKey(_decode(os.environ[KEY_ENV], f"${KEY_ENV}"))
    if os.environ.get(KEY_FILE_ENV):
        return GalleryKey(_read_key_file(Path(os.environ[KEY_FILE_ENV])))
    raise GalleryKeyError(f"no gallery key: set ${KEY_ENV} (base64) or ${KEY_FILE_ENV}, or pass a key file; "
                          "`facelens gallery keygen` makes one")


class GalleryKey:
    """A master key and the sub-keys derived from it (see the module docstring)."""

    def __init__(self, master: bytes) -> None:
        if len(master) != _KEY_BYTES:
            raise GalleryKeyError(f"a gallery key is {_KEY_BYTES} bytes, got {len(master)}")
        self._aead = AESGCM(self._derive(master, b"facelens-gallery/aes-gcm"))
        self._ref_key = self._derive(master, b"facelens-gallery/subject-ref")
        self._chain_key = self._derive(master, b"facelens-gallery/audit-chain")

    @staticmethod
    def _derive(master: bytes, info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=info).derive(master)

    def __repr__(self) -> str:  # never print key material
        return "GalleryKey(<secret>)"

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """``nonce ‖ AES-GCM(plaintext)``, authenticated together with ``aad``."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes, *, what: str = "a gallery value") -> bytes:
        """The plaintext of a seal; :class:`GalleryKeyError` if the key or the context does not match."""
        try:
            return self._aead.decrypt(bytes(blob[:_NONCE_BYTES]), bytes(blob[_NONCE_BYTES:]), aad)
        except (InvalidTag, ValueError):
            raise GalleryKeyError(f"cannot decrypt {what}: wrong key, or the value was altered or moved") from None

    def subject_ref(self, subject: str) -> str:
        """A stable pseudonym of ``subject`` (hex HMAC-SHA256): finds a person's rows without naming them."""
        return hmac.new(self._ref_key, subject.encode("utf-8"), hashlib.sha256).hexdigest()

    def chain(self, previous: str, entry: bytes) -> str:
        """The next link of the audit log's chain: ``HMAC(chain key, previous ‖ entry)``."""
        return hmac.new(self._chain_key, previous.encode("ascii") + b"\n" + entry, hashlib.sha256).hexdigest()

    def check_value(self) -> bytes:
        """A sealed constant for the database: lets :meth:`verify_check_value` recognise a wrong key."""
        return self.seal(_CHECK_PLAINTEXT, _CHECK_AAD)

    def verify_check_value(self, blob: bytes, where: str) -> None:
        try:
            ok = self.open(blob, _CHECK_AAD) == _CHECK_PLAINTEXT
        except GalleryKeyError:
            ok = False
        if not ok:
            raise GalleryKeyError(f"{where}: wrong gallery key (the key check value does not open with it); "
                                  "this gallery was created with a different key")
