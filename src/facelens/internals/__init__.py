"""Inside the network: filter visualization, filter statistics, feature inversion and concepts.

Names are imported lazily, so ``import facelens.internals.priors`` (used by several modules) does not
pull in matplotlib or scipy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AMSettings": "activation_max",
    "ActivationMaxResult": "activation_max",
    "Unit": "activation_max",
    "maximize": "activation_max",
    "visualize_depths": "activation_max",
    "FilterStats": "filter_stats",
    "LayerStats": "filter_stats",
    "filter_stats": "filter_stats",
    "depth_verdicts": "filter_stats",
    "DatasetView": "dataset_view",
    "dataset_view": "dataset_view",
    "receptive_fields": "receptive_field",
    "FiltersResult": "filters",
    "filters_report": "filters",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'facelens.internals' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
