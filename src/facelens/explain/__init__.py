"""Saliency methods for class scores and face matches, under one `explain()` call.

The package itself is callable: ``facelens.explain(model, image, method=...)`` is
`explain`, while ``facelens.explain.face``, ``facelens.explain.api`` and the other
submodules import as usual. (Binding the function over the package name instead
would break ``import facelens.explain.face as f``.)
"""

import sys
import types

from .api import explain, explain_methods, get_method, list_methods, resolve_target
from .explanation import Explanation, RegionAttention

__all__ = ["Explanation", "RegionAttention", "explain", "explain_methods", "get_method", "list_methods",
           "resolve_target"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: object, **kwargs: object) -> Explanation:
        return explain(*args, **kwargs)  # type: ignore[arg-type]

    __call__.__doc__ = explain.__doc__


sys.modules[__name__].__class__ = _CallablePackage
