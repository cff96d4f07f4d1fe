"""Layer-wise Relevance Propagation, computed by zennit on the canonical form of the network.

Captum's LRP cannot split relevance at residual sums (captum #546), which every face model
here has; zennit's rules and canonizers can. Before the rules are attached, the network is put
in canonical form (`canonize.canonical_copy`), and zennit-style canonizers fold each batch norm
into the convolution before it (`canonize.ExactMergeBatchNorm`, zennit's merge made exact; it
also folds dlib's frozen ``Affine``), rewrite any torchvision ResNet block left untouched (the
block canonizers that make up zennit's ``ResNetCanonizer``) and route our `Add` modules through
a zennit ``Sum`` (`canonize.AddCanonizer`). ``Normalize`` passes relevance through unchanged,
so the map is over pixels, not normalized pixels.

The relevance put on the output is ``out ⊙ ∂target/∂out``, zennit's ``attr_output``: the one-hot
logit for a class score. For a similarity the same first-order split is taken with the embedding's
norm held fixed: cosine similarity is scale-invariant, so the plain product sums to exactly zero
(Euler) and vanishes entirely for the default self-similarity target; holding the norm fixed gives
``out_i · ref_i / (‖out‖‖ref‖)``, which sums to the cosine itself. Negative L2 distance is split
around the reference, ``−(out_i − ref_i)² / ‖out − ref‖``, which sums to the distance. The cohort
score (the recognizers' default, ``û · d − c``) is scale-invariant too and is split the same way,
``out_i · d_i / ‖out‖``, with its constant ``c`` (the impostor mean) spread evenly over the outputs.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import Canonizer
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat
from zennit.core import Composite
from zennit.rules import Pass
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
from zennit.types import Linear as LinearTypes

from ..errors import ModelError
from ..faces.align import Chip
from ..models.layers import Normalize
from ..targets import CohortSimilarity, Contrastive, Similarity, Target
from .base import Method, register
from .canonize import AddCanonizer, ExactMergeBatchNorm, foldable_batch_norms, hookable

__all__ = ["COMPOSITES", "LRP", "first_layer_bounds", "lrp_canonizers", "output_relevance", "relevance"]

COMPOSITES = ("epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1")
# What LRP cannot work around: a module called twice (its hook state is overwritten) and sums or
# products of activations that no rule sees.
LRP_FORBIDS = ("reuse", "sum", "product")


def lrp_canonizers(net: nn.Module, x: torch.Tensor) -> list[Canonizer]:
    """Batch-norm folding, torchvision ResNet blocks, our Add modules, for ``net`` fed ``x``.

    zennit's ``ResNetCanonizer`` is its two block canonizers plus ``SequentialMergeBatchNorm``;
    they are listed one by one so that the merge runs once (zennit reverts canonizers in the
    order they were applied, so a second merge would leave merged weights behind), and the merge
    is `ExactMergeBatchNorm`, restricted to the pairs `foldable_batch_norms` checked.
    """
    allowed = foldable_batch_norms(net, x)
    return [ExactMergeBatchNorm(allowed), ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer(), AddCanonizer()]


def _similarity_split(sim: Similarity, out: torch.Tensor) -> torch.Tensor:
    ref = sim.reference.to(out.dtype).to(out.device).unsqueeze(0)
    if sim.metric == "cosine":
        norms = torch.linalg.vector_norm(out, dim=1, keepdim=True).clamp_min(1e-12)
        return out * ref / (norms * torch.linalg.vector_norm(ref).clamp_min(1e-12))
    if sim.metric == "dot":  # linear: the product splits the target exactly
        return out * ref / torch.linalg.vector_norm(ref).clamp_min(1e-12)
    diff = out - ref
    dist = torch.linalg.vector_norm(diff, dim=1, keepdim=True)
    return torch.where(dist > 0, -diff.square() / dist.clamp_min(1e-12), torch.zeros_like(diff))


def output_relevance(target: Target, out: torch.Tensor) -> torch.Tensor:
    """Relevance ``(N, D)`` on the network's outputs whose rows sum to the target (see module docstring)."""
    out = out.detach()
    if isinstance(target, Similarity):
        return _similarity_split(target, out)
    if isinstance(target, CohortSimilarity):  # û·d − c: each output's share of the projection, the constant evenly
        norms = torch.linalg.vector_norm(out, dim=1, keepdim=True).clamp_min(1e-12)
        d = target.direction.to(out.dtype).to(out.device).unsqueeze(0)
        return out * d / norms - target.offset / out.shape[1]
    if isinstance(target, Contrastive):
        mate = _similarity_split(target._mate_t, out)
        non = torch.stack([_similarity_split(t, out) for t in target._non_t]).mean(0)
        return mate - non
    with torch.enable_grad():
        o = out.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(target(o).sum(), o)
    return out * grad


