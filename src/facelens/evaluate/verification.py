"""Verification and identification rates from similarity scores: ROC, TAR at a fixed FAR, EER, rank-k.

Scores are "higher = more alike" (see :mod:`facelens.matching`). A TAR at FAR = 1e-3 needs at least
1,000 impostor comparisons to mean anything; with fewer, :func:`tar_at_far` returns NaN and
:attr:`VerificationRates.resolvable` says so, rather than reporting a number the data cannot support.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["VerificationRates", "rank_k", "rates_at_threshold", "roc", "tar_at_far", "verification_rates"]


def roc(genuine: np.ndarray, impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(far, tar, thresholds) over every distinct score, from sklearn's ``roc_curve``."""
    from sklearn.metrics import roc_curve

    g = np.asarray(genuine, np.float64).ravel()
    i = np.asarray(impostor, np.float64).ravel()
    y = np.r_[np.ones(len(g)), np.zeros(len(i))]
    far, tar, thr = roc_curve(y, np.r_[g, i], drop_intermediate=False)
    return far, tar, thr


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float) -> float:
    """The genuine accept rate at the strictest threshold whose impostor accept rate is ≤ ``far``.

    NaN when there are fewer than ``1/far`` impostor scores: the rate would not be resolvable.
    """
    g = np.asarray(genuine, np.float64).ravel()
    i = np.sort(np.asarray(impostor, np.float64).ravel())
    if len(g) == 0 or len(i) == 0 or len(i) * far < 1:
        return float("nan")
    allowed = int(np.floor(far * len(i)))  # impostors that may be accepted
    threshold = i[len(i) - allowed - 1]  # accept strictly above the (allowed+1)-th highest impostor
    return float(np.mean(g > threshold))


def rates_at_threshold(genuine: np.ndarray, impostor: np.ndarray, score_threshold: float) -> tuple[float, float]:
    """(TAR, FAR) when accepting scores ≥ ``score_threshold``; FNMR = 1 − TAR, FMR = FAR."""
    g = np.asarray(genuine, np.float64).ravel()
    i = np.asarray(impostor, np.float64).ravel()
    tar = float(np.mean(g >= score_threshold)) if len(g) else float("nan")
    far = float(np.mean(i >= score_threshold)) if len(i) else float("nan")
    return tar, far


@dataclass(frozen=True)
class VerificationRates:
    """Summary of genuine vs impostor scores; NaN marks a rate the sample cannot resolve."""

    n_genuine: int
    n_impostor: int
    auc: float
    eer: float
    tar_at_far: dict[float, float] = field(default_factory=dict)
    threshold: float | None = None
    tar_at_threshold: float | None = None
    far_at_threshold: float | None = None

    @property
    def resolvable(self) -> dict[float, bool]:
        return {f: self.n_impostor * f >= 1 for f in self.tar_at_far}

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"n_genuine": self.n_genuine, "n_impostor": self.n_impostor,
                                  "auc": self.auc, "eer": self.eer}
        for f, v in self.tar_at_far.items():
            out[f"tar_at_far_{f:g}"] = v
        if self.threshold is not None:
            out.update(threshold=self.threshold, tar_at_threshold=self.tar_at_threshold,
                       far_at_threshold=self.far_at_threshold)
        return out


def verification_rates(genuine: np.ndarray, impostor: np.ndarray, *, fars: Sequence[float] = (1e-2, 1e-3),
                       score_threshold: float | None = None) -> VerificationRates:
    """AUC, EER, TAR at each FAR, and TAR/FAR at a given threshold (e.g. the model's own)."""
    g = np.asarray(genuine, np.float64).ravel()
    i = np.asarray(impostor, np.float64).ravel()
    if len(g) and len(i):
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(np.r_[np.ones(len(g)), np.zeros(len(i))], np.r_[g, i]))
        far, tar, _ = roc(g, i)
        frr = 1.0 - tar
        k = int(np.argmin(np.abs(far - frr)))
        eer = float((far[k] + frr[k]) / 2)
    else:
        auc = eer = float("nan")
    tars = {float(f): tar_at_far(g, i, f) for f in fars}
    if score_threshold is None:
        return VerificationRates(len(g), len(i), auc, eer, tars)
    t_rate, f_rate = rates_at_threshold(g, i, score_threshold)
    return VerificationRates(len(g), len(i), auc, eer, tars, float(score_threshold), t_rate, f_rate)


def rank_k(scores: np.ndarray, probe_labels: Sequence[Hashable], gallery_labels: Sequence[Hashable],
           k: int = 1) -> float:
    """Closed-set identification rate: the share of probes whose true identity is among the top ``k``."""
    s = np.asarray(scores, np.float64)
    if s.size == 0:
        return float("nan")
    gl = np.asarray(gallery_labels, dtype=object)
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    hits = [p in set(gl[row]) for p, row in zip(probe_labels, top, strict=True)]
    return float(np.mean(hits))
