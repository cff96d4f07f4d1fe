"""Base classes of the saliency methods, one per family (as Captum's attribution bases).

Every method has the same shape: ``Method(model, **settings).attribute(inputs,
target)`` returns one map per input, on the chip grid. Settings are checked
against the method's declared defaults, so a typo is an error rather than a
silently ignored option, and the settings actually used are recorded in the
`Explanation`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from ..errors import ModelError
from ..faces.align import Chip
from ..models.base import FaceModel
from ..targets import Target
from .engine import DEFAULT_BATCH_SIZE, PerturbationEngine

__all__ = ["METHODS", "CamMethod", "GradientMethod", "Method", "PerturbationMethod", "register"]

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under its ``name``."""
    if cls.name in METHODS:
        raise RuntimeError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


class Method(ABC):
    """A saliency method bound to one model.

    Class attributes describe the method for reports and tests: ``family``
    (gradient, propagation, cam, perturbation, face), ``library`` (who computes
    it), ``signed`` (whether negative values carry meaning) and ``localizes``
    (whether it claims to point at the pixels that matter, which the
    known-answer tests hold it to).
    """

    name: ClassVar[str]
    family: ClassVar[str]
    library: ClassVar[str]
    signed: ClassVar[bool] = False
    localizes: ClassVar[bool] = True
    needs_face: ClassVar[bool] = False
    defaults: ClassVar[dict[str, object]] = {}

    def __init__(self, model: FaceModel, *, batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
                 progress: bool | None = None, **settings: object) -> None:
        unknown = sorted(set(settings) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise ModelError(f"{self.name}: unknown setting(s) {', '.join(unknown)}; known: {known}")
        self.model = model
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.progress = progress
        self.settings: dict[str, object] = {**self.defaults, **settings}

    def used_settings(self) -> dict[str, object]:
        """Every setting that shaped the map, for the record."""
        return {**self.settings, "batch_size": self.batch_size, "seed": self.seed}

    def attribute(self, inputs: torch.Tensor, target: Target | Sequence[Target],
                  chips: Sequence[Chip | None] | None = None) -> torch.Tensor:
        """Maps ``(N, H, W)`` for inputs ``(N, 3, H, W)`` (RGB in [0, 1]).

        ``target`` is one target for every input or one per input; ``chips`` give the
        face geometry that face-aware methods need.
        """
        n = inputs.shape[0]
        targets = [target] * n if isinstance(target, Target) else list(target)
        if len(targets) != n:
            raise ModelError(f"{len(targets)} targets for {n} inputs")
        chip_list = list(chips) if chips is not None else [None] * n
        if self.needs_face and any(c is None or c.face is None for c in chip_list):
            raise ModelError(f"{self.name} needs face landmarks: explain aligned faces, not bare tensors")
        maps = [self.attribute_one(inputs[i:i + 1], targets[i], chip_list[i]) for i in range(n)]
        return torch.stack([m.detach().float().reshape(inputs.shape[-2:]) for m in maps])

    @abstractmethod
    def attribute_one(self, x: torch.Tensor, target: Target, chip: Chip | None) -> torch.Tensor:
        """The map ``(H, W)`` for one input ``(1, 3, H, W)``."""

    def scalar(self, target: Target) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x ↦ target(net(x))``: the scalar function that captum-style wrappers differentiate.

        It runs on the network's channels_last copy when there is one (same outputs and input
        gradients, faster convolutions: :func:`facelens.models.fuse.inference_net`), chosen on the
        first call and kept for the function's life, one attribution; methods that hook layers use
        ``self.model.net`` itself.
        """
        from ..models.fuse import inference_net

        runner: list[torch.nn.Module] = []

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not runner:
                runner.append(inference_net(self.model.net, x, grad=True))
            return target(runner[0](x))

        return forward


class GradientMethod(Method):
    """Methods that differentiate the target with respect to the input (or a layer)."""

    family: ClassVar[str] = "gradient"


class PerturbationMethod(Method):
    """Methods that only evaluate the network on perturbed inputs, via the shared engine."""

    family: ClassVar[str] = "perturbation"

    def engine(self, target: Target, desc: str | None = None) -> PerturbationEngine:
        return PerturbationEngine(self.model.net, target, batch_size=self.batch_size,
                                  progress=self.progress, desc=desc or self.name)

    def generator(self) -> torch.Generator:
        """A seeded generator: the same seed gives the same map."""
        return torch.Generator().manual_seed(self.seed)


class CamMethod(Method):
    """Class-activation methods: a weighted sum of one layer's feature maps, upsampled.

    ``layer`` is a module name or a layer alias of the model (``early``/``mid``/``late``, ``cam``).
    The default, ``cam``, is each zoo model's documented Grad-CAM layer: its deepest map of at least
    8×8, because a map is never finer than its layer and a 4×4 one cannot separate eyes, nose and
    mouth on a face chip. A model that names no ``cam`` layer (a user's) uses its ``late`` one.
    """

    family: ClassVar[str] = "cam"
    defaults: ClassVar[dict[str, object]] = {"layer": "cam"}

    def layer_name(self) -> str:
        """The module the map is computed at: the ``layer`` setting, aliases resolved."""
        name = str(self.settings.get("layer") or "cam")
        if name == "cam" and "cam" not in self.model.layers:
            name = "late"
        return self.model.layers.get(name, name)
