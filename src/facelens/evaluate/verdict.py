"""The one verdict rule: a claim is *supported*, *not supported* or *inconclusive*, read off an interval.

A claim says that a quantity lies above (or below) a stated threshold: "occlusion's deletion AUC is below
the random map's" (the paired difference is below 0), "the map changes when the weights are randomized"
(its rank correlation with the trained map is below 0.5), "the masked photos are still re-identified"
(rank-1 is above chance plus a margin). The rule, used by evaluate, the sanity checks, every study, the
export table and the report:

* **inconclusive** when the estimate rests on fewer than ``min_n`` independent units, has no interval,
  or comes from a self-test illustration, or when its interval contains the threshold;
* **supported** when the whole interval lies on the claimed side of the threshold;
* **not supported** when the whole interval lies on the other side.

Nothing else writes a verdict: a sentence beside a number is built from a :class:`Verdict`, so the
words cannot say more than the interval.

Example:
    >>> from facelens.evaluate.stats import Estimate
    >>> decide("AUC is below random", Estimate(-0.08, -0.12, -0.05, 12, 12), 0.0, direction="below").status
    'supported'
    >>> decide("AUC is below random", Estimate(-0.08, -0.12, -0.05, 4, 4), 0.0, direction="below").status
    'inconclusive'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .stats import Estimate

__all__ = ["MIN_N", "Status", "Verdict", "decide", "sanity_word"]

Status = Literal["supported", "not supported", "inconclusive"]
Direction = Literal["above", "below"]
#: the fewest independent units (photos, people) on which any verdict is given
MIN_N = 8


@dataclass(frozen=True)
class Verdict:
    """A claim, the estimate it rests on, the threshold, and the status the rule gives."""

    claim: str
    status: Status
    estimate: Estimate
    threshold: float
    direction: Direction
    reason: str
    min_n: int = MIN_N
    unit: str = "photos"

    @property
    def supported(self) -> bool:
        return self.status == "supported"

    def sentence(self, digits: int = 3) -> str:
        """One line an auditor reads: claim, status, value with interval and n, and why."""
        e = self.estimate
        return (f"{self.claim}: {self.status} — {e.text(digits)} ({100 * e.ci:.4g}% interval), "
                f"n = {e.n_clusters} {self.unit}; {self.reason}.")

    def as_dict(self) -> dict[str, Any]:
        return {"claim": self.claim, "status": self.status, "threshold": self.threshold,
                "direction": self.direction, "min_n": self.min_n, "unit": self.unit, "reason": self.reason,
                **self.estimate.as_dict()}


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def decide(claim: str, estimate: Estimate, threshold: float, *, direction: Direction = "above",
           min_n: int = MIN_N, unit: str = "photos", illustration: bool = False) -> Verdict:
    """Apply the rule (module docstring) to the claim "the quantity is ``direction`` ``threshold``"."""
    if direction not in ("above", "below"):
        raise ValueError(f"direction must be 'above' or 'below', got {direction!r}")
    e, t = estimate, float(threshold)
    side = "above" if direction == "above" else "below"
    other = "below" if direction == "above" else "above"

    def verdict(status: Status, reason: str) -> Verdict:
        return Verdict(claim, status, e, t, direction, reason, int(min_n), unit)

    if illustration:
        return verdict("inconclusive", "a self-test illustration without a manifest gives no verdict")
    if e.n_clusters < min_n:
        return verdict("inconclusive", f"fewer than {min_n} {unit}, the least this tool decides on")
    if not e.finite:
        return verdict("inconclusive", "the data give no interval")
    lo, hi = float(e.lo), float(e.hi)
    if (direction == "above" and lo > t) or (direction == "below" and hi < t):
        return verdict("supported", f"the whole interval is {side} {_fmt(t)}")
    if (direction == "above" and hi <= t) or (direction == "below" and lo >= t):
        return verdict("not supported", f"the whole interval is {other} {_fmt(t)}")
    return verdict("inconclusive", f"the interval contains {_fmt(t)}")


def sanity_word(verdict: Verdict) -> str:
    """A sanity check's pass / fail / inconclusive for the claim "the map changes" (similarity below threshold)."""
    return {"supported": "pass", "not supported": "fail"}.get(verdict.status, "inconclusive")
