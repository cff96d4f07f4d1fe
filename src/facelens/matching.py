"""Nearest-neighbour face matching with open-set rejection: the one matcher behind one-shot studies,
re-identification audits and the biometric gallery.

Scores follow one convention everywhere: **higher means more alike**. For ``metric="cosine"`` the score
is the cosine similarity; for ``metric="l2"`` it is the negated Euclidean distance, so that dlib's
published rule "same person when the distance is below 0.6" becomes "score above −0.6". Thresholds are
given in the metric's natural unit (a similarity for cosine, a distance for L2) and converted once here.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from .errors import FaceLensError

if TYPE_CHECKING:
    from .models.base import FaceModel

__all__ = ["Match", "Matcher", "pairwise_scores"]

Metric = Literal["cosine", "l2"]


def pairwise_scores(queries: np.ndarray, gallery: np.ndarray, metric: Metric = "l2") -> np.ndarray:
    """Q×G scores, higher = more alike (cosine similarity, or minus the L2 distance)."""
    q = np.atleast_2d(np.asarray(queries, np.float64))
    g = np.atleast_2d(np.asarray(gallery, np.float64))
    if q.shape[1] != g.shape[1]:
        raise FaceLensError(f"embedding sizes differ: queries have {q.shape[1]}, the gallery {g.shape[1]}")
    if metric == "cosine":
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        return qn @ gn.T
    if metric == "l2":
        d2 = (q * q).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2.0 * q @ g.T
        return -np.sqrt(np.maximum(d2, 0.0))
    raise FaceLensError(f"unknown metric {metric!r}; use 'cosine' or 'l2'")


@dataclass(frozen=True)
class Match:
    """The best gallery entry for one query; ``label`` is None when rejected (open set)."""

    label: Hashable | None
    nearest: Hashable
    score: float
    accepted: bool
    index: int

    @property
    def distance(self) -> float:
        """For L2 matchers, the Euclidean distance (scores are negated distances)."""
        return -self.score


class Matcher:
    """A gallery of labelled embeddings; identifies queries by their nearest neighbour.

    >>> import numpy as np
    >>> m = Matcher(metric="l2", threshold=0.6)
    >>> m.enroll(["ann", "bob"], np.array([[0.0, 0.0], [1.0, 0.0]]))
    >>> [(r.label, r.accepted) for r in m.identify(np.array([[0.1, 0.0], [5.0, 5.0]]))]
    [('ann', True), (None, False)]
    """

    def __init__(self, metric: Metric = "l2", threshold: float | None = None) -> None:
        if metric not in ("cosine", "l2"):
            raise FaceLensError(f"unknown metric {metric!r}; use 'cosine' or 'l2'")
        self.metric: Metric = metric
        self.threshold = threshold
        self.labels: list[Hashable] = []
        self._embeddings: np.ndarray | None = None

    @classmethod
    def for_model(cls, model: FaceModel, metric: Metric | None = None) -> Matcher:
        """A matcher with the model's own calibrated threshold (L2, as dlib publishes it) when it has one."""
        if metric in (None, "l2") and model.match_threshold is not None:
            return cls("l2", model.match_threshold)
        return cls(metric or "cosine", None)

    @property
    def score_threshold(self) -> float | None:
        """The threshold on the score scale (higher = more alike)."""
        if self.threshold is None:
            return None
        return -float(self.threshold) if self.metric == "l2" else float(self.threshold)

    @property
    def embeddings(self) -> np.ndarray:
        if self._embeddings is None:
            raise FaceLensError("the gallery is empty: enroll at least one face first")
        return self._embeddings

    def __len__(self) -> int:
        return len(self.labels)

    def enroll(self, labels: Sequence[Hashable], embeddings: np.ndarray) -> None:
        emb = np.atleast_2d(np.asarray(embeddings, np.float64))
        if len(labels) != len(emb):
            raise FaceLensError(f"{len(labels)} labels for {len(emb)} embeddings")
        if self._embeddings is not None and emb.shape[1] != self._embeddings.shape[1]:
            raise FaceLensError(f"embedding size {emb.shape[1]} differs from the gallery's {self._embeddings.shape[1]}")
        self._embeddings = emb if self._embeddings is None else np.vstack([self._embeddings, emb])
        self.labels.extend(labels)

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """Q×G scores against every enrolled embedding (higher = more alike)."""
        return pairwise_scores(queries, self.embeddings, self.metric)

    def identify(self, queries: np.ndarray) -> list[Match]:
        """The nearest enrolled face of each query; rejected when below the threshold (if one is set)."""
        s = self.scores(queries)
        best = s.argmax(axis=1)
        thr = self.score_threshold
        out = []
        for i, j in enumerate(best):
            score = float(s[i, j])
            accepted = thr is None or score >= thr
            out.append(Match(self.labels[j] if accepted else None, self.labels[j], score, accepted, int(j)))
        return out

    def rank1(self, queries: np.ndarray, truth: Sequence[Hashable]) -> float:
        """Closed-set rank-1 accuracy: the share of queries whose nearest neighbour has the true label."""
        matches = self.identify(queries)
        if not matches:
            return float("nan")
        return float(np.mean([m.nearest == t for m, t in zip(matches, truth, strict=True)]))
