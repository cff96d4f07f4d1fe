"""Stateful metrics in the torchmetrics style: ``update`` per batch, ``compute`` at the end.

One code path serves one photo and a manifest of 100,000: a metric keeps only
small per-image numbers (curves, scores, hits), never the images or maps, so a
stream of batches passes through in bounded memory. Quantus's history of
per-image loops (Quantus #96, #350) is the cautionary tale.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any

__all__ = ["Metric"]


class Metric(ABC):
    """Base class: subclasses declare their states in ``__init__`` with `add_state`."""

    name: str = "metric"

    def __init__(self) -> None:
        self._defaults: dict[str, Any] = {}

    def add_state(self, name: str, default: Any) -> None:
        """A piece of state that `reset` restores (lists are for per-image rows)."""
        self._defaults[name] = default
        setattr(self, name, copy.deepcopy(default))

    def reset(self) -> None:
        for name, default in self._defaults.items():
            setattr(self, name, copy.deepcopy(default))

    def merge(self, other: Metric) -> None:
        """Fold another metric's state into this one (per-worker results in dataset runs)."""
        for name in self._defaults:
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, mine + theirs)

    @abstractmethod
    def update(self, *args: Any, **kwargs: Any) -> None:
        """Add a batch."""

    @abstractmethod
    def compute(self) -> dict[str, Any]:
        """The result so far, as plain numbers (JSON-ready)."""
