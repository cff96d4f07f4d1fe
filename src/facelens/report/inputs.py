"""The report's inputs: user photos (each checked, the bad ones named) or the embedded portraits."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import FaceLensError
from ..image import load_image

__all__ = ["InputPhoto", "load_inputs"]


@dataclass
class InputPhoto:
    """One input: its name, where it came from, its pixels (None when it could not be used) and why."""

    name: str
    source: str
    image: np.ndarray | None
    credit: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.image is not None

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "source": self.source, "ok": self.ok}
        if self.image is not None:
            out["size"] = [int(self.image.shape[1]), int(self.image.shape[0])]
        if self.credit:
            out["credit"] = self.credit
        if self.error:
            out["error"] = self.error
        return out


def _unique(name: str, taken: set[str]) -> str:
    base, k = name, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def load_inputs(images: Sequence[str | os.PathLike] | None) -> list[InputPhoto]:
    """Load every photo; a bad one becomes an entry with its error instead of stopping the report.

    With no images, the two embedded public-domain portraits are used.
    """
    if not images:
        from ..portraits import default_portraits

        return [InputPhoto(p.name, "embedded", p.image, p.credit) for p in default_portraits()]
    taken: set[str] = set()
    out = []
    for src in images:
        path = os.fspath(src)
        name = _unique(os.path.splitext(os.path.basename(path))[0] or "image", taken)
        try:
            out.append(InputPhoto(name, path, load_image(path)))
        except FaceLensError as exc:
            out.append(InputPhoto(name, path, None, error=str(exc)))
    return out