def _first_linear(net: nn.Module) -> tuple[str, nn.Module]:
    """The module zennit's first-layer rules (Flat, ZBox) go to: the first linear layer in module order."""
    for name, m in net.named_modules():
        if isinstance(m, LinearTypes):
            return name, m
    raise ModelError("the network has no convolution or linear layer to propagate relevance through")


class _Stop(Exception):
    pass


def first_layer_bounds(net: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lowest and highest values the first linear layer can receive, for the ZBox rule.

    The network normalizes its own input, so the box is the image of black and white pixels
    under that preprocessing (computed, not assumed: ``Normalize``, ``RGBToGray`` or anything
    monotone before the first layer).
    """
    _, first = _first_linear(net)
    seen: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0].detach())
        raise _Stop

    handle = first.register_forward_pre_hook(grab)
    try:
        for value in (0.0, 1.0):
            try:
                with torch.no_grad():
                    net(torch.full_like(like[:1], value))
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(seen) != 2:
        raise ModelError("could not find the input range of the first layer for the ZBox rule")
    return torch.minimum(seen[0], seen[1]), torch.maximum(seen[0], seen[1])


def make_composite(name: str, net: nn.Module, x: torch.Tensor, epsilon: float = 1e-6,
                   canonizers: list[Canonizer] | None = None) -> Composite:
    """One of zennit's standard composites, with ``Normalize`` passing relevance through."""
    layer_map = [(Normalize, Pass())]
    canonizers = lrp_canonizers(net, x) if canonizers is None else canonizers
    if name == "epsilon-plus-flat":
        return EpsilonPlusFlat(epsilon=epsilon, layer_map=layer_map, canonizers=canonizers)
    if name == "epsilon-alpha2-beta1":
        return EpsilonAlpha2Beta1(epsilon=epsilon, layer_map=layer_map, canonizers=canonizers)
    if name == "epsilon-gamma-box":
        low, high = first_layer_bounds(net, x)
        return EpsilonGammaBox(low=low, high=high, epsilon=epsilon, layer_map=layer_map, canonizers=canonizers)
    raise ModelError(f"lrp: unknown composite {name!r}; known: {', '.join(COMPOSITES)}")


def relevance(net: nn.Module, x: torch.Tensor, target: Target, composite: str = "epsilon-plus-flat",
              epsilon: float = 1e-6, canonize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Input relevance ``(N, C, H, W)`` and output relevance ``(N, D)`` of ``target(net(x))``.

    ``canonize=False`` runs the rules on ``net`` as it is, without canonizers: only for showing
    what canonization changes (the relevance of a residual sum is then counted on both branches).
    """
    def attr_output(out: torch.Tensor) -> torch.Tensor:
        r_out = output_relevance(target, out)
        seen.append(r_out)
        return r_out

    seen: list[torch.Tensor] = []
    if not canonize:
        comp = make_composite(composite, net, x, epsilon, canonizers=[])
        with Gradient(model=net, composite=comp) as attributor:
            _, rel = attributor(x.detach(), attr_output)
        return rel.detach(), seen[0]
    with hookable(net, x, "lrp", LRP_FORBIDS) as copy:
        comp = make_composite(composite, copy, x, epsilon)
        with Gradient(model=copy, composite=comp) as attributor:
            _, rel = attributor(x.detach(), attr_output)
    return rel.detach(), seen[0]


@register
class LRP(Method):
    """Layer-wise Relevance Propagation (Bach et al. 2015) with zennit's composites.

    ``composite``: ``epsilon-plus-flat`` (default: Flat on the first layer, z⁺ on convolutions,
    ε on dense layers), ``epsilon-gamma-box`` (ZBox on the pixel layer, γ = 0.25), or
    ``epsilon-alpha2-beta1``. The map sums the relevance over colour channels (signed); its total is
    the output relevance minus what biases absorb, recorded in ``extras``.
    """

    name: ClassVar[str] = "lrp"
    family: ClassVar[str] = "propagation"
    library: ClassVar[str] = "zennit"
    signed: ClassVar[bool] = True
    defaults: ClassVar[dict[str, object]] = {"composite": "epsilon-plus-flat", "epsilon": 1e-6}

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if self.settings["composite"] not in COMPOSITES:
            raise ModelError(f"lrp: unknown composite {self.settings['composite']!r}; known: {', '.join(COMPOSITES)}")
        eps = self.settings["epsilon"]
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise ModelError(f"lrp: epsilon must be a positive number, got {eps!r}")
        self.extras: dict[str, object] = {}

    def attribute_one(self, x: torch.Tensor, target: Target, chip: Chip | None) -> torch.Tensor:
        rel, r_out = relevance(self.model.net, x, target, composite=str(self.settings["composite"]),
                               epsilon=float(self.settings["epsilon"]))  # type: ignore[arg-type]
        self.extras = {"output_relevance": float(r_out.sum()), "input_relevance": float(rel.sum())}
        return rel.sum(1)[0]
