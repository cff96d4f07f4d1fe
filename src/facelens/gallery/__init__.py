"""A biometric face gallery that respects GDPR: encrypted at rest, consent-bound, forgettable, audited.

See :mod:`.store` for what the SQLite file holds and how erasure works, :mod:`.crypto` for the key and
:mod:`.consent` for the consent record. The package imports no torch: identification works on stored
embeddings; computing one from a photo is the caller's (or the CLI's) job.
"""

from .consent import LEGAL_BASES, Consent, ConsentError
from .crypto import KEY_ENV, KEY_FILE_ENV, GalleryKey, GalleryKeyError, generate_key, resolve_key
from .store import SCRUB_WAIT_S, AuditEntry, ForgetResult, Gallery, GalleryError, Identification

__all__ = [
    "KEY_ENV",
    "KEY_FILE_ENV",
    "LEGAL_BASES",
    "SCRUB_WAIT_S",
    "AuditEntry",
    "Consent",
    "ConsentError",
    "ForgetResult",
    "Gallery",
    "GalleryError",
    "GalleryKey",
    "GalleryKeyError",
    "Identification",
    "generate_key",
    "resolve_key",
]
