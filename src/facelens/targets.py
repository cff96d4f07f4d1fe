"""Targets: what an explanation explains, as a callable giving one scalar per image.

A target takes the network's output (logits or embeddings), shaped ``(N, D)`` or
``(D,)``, and returns ``(N,)`` (or a 0-d tensor). Methods never know whether they
explain a class or a match, the same way pytorch-grad-cam's targets work; our
targets can be passed to pytorch-grad-cam directly.

Example:
    >>> import torch
    >>> t = Similarity(torch.tensor([1.0, 0.0]))
    >>> t(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    tensor([1., 0.])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from .errors import ModelError

if TYPE_CHECKING:
    from .models.cohort import Cohort

__all__ = [
    "RECOGNIZER_TARGETS",
    "ClassScore",
    "CohortSimilarity",
    "Contrastive",
    "GallerySimilarity",
    "Similarity",
    "Target",
    "ThresholdMargin",
    "UserTarget",
    "as_target",
    "probability_target",
]

#: the named recognizer targets (``target=`` in the API, ``--target`` on the command line)
RECOGNIZER_TARGETS = ("cohort", "projection", "cosine", "margin")

Metric = Literal["cosine", "neg_l2", "dot"]


def _as_2d(out: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (out.unsqueeze(0), True) if out.dim() == 1 else (out.flatten(1), False)


def _matrix(v: np.ndarray | torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
    t = v.detach().clone() if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v, np.float32))
    t = t.float()
    return t.reshape(-1, t.shape[-1])


def _vec(v: np.ndarray | torch.Tensor | Sequence[float]) -> torch.Tensor:
    t = v.detach().clone() if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v, np.float32))
    return t.float().flatten()


class Target(ABC):
    """Base class: a scalar per image, with a human description for reports."""

    kind: str = "target"

    @property
    def unit(self) -> str:
        """What one unit of the score means, for every number shown beside it."""
        return "target units"

    @property
    def impostor_level(self) -> float | None:
        """The median score of a different person's face, where the target knows it (matchers)."""
        return None

    @abstractmethod
    def score(self, out: torch.Tensor) -> torch.Tensor:
        """Scores ``(N,)`` for outputs ``(N, D)``."""

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        batch, squeeze = _as_2d(out)
        s = self.score(batch)
        return s[0] if squeeze else s

    def describe(self) -> str:
        return self.kind

    def settings(self) -> dict[str, object]:
        return {"kind": self.kind, "description": self.describe(), "unit": self.unit}


@dataclass(eq=False)
class ClassScore(Target):
    """A classifier's class score: the logit (default; what gradient methods should explain)
    or the softmax probability."""

    index: int
    output: Literal["logit", "probability"] = "logit"
    name: str | None = None
    kind: str = field(default="class", init=False)

    def score(self, out: torch.Tensor) -> torch.Tensor:
        if self.index >= out.shape[1]:
            raise ModelError(f"class index {self.index} out of range for {out.shape[1]} outputs")
        if self.output == "probability":
            return torch.softmax(out, dim=1)[:, self.index]
        return out[:, self.index]

    def describe(self) -> str:
        label = self.name if self.name is not None else f"class {self.index}"
        return f"{self.output} of '{label}'"

    @property
    def unit(self) -> str:
        return "softmax probability" if self.output == "probability" else "logit"


@dataclass(eq=False)
class Similarity(Target):
    """Similarity of the embedding to a reference: why is A matched to B.

    ``cosine`` is scale-free; ``neg_l2`` is minus the Euclidean distance, the
    metric dlib's 0.6 threshold is set on; ``dot`` is the projection onto the unit
    reference direction. Explaining a face against its *own* embedding needs
    ``dot``: cosine and distance are at their optimum there, so their gradient is
    zero and gradient maps would show only numerical noise.
    """

    reference: torch.Tensor
    metric: Metric = "cosine"
    label: str = "reference"
    kind: str = field(default="similarity", init=False)

    def __post_init__(self) -> None:
        self.reference = _vec(self.reference)
        if self.metric not in ("cosine", "neg_l2", "dot"):
            raise ModelError(f"metric must be 'cosine', 'neg_l2' or 'dot', got {self.metric!r}")

    def score(self, out: torch.Tensor) -> torch.Tensor:
        ref = self.reference.to(out.dtype).to(out.device)
        if out.shape[1] != ref.numel():
            raise ModelError(f"reference has {ref.numel()} dims, the model outputs {out.shape[1]}")
        if self.metric == "cosine":
            return torch.nn.functional.cosine_similarity(out, ref.unsqueeze(0), dim=1, eps=1e-8)
        if self.metric == "dot":
            return out @ (ref / torch.linalg.vector_norm(ref).clamp_min(1e-12))
        return -torch.linalg.vector_norm(out - ref.unsqueeze(0), dim=1)

    def describe(self) -> str:
        return f"{self.metric} similarity to {self.label}"

    @property
    def unit(self) -> str:
        return {"cosine": "cosine", "dot": "projection (embedding units)",
                "neg_l2": "minus the L2 distance"}[self.metric]


class GallerySimilarity(Similarity):
    """Similarity to a gallery identity: the mean of its enrolled embeddings."""

    def __init__(self, embeddings: np.ndarray | torch.Tensor, metric: Metric = "cosine",
                 label: str = "gallery identity") -> None:
        emb = _matrix(embeddings)
        self.n_enrolled = int(emb.shape[0])
        super().__init__(emb.mean(0), metric, f"{label} (mean of {self.n_enrolled})")
        self.kind = "gallery"


