"""The range of a target: its value on the intact face, on the face fully removed, and for an impostor.

A faithfulness metric moves a score between the intact face and a face with everything removed; if the
two are close, every map "works" and none can be told apart (dlib-resnet's old default target kept
92 % of its value on a fully blurred chip). So every explanation and every evaluation states the range
its numbers live in:

* ``intact``: the target on the unperturbed input;
* ``deleted_blur`` / ``deleted_mean``: on the input fully blurred (σ = :data:`REMOVAL_BLUR_SIGMA` of
  the side) or replaced by its mean colour, the two fills the deletion metric uses;
* ``impostor``: the median score of another person's face (matchers with a cohort); None for a class
  score, which has no impostor.

Example:
    >>> import torch
    >>> from facelens.targets import ClassScore
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    >>> r = measure_range(net, torch.rand(2, 3, 8, 8), ClassScore(0))[0]
    >>> r.unit
    'logit'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..targets import Target
from .engine import DEFAULT_BATCH_SIZE, PerturbationEngine
from .perturbation import REMOVAL_BLUR_SIGMA, fill_image

__all__ = ["TargetRange", "mean_range", "measure_range"]


@dataclass(frozen=True)
class TargetRange:
    """One input's target levels, in the target's unit (see the module docstring)."""

    target: str
    kind: str
    unit: str
    intact: float
    deleted_blur: float
    deleted_mean: float
    impostor: float | None = None
    impostor_source: str = ""
    blur_sigma: float = REMOVAL_BLUR_SIGMA
    baseline: str = "blur"

    @property
    def deleted(self) -> float:
        """The level with everything removed by ``baseline`` (the deletion metric's default fill)."""
        return self.deleted_mean if self.baseline == "mean" else self.deleted_blur

    @property
    def span(self) -> float:
        """How far removing the face moves the score (intact minus the deleted level)."""
        return self.intact - self.deleted

    @property
    def removes_identity(self) -> bool | None:
        """Matchers: whether both deleted levels are at or below the impostor level (None without one)."""
        if self.impostor is None:
            return None
        return bool(max(self.deleted_blur, self.deleted_mean) <= self.impostor)

    def text(self, digits: int = 3) -> str:
        f = f"{{:.{digits}g}}"
        parts = [f"intact {f.format(self.intact)}", f"fully blurred {f.format(self.deleted_blur)}",
                 f"mean-filled {f.format(self.deleted_mean)}"]
        if self.impostor is not None:
            parts.append(f"impostor median {f.format(self.impostor)}")
        return f"{self.target} ({self.unit}): " + ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "kind": self.kind, "unit": self.unit, "intact": self.intact,
                "deleted_blur": self.deleted_blur, "deleted_mean": self.deleted_mean, "deleted": self.deleted,
                "impostor_median": self.impostor, "impostor_source": self.impostor_source,
                "blur_sigma": self.blur_sigma, "baseline": self.baseline, "removes_identity": self.removes_identity}


def measure_range(net: nn.Module, inputs: torch.Tensor, targets: Target | Sequence[Target], *,
                  blur_sigma: float = REMOVAL_BLUR_SIGMA, batch_size: int = DEFAULT_BATCH_SIZE,
                  baseline: str = "blur") -> list[TargetRange]:
    """The range of each input's target: three scored inputs each (intact, blurred, mean), on the same
    engine as the deletion metric, so its deleted levels are exactly a deletion curve's end points."""
    n = inputs.shape[0]
    tlist = [targets] * n if isinstance(targets, Target) else list(targets)
    if len(tlist) != n:
        raise ValueError(f"{len(tlist)} targets for {n} inputs")
    variants = torch.cat([inputs, fill_image(inputs, "blur", blur_sigma=blur_sigma), fill_image(inputs, "mean")])
    engine = PerturbationEngine(net, tlist, batch_size=batch_size, progress=False, desc="target range")
    scores = engine.run(3 * n, lambda a, b: variants[a:b], owners=lambda a, b: torch.arange(a, b) % n)
    levels = scores.double().cpu().numpy().reshape(3, n)
    result = []
    for i, t in enumerate(tlist):
        imp = t.impostor_level
        cohort = getattr(t, "cohort", None)
        source = (f"median over {cohort.impostor_quantiles.get('n_pairs', '?')} impostor pairs of the cohort "
                  f"({cohort.describe()})") if imp is not None and cohort is not None else ""
        result.append(TargetRange(t.describe(), t.kind, t.unit, float(levels[0, i]), float(levels[1, i]),
                                  float(levels[2, i]), None if imp is None else float(imp), source, blur_sigma,
                                  baseline))
    return result


def mean_range(ranges: Sequence[TargetRange]) -> dict[str, Any]:
    """The means over inputs of each level (what an evaluation reports), with how many inputs."""
    if not ranges:
        return {}
    imps = [r.impostor for r in ranges if r.impostor is not None]
    first = ranges[0]
    return {"name": first.kind, "description": first.target, "unit": first.unit, "n": len(ranges),
            "intact": float(np.mean([r.intact for r in ranges])),
            "deleted_blur": float(np.mean([r.deleted_blur for r in ranges])),
            "deleted_mean": float(np.mean([r.deleted_mean for r in ranges])),
            "deleted": float(np.mean([r.deleted for r in ranges])), "baseline": first.baseline,
            "impostor_median": float(np.mean(imps)) if imps else None,
            "impostor_source": first.impostor_source, "blur_sigma": first.blur_sigma}
