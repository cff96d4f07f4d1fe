"""`FaceModel`: a torch module plus everything needed to feed and explain it.

The network inside a `FaceModel` always takes float RGB chips in ``[0, 1]``,
shaped ``N×3×H×W``, and does its own normalization. Explanations therefore
live in pixel space for every model, whatever its original preprocessing.
Classifiers return logits (the softmax is applied by :meth:`FaceModel.predict`),
recognizers return their raw embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..faces.align import AlignRecipe, Chip, align
from ..faces.detect import Face, pick_face
from ..image import ImageSource, load_image, source_name

if TYPE_CHECKING:
    from .cohort import Cohort

__all__ = ["FaceModel", "Task"]

Task = Literal["embedding", "classification"]
FUSED_MIN_CHIPS = 16  # calls this large repay building the fused copy once (see models/fuse.py)


@dataclass
class FaceModel:
    """A face (or any image) model with its preprocessing, alignment and named layers.

    Example:
        >>> import torch
        >>> from facelens import wrap
        >>> m = wrap(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
        ...          torch.nn.Flatten(), torch.nn.Linear(4, 2)), task="classification",
        ...          input_size=(32, 32), class_names=["a", "b"], align=None)
        >>> m.task, m.input_size
        ('classification', (32, 32))
    """

    name: str
    task: Task
    net: nn.Module
    input_size: tuple[int, int]
    recipe: AlignRecipe
    class_names: list[str] | None = None
    layers: dict[str, str] = field(default_factory=dict)
    preprocessing: str = "RGB in [0, 1]"
    license: str = "unknown"
    source: str = "user"
    match_threshold: float | None = None
    description: str = ""
    #: recognizers: the statistics of other people's embeddings that give match scores a unit
    #: (:mod:`facelens.models.cohort`); None when the model ships none and the user gave none
    cohort: Cohort | None = None
    #: user files (:mod:`facelens.models.user_file`): format, path, sha256, preset and the conversion's parity
    #: figure, so reports can say exactly which network they explain; empty for zoo models
    provenance: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.net.eval()
        if self.task not in ("embedding", "classification"):
            raise ModelError(f"task must be 'embedding' or 'classification', got {self.task!r}")
        if self.task == "classification" and not self.class_names:
            raise ModelError(f"{self.name}: a classifier needs class_names")
        known = dict(self.net.named_modules())
        for depth, layer in self.layers.items():
            if layer not in known:
                raise ModelError(f"{self.name}: layer {layer!r} for {depth!r} is not a module of the network")

    # -- inputs -----------------------------------------------------------------------------------
    def chip(self, image: ImageSource | np.ndarray, face: Face | int | None = None, *,
             name: str | None = None) -> Chip:
        """Load, detect (unless the recipe needs no face) and align one image for this model.

        ``name`` is what errors call the image: pass the user's path when ``image`` is already an array.
        """
        name = name if name is not None else source_name(image)
        rgb = load_image(image, name=name)
        if self.recipe.method == "none":
            return align(rgb, None, self.recipe)
        if not isinstance(face, Face):
            face = pick_face(rgb, index=face, source=name)
        return align(rgb, face, self.recipe)

    def to_tensor(self, chips: np.ndarray | Sequence[np.ndarray] | Chip | Sequence[Chip]) -> torch.Tensor:
        """Stack uint8 RGB chips (H×W×3) into the float ``N×3×H×W`` tensor the network takes."""
        if isinstance(chips, Chip):
            chips = [chips]
        arrays = [c.image if isinstance(c, Chip) else c for c in chips] if not isinstance(chips, np.ndarray) else chips
        batch = np.asarray(arrays) if not isinstance(arrays, np.ndarray) else arrays
        if batch.ndim == 3:
            batch = batch[None]
        h, w = self.input_size
        if batch.shape[1:] != (h, w, 3):
            raise ModelError(f"{self.name} expects {h}×{w}×3 chips, got {tuple(batch.shape[1:])}")
        return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)

    # -- outputs ----------------------------------------------------------------------------------
    @torch.no_grad()
    def forward_chips(self, chips: np.ndarray | Sequence[np.ndarray] | Chip | Sequence[Chip],
                      batch_size: int = 64, fused: bool | None = None) -> np.ndarray:
        """Raw network outputs (logits or embeddings) for aligned chips, in batches.

        ``fused`` runs the network's inference copy (:func:`facelens.models.fuse.inference_net`) when it has one;
        by default it does so for calls of at least ``FUSED_MIN_CHIPS`` chips, a rule that depends only
        on the call, so a job gives the same numbers however it is split across workers.
        """
        from .fuse import inference_net

        x = self.to_tensor(chips)
        use_fast = len(x) >= FUSED_MIN_CHIPS if fused is None else fused
        net = inference_net(self.net, x[:batch_size]) if use_fast else self.net
        outs = [net(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        return torch.cat(outs).numpy() if outs else np.zeros((0,), np.float32)

    def fast_net(self) -> nn.Module | None:
        """dlib-resnet's fused inference copy (:mod:`facelens.models.fuse`), or None.

        None when the network has none, is in training mode, or anything hooks it: a hook on ``net``
        means someone is watching its layers, which the fused copy does not have.
        """
        from .fuse import fast_net, watched

        return None if watched(self.net) else fast_net(self.net)

    def embed(self, image: ImageSource | np.ndarray, face: Face | int | None = None) -> np.ndarray:
        """The embedding of the chosen face (largest by default), aligned with this model's recipe."""
        if self.task != "embedding":
            raise ModelError(f"{self.name} is a classifier; use predict() or an embedding model")
        return self.forward_chips(self.chip(image, face))[0]

    def predict(self, image: ImageSource | np.ndarray, face: Face | int | None = None) -> dict[str, float]:
        """Class probabilities for the chosen face, highest first."""
        if self.task != "classification":
            raise ModelError(f"{self.name} is a recognizer; use embed() or a classification model")
        logits = self.forward_chips(self.chip(image, face))[0]
        probs = torch.softmax(torch.from_numpy(logits).double(), 0).numpy()
        assert self.class_names is not None
        order = np.argsort(-probs)
        return {self.class_names[i]: float(probs[i]) for i in order}

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """Euclidean distance between two embeddings (the metric dlib's threshold is set on)."""
        return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))

    def same_person(self, a: np.ndarray, b: np.ndarray) -> bool:
        if self.match_threshold is None:
            raise ModelError(f"{self.name} has no calibrated match threshold")
        return self.distance(a, b) < self.match_threshold

    # -- structure --------------------------------------------------------------------------------
    def layer(self, name: str) -> nn.Module:
        """A submodule by its dotted name, or by depth alias ``early``/``mid``/``late``."""
        name = self.layers.get(name, name)
        modules = dict(self.net.named_modules())
        if name not in modules:
            raise ModelError(f"{self.name} has no layer {name!r}; depth aliases: {sorted(self.layers)}")
        return modules[name]

    def info(self) -> dict[str, object]:
        return {
            "name": self.name, "task": self.task, "input": f"{self.input_size[0]}×{self.input_size[1]}",
            "preprocessing": self.preprocessing, "alignment": self.recipe.describe(),
            "classes": len(self.class_names) if self.class_names else None, "layers": dict(self.layers),
            "license": self.license, "source": self.source,
            "cohort": self.cohort.describe() if self.cohort is not None else None,
            **({"provenance": dict(self.provenance)} if self.provenance else {}),
        }