@dataclass(eq=False)
class Contrastive(Target):
    """Mate minus non-mate similarity, as in contrastive and triplet Excitation Backprop:
    what makes this face match the mate *rather than* the non-mate(s)."""

    mate: torch.Tensor
    nonmates: torch.Tensor
    metric: Metric = "cosine"
    kind: str = field(default="contrastive", init=False)

    def __post_init__(self) -> None:
        self.mate = _vec(self.mate)
        self.nonmates = _matrix(self.nonmates).reshape(-1, self.mate.numel())
        self._mate_t = Similarity(self.mate, self.metric)
        self._non_t = [Similarity(n, self.metric) for n in self.nonmates]

    def score(self, out: torch.Tensor) -> torch.Tensor:
        non = torch.stack([t.score(out) for t in self._non_t]).mean(0)
        return self._mate_t.score(out) - non

    def describe(self) -> str:
        return f"{self.metric} similarity to mate minus mean over {len(self._non_t)} non-mate(s)"


class CohortSimilarity(Target):
    """Identity evidence in impostor standard deviations: why is this face (still) this person.

    ``z = (û·v − ū·v) / √(vᵀΣv)`` with ``û`` the probe's unit embedding, ``v = u_ref − ū`` the reference's
    direction away from the cohort's average face ``ū``, and ``Σ`` the cohort covariance (see
    :mod:`facelens.models.cohort`). The probe-side term ``û·ū`` removes the component every face shares
    (dlib: cosine 0.84 between strangers), so a perturbation that makes the face generic loses score;
    the reference-side scale puts an impostor at about 0 and the same person's other photo at about 4.6
    (dlib-resnet on FRL London). Against the face's own embedding the gradient is not zero, unlike
    cosine or distance to itself, so gradient methods can explain it.
    """

    def __init__(self, reference: np.ndarray | torch.Tensor | Sequence[float], cohort: Cohort,
                 label: str = "reference") -> None:
        ref = _vec(reference).double().numpy()
        v, mu, sd = cohort.reference_terms(ref)
        self.reference = torch.as_tensor(ref, dtype=torch.float32)
        self.cohort = cohort
        self.label = label
        self.kind = "cohort"
        #: ``v / σ``: the score is ``û · direction − offset``
        self.direction = torch.as_tensor(v / sd, dtype=torch.float32)
        #: ``ū · v / σ``, the impostor mean in the score's unit
        self.offset = float(mu / sd)

    def score(self, out: torch.Tensor) -> torch.Tensor:
        if out.shape[1] != self.direction.numel():
            raise ModelError(f"reference has {self.direction.numel()} dims, the model outputs {out.shape[1]}")
        unit = out / torch.linalg.vector_norm(out, dim=1, keepdim=True).clamp_min(1e-12)
        return unit @ self.direction.to(out.dtype).to(out.device) - self.offset

    def describe(self) -> str:
        return f"cohort z-score of the match to {self.label}"

    @property
    def unit(self) -> str:
        return f"impostor SDs (cohort of {self.cohort.n_identities} people)"

    @property
    def impostor_level(self) -> float | None:
        return self.cohort.impostor_quantiles.get("median")

    def settings(self) -> dict[str, object]:
        return {**super().settings(), "cohort": self.cohort.describe(),
                "impostor_quantiles": dict(self.cohort.impostor_quantiles),
                "genuine_quantiles": dict(self.cohort.genuine_quantiles)}


@dataclass(eq=False)
class ThresholdMargin(Target):
    """How far below the model's decision threshold the distance to the reference is: positive = a match.

    Zero gradient at the reference's own embedding (a distance is at its minimum there), so explain a
    face against *another* photo with it, not against itself.
    """

    reference: torch.Tensor
    threshold: float
    label: str = "reference"
    kind: str = field(default="margin", init=False)

    def __post_init__(self) -> None:
        self.reference = _vec(self.reference)

    def score(self, out: torch.Tensor) -> torch.Tensor:
        ref = self.reference.to(out.dtype).to(out.device)
        if out.shape[1] != ref.numel():
            raise ModelError(f"reference has {ref.numel()} dims, the model outputs {out.shape[1]}")
        return self.threshold - torch.linalg.vector_norm(out - ref.unsqueeze(0), dim=1)

    def describe(self) -> str:
        return f"margin below the {self.threshold:g} L2 threshold to {self.label}"

    @property
    def unit(self) -> str:
        return "L2 distance below the threshold"

    @property
    def impostor_level(self) -> float | None:
        return None


@dataclass(eq=False)
class UserTarget(Target):
    """Any callable mapping outputs ``(N, D)`` to scores ``(N,)``."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    label: str = "user target"
    kind: str = field(default="user", init=False)

    def score(self, out: torch.Tensor) -> torch.Tensor:
        s = self.fn(out)
        if s.dim() != 1 or s.shape[0] != out.shape[0]:
            raise ModelError(f"{self.label} must return one scalar per image, got shape {tuple(s.shape)}")
        return s

    def describe(self) -> str:
        return self.label


def probability_target(target: Target) -> Target:
    """A class score as a probability (others unchanged): curves and drops normalized by the unperturbed
    score need positive scores, which logits are not."""
    return ClassScore(target.index, "probability", target.name) if isinstance(target, ClassScore) else target


def as_target(obj: object) -> Target:
    """Accept a `Target` or a plain callable."""
    if isinstance(obj, Target):
        return obj
    if callable(obj):
        return UserTarget(obj, getattr(obj, "__name__", "user target"))
    raise ModelError(f"cannot use {type(obj).__name__} as a target")
