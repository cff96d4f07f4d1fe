"""The exceptions facelens raises on purpose.

Every error a user can cause (a bad photo, no face, missing weights) derives
from :class:`FaceLensError`, so the CLI can print one line and exit non-zero
while real bugs still surface as tracebacks.
"""

from __future__ import annotations

__all__ = ["FaceLensError", "ImageError", "ModelError", "NoFaceError", "WeightsError"]


class FaceLensError(Exception):
    """Base class for every error facelens raises deliberately."""


class ImageError(FaceLensError):
    """An input could not be read as an image.

    ``source`` names the file (or ``<bytes>``, ``<array>``...) and ``reason`` says
    what was wrong, so a batch job can report the bad file and carry on.
    """

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


class NoFaceError(FaceLensError):
    """An image was read, but no usable face was found in it."""

    def __init__(self, source: str, reason: str = "no face found") -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


class WeightsError(FaceLensError):
    """Model weights could not be found, fetched or verified."""


class ModelError(FaceLensError):
    """A model name, option or input does not fit the model."""
