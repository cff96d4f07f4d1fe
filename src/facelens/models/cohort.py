"""Cohort statistics of a recognizer: what "an impostor" looks like, so a match score has a unit.

dlib's embeddings share a large common component: two different people have cosine ≈ 0.84, and a
face blurred beyond recognition still keeps 92 % of its projection onto its own embedding. A raw
similarity therefore has almost no range, and a faithfulness metric on it measures nothing. A cohort
(embeddings of many other people) fixes the unit:

* the **cohort mean** ``ū`` (of unit-length embeddings) is the average face; subtracting the probe's
  similarity to it removes the common component (probe-side, as T-norm does);
* the **cohort covariance** ``Σ`` gives, for any reference, the spread of that centred score over
  impostors (reference-side, as Z-norm does), so scores are in impostor standard deviations.

For a reference ``r`` (unit ``u_r``) and a probe embedding ``e`` (unit ``û``), with ``v = u_r − ū``:
``z = (û·v − ū·v) / √(vᵀ Σ v)``. An impostor scores about 0 by construction (the measured median is
in :attr:`Cohort.impostor_quantiles`); the face itself scores ``|v|² / √(vᵀ Σ v)``. Only the mean,
the covariance and pooled score quantiles are kept, never an individual's embedding: the shipped file
holds no biometric template.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> emb = rng.normal(size=(40, 8)) + 3.0
    >>> c = cohort_from_embeddings("toy", emb, [str(i // 2) for i in range(40)])
    >>> (c.n_photos, c.n_identities, abs(c.impostor_quantiles["median"]) < 0.5)
    (40, 20, True)
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError

__all__ = ["COHORT_DIR", "Cohort", "cohort_from_embeddings", "load_cohort", "read_cohort", "save_cohort"]

COHORT_DIR = Path(__file__).resolve().parents[1] / "data"
_MIN_SD = 1e-6


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True, eq=False)
class Cohort:
    """Mean and covariance of a cohort's unit embeddings, with the quantiles of its z-scores."""

    model: str
    mean: np.ndarray
    cov: np.ndarray
    n_photos: int
    n_identities: int
    impostor_quantiles: dict[str, float] = field(default_factory=dict)
    genuine_quantiles: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        d = self.mean.shape[0]
        if self.mean.ndim != 1 or self.cov.shape != (d, d):
            raise ModelError(f"cohort of {self.model}: mean {self.mean.shape} and covariance {self.cov.shape} differ")

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def reference_terms(self, reference: np.ndarray) -> tuple[np.ndarray, float, float]:
        """``(v, μ, σ)`` for a reference embedding: direction, impostor mean and impostor SD of ``û·v``."""
        u = _unit(np.asarray(reference, np.float64).ravel())
        if u.shape[0] != self.dim:
            raise ModelError(f"reference has {u.shape[0]} dims, the {self.model} cohort {self.dim}")
        v = u - self.mean
        sd = float(np.sqrt(max(float(v @ self.cov @ v), 0.0)))
        return v, float(self.mean @ v), max(sd, _MIN_SD)

    def z(self, probes: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """Cohort z-scores of probe embeddings ``(N, D)`` against one reference."""
        v, mu, sd = self.reference_terms(reference)
        return (_unit(np.atleast_2d(probes)) @ v - mu) / sd

    def describe(self) -> str:
        datasets = self.provenance.get("datasets")
        src = ", ".join(datasets) if datasets else self.provenance.get("source", "user-supplied embeddings")
        return f"{self.n_identities} people ({self.n_photos} photos) of {src}"

    def summary(self) -> dict[str, Any]:
        return {"model": self.model, "n_photos": self.n_photos, "n_identities": self.n_identities,
                "impostor_quantiles": self.impostor_quantiles, "genuine_quantiles": self.genuine_quantiles,
                "provenance": {k: v for k, v in self.provenance.items() if k != "photos"}}


def _quantiles(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {}
    q = np.quantile(x, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"q05": float(q[0]), "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]),
            "q95": float(q[4]), "n_pairs": len(x)}


def cohort_from_embeddings(model: str, embeddings: np.ndarray, identities: Sequence[str], *,
                           provenance: dict[str, Any] | None = None) -> Cohort:
    """Cohort statistics from embeddings and their identities (each identity weighs the same).

    The quantiles are measured on the cohort itself: every photo against every photo of another
    identity (impostors) and of the same identity (genuine pairs).
    """
    e = np.asarray(embeddings, np.float64)
    ids = np.asarray([str(i) for i in identities], dtype=object)
    if e.ndim != 2 or len(e) != len(ids):
        raise ModelError(f"need N×D embeddings and N identities, got {e.shape} and {len(ids)}")
    uniq, inv, counts = np.unique(ids.astype(str), return_inverse=True, return_counts=True)
    if len(uniq) < 3:
        raise ModelError(f"a cohort needs at least 3 identities, got {len(uniq)}")
    u = _unit(e)
    w = 1.0 / counts[inv]
    mean = (w[:, None] * u).sum(0) / w.sum()
    cov = np.cov(u.T, aweights=w)
    cohort = Cohort(model, mean, cov, len(e), len(uniq), provenance=dict(provenance or {}))
    imp, gen = [], []
    for i in range(len(u)):
        z = cohort.z(u, u[i])
        same = inv == inv[i]
        imp.append(z[~same])
        gen.append(z[same & (np.arange(len(u)) != i)])
    return Cohort(model, mean, cov, len(e), len(uniq), _quantiles(np.concatenate(imp)),
                  _quantiles(np.concatenate(gen)), dict(provenance or {}))


def _path(model: str) -> Path:
    return COHORT_DIR / f"cohort_{model}.npz"


def save_cohort(cohort: Cohort, path: str | os.PathLike | None = None) -> Path:
    """Write the statistics (no individual embedding) as ``.npz`` with a JSON header of provenance."""
    from ..outputs import atomic_write_bytes

    meta = {"model": cohort.model, "n_photos": cohort.n_photos, "n_identities": cohort.n_identities,
            "impostor_quantiles": cohort.impostor_quantiles, "genuine_quantiles": cohort.genuine_quantiles,
            "provenance": cohort.provenance}
    buf = io.BytesIO()
    np.savez(buf, mean=cohort.mean.astype(np.float64), cov=cohort.cov.astype(np.float64),
             meta=np.array(json.dumps(meta, sort_keys=True)))
    target = Path(path) if path is not None else _path(cohort.model)
    return atomic_write_bytes(target, buf.getvalue())


def read_cohort(path: str | os.PathLike) -> Cohort:
    """Read a cohort file written by :func:`save_cohort` (no pickled objects are accepted)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            mean, cov = np.asarray(data["mean"], np.float64), np.asarray(data["cov"], np.float64)
    except (OSError, KeyError, ValueError) as exc:
        raise ModelError(f"{path}: not a facelens cohort file ({exc})") from exc
    return Cohort(meta["model"], mean, cov, int(meta["n_photos"]), int(meta["n_identities"]),
                  dict(meta.get("impostor_quantiles", {})), dict(meta.get("genuine_quantiles", {})),
                  dict(meta.get("provenance", {})))


@lru_cache(maxsize=8)
def load_cohort(model: str) -> Cohort | None:
    """The cohort shipped with facelens for a zoo recognizer, or None when there is none."""
    path = _path(model)
    return read_cohort(path) if path.is_file() else None
