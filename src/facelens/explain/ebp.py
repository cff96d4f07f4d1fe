"""Excitation Backprop and its contrastive form (Zhang et al., ECCV 2016), with the face-matcher
variants of Williford et al.'s xfr (ECCV 2020).

EBP treats top-down attention as a walk from the explained unit down the network: a neuron
passes its marginal winning probability (MWP) to the neurons below in proportion to their
*excitatory* contributions, ``P(a_i | a_j) = a_i w_ij⁺ / Σ_k a_k w_kj⁺``. The MWP is a
probability: non-negative and summing to one on every layer.

The rules are attached with zennit's hooks, but they are ours, not zennit's ``ExcitationBackprop``
composite, which does not compute Zhang's MWP on these networks (measured on real faces: the
total probability reaching the pixels is 3.5e22 on dlib-resnet without canonizers, 0.48 with
batch norms folded and sums made modules; ours is 1.000 on dlib-resnet and dlib-age, 0.997 on
fer-emotion):

* zennit's ``ZPlus`` keeps the positive **bias** in the normalizer, so probability leaks into biases;
  Zhang, TorchRay and xfr leave biases out, and so do we;
* zennit gives **batch norm** no rule, so the gradient scales the probability by γ/σ; we fold each
  batch norm into its convolution;
* zennit splits a residual **sum** in proportion to its signed inputs, which diverges where the
  branches cancel; we split it over the inputs that share the sum's sign (`SignedShare`);
* zennit carries the rule down to the signed, mean-subtracted pixels, where the non-negative
  assumption fails. Zhang and xfr read the map at an inner layer; we spread the MWP of the first
  layer's units evenly over their receptive fields (zennit's ``Flat`` rule), which puts that map
  on the pixel grid and keeps its total.

Zhang's rule assumes non-negative inputs; where a network feeds signed values on (mini-Xception),
`Excitation` applies it sign-consistently (see there). At the explained unit's own layer (the last
linear layer and what follows it) the plain rule applies: the unit is explained by what excites
it, whatever its value.

The explained unit: a class target starts at its output unit (MWP 1). A similarity target, as
in xfr's triplet classifier, is a linear unit on the embedding whose weights are the reference
embedding, so embedding dimension *j* gets ``P_j ∝ (e_j r_j)⁺``, its excitatory contribution to
the inner product (xfr clamps ``e`` at zero first, which drops the excitation of the negative half
of a signed embedding; for a non-negative embedding the two agree). A contrastive target's unit has
weights ``m̂ − mean(n̂)`` (the target is linear in the normalized references); any other target is
linearized by its gradient at the output.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import Canonizer
from zennit.core import BasicHook, Composite, Hook, ParamMod, Stabilizer
from zennit.layer import Sum
from zennit.rules import ClampMod, Flat, NoMod, Pass, ZPlus
from zennit.types import Activation, AvgPool, BatchNorm
from zennit.types import Linear as LinearTypes

from ..errors import ModelError
from ..faces.align import Chip
from ..models.layers import Normalize
from ..targets import ClassScore, CohortSimilarity, Contrastive, Similarity, Target
from .base import Method, register
from .canonize import hookable
from .lrp import lrp_canonizers

__all__ = ["ContrastiveExcitationBackprop", "ExcitationBackprop", "mwp"]

# Modules called twice or activations combined outside modules cannot be given rules; and EBP's
# probabilities need non-negative activations, so functional nonlinearities are refused too.
EBP_FORBIDS = ("reuse", "sum", "product", "nonlinearity")
_STABILIZER = 1e-12


class Excitation(Hook):
    """Zhang et al.'s excitation rule, biases left out: ``P_in = a ⊙ W⁺ᵀ (P_out ⊘ W⁺a)``.

    Zhang assume non-negative inputs, and then only positive units carry probability; so it is
    on the dlib and torchvision ResNets, where every linear layer reads a ReLU (or a pooled ReLU).
    mini-Xception feeds signed values on (its residual sums and depthwise outputs reach the next
    convolution without a ReLU), so the rule is applied sign-consistently: a unit passes its
    probability to the contributions ``a_i w_ij`` that share the sign of its output, which for
    non-negative inputs and positive outputs is exactly Zhang's rule, and otherwise keeps the
    probability that dropping negative inputs would lose. Only the parts that carry probability
    are computed, so on a ReLU network this costs one modified forward and backward per layer.
    """

    def __init__(self, stabilizer: float = _STABILIZER) -> None:
        super().__init__()
        self.stabilizer = stabilizer

    def copy(self) -> Excitation:
        return Excitation(self.stabilizer)

    def forward(self, module: nn.Module, input: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.stored_tensors["input"] = input[0].detach()
        self.stored_tensors["output"] = output.detach()

    def backward(self, module: nn.Module, grad_input: tuple[torch.Tensor | None, ...],
                 grad_output: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, ...]:
        a, z, grad = self.stored_tensors["input"], self.stored_tensors["output"], grad_output[0]
        stab = Stabilizer.ensure(self.stabilizer)
        parts = {"+": a.clamp(min=0)}
        if bool((a < 0).any()):
            parts["-"] = a.clamp(max=0)
        weights = {"+": ClampMod(min=0.0, zero_params=["bias"]), "-": ClampMod(max=0.0, zero_params=["bias"])}
        relevance = torch.zeros_like(a)
        # contributions that push a unit up (a⁺w⁺, a⁻w⁻) carry the probability of positive units,
        # those that push it down (a⁺w⁻, a⁻w⁺) that of the others
        for pairs, carried in (((("+", "+"), ("-", "-")), z > 0), ((("+", "-"), ("-", "+")), z <= 0)):
            g = torch.where(carried, grad, torch.zeros_like(grad))
            if not bool(g.any()):
                continue
            inputs, outputs = [], []
            for a_sign, w_sign in pairs:
                if a_sign in parts:
                    inp = parts[a_sign].clone().requires_grad_(True)
                    with ParamMod.ensure(weights[w_sign])(module) as modified, torch.enable_grad():
                        outputs.append(modified.forward(inp))
                    inputs.append(inp)
            scaled = g / stab(sum(outputs))
            grads = torch.autograd.grad(outputs, inputs, grad_outputs=[scaled] * len(outputs))
            relevance = relevance + sum(i * gr for i, gr in zip(inputs, grads, strict=True))
        return tuple(relevance if g is not None and g.shape == relevance.shape else None for g in grad_input)


class PositiveShare(BasicHook):
    """Split the explained unit's own sum or average pool over its positive inputs: its excitation."""

    def __init__(self, stabilizer: float = _STABILIZER) -> None:
        stab = Stabilizer.ensure(stabilizer)
        super().__init__(
            input_modifiers=[lambda a: a.clamp(min=0)],
            param_modifiers=[NoMod(param_keys=[])],
            output_modifiers=[lambda z: z],
            gradient_mapper=lambda grad, outputs: grad / stab(outputs[0]),
            reducer=lambda inputs, grads: inputs[0] * grads[0],
        )


class SignedShare(BasicHook):
    """Split a sum (or average pool) over the inputs that share the sign of its output.

    A positive sum was excited by its positive inputs, a negative one by its negative inputs;
    splitting by signed inputs instead (zennit's ``Norm``) diverges where the two cancel.
    """

    def __init__(self, stabilizer: float = _STABILIZER) -> None:
        stab = Stabilizer.ensure(stabilizer)

        def mapper(grad: torch.Tensor, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
            positive = (outputs[0] + outputs[1]) > 0
            return [torch.where(positive, grad / stab(outputs[0]), torch.zeros_like(grad)),
                    torch.where(positive, torch.zeros_like(grad), grad / stab(outputs[1]))]

        super().__init__(
            input_modifiers=[lambda a: a.clamp(min=0), lambda a: a.clamp(max=0)],
            param_modifiers=[NoMod(param_keys=[])] * 2,
            output_modifiers=[lambda z: z] * 2,
            gradient_mapper=mapper,
            reducer=lambda inputs, grads: inputs[0] * grads[0] + inputs[1] * grads[1],
        )


class _EBPComposite(Composite):
    """Flat on the first linear layer; plain excitation at and above the explained unit's own layer
    (``top``), sign-consistent excitation below; folded batch norms, our `Add` as a zennit ``Sum``."""

    def __init__(self, canonizers: list[Canonizer], top: Collection[nn.Module] = ()) -> None:
        self.top = {id(m) for m in top}
        super().__init__(module_map=self._rule, canonizers=canonizers)

    def _rule(self, ctx: dict[str, object], name: str, module: nn.Module) -> Hook | None:
        if isinstance(module, LinearTypes) and not ctx.get("first_done"):
            ctx["first_done"] = True
            return Flat()
        at_top = id(module) in self.top
        if isinstance(module, LinearTypes):
            return ZPlus(stabilizer=_STABILIZER, zero_params=["bias"]) if at_top else Excitation()
        if isinstance(module, (Sum, AvgPool)):
            return PositiveShare() if at_top else SignedShare()
        if isinstance(module, (Normalize, Activation, BatchNorm)):
            return Pass()  # a batch norm here is one no canonizer could fold into a linear layer
        return None


@dataclass(frozen=True, eq=False)
class Unit:
    """The unit EBP starts from: a network output (``index``, a class) or a linear unit on the
    outputs (``weights``); ``dual`` takes the unit with negated input weights (Zhang et al. §3.3)."""

    index: int | None = None
    weights: torch.Tensor | None = None
    dual: bool = False

    def top_probability(self, out: torch.Tensor) -> torch.Tensor:
        """MWP on the network outputs ``(D,)``: 1 on a class unit; for a linear unit, its excitatory
        contributions ``(out_j w_j)⁺``, normalized."""
        if self.index is not None:
            p = torch.zeros_like(out)
            p[self.index] = 1.0
            return p
        assert self.weights is not None
        w = -self.weights if self.dual else self.weights
        excitation = (out * w.to(out)).clamp(min=0)
        total = excitation.sum()
        return excitation / total if total > 0 else excitation


def _unit_vector(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v).clamp_min(1e-12)


def unit_for(target: Target, output: Callable[[], torch.Tensor], dual: bool = False) -> Unit:
    """The unit that stands for ``target`` (see the module docstring); ``output()`` gives the
    network's output, needed only to linearize a target of another kind."""
    if isinstance(target, ClassScore):
        return Unit(index=target.index, dual=dual)
    if isinstance(target, Similarity):
        return Unit(weights=_unit_vector(target.reference), dual=dual)
    if isinstance(target, CohortSimilarity):  # this face rather than the cohort's average face, as contrastive EBP
        return Unit(weights=_unit_vector(target.direction), dual=dual)
    if isinstance(target, Contrastive):
        non = torch.stack([_unit_vector(n) for n in target.nonmates]).mean(0)
        return Unit(weights=_unit_vector(target.mate) - non, dual=dual)
    with torch.enable_grad():
        o = output().detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(target(o).sum(), o)
    return Unit(weights=grad[0], dual=dual)


def _top_layers(net: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """The last linear layer to run and every leaf module after it: the output unit's own layer."""
    order: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda m, i, o: order.append(m))
               for m in net.modules() if not any(True for _ in m.children())]
    try:
        with torch.no_grad():
            net(x[:1])
    finally:
        for h in handles:
            h.remove()
    last = max((i for i, m in enumerate(order) if isinstance(m, LinearTypes)), default=None)
    if last is None:
        raise ModelError("ebp: the network has no linear layer")
    return order[last:]


def _propagate(net: nn.Module, x: torch.Tensor, units: list[Unit], top: list[nn.Module]) -> torch.Tensor:
    """One batched EBP pass: pixel MWP maps ``(K, H, W)``, one per unit.

    A class unit's dual negates the top linear layer's weights and bias (after batch-norm
    folding), so that the layers above it see the dual unit's activations too.
    """
    batch = x.detach().expand(len(units), *x.shape[1:]).clone()

    def start(out: torch.Tensor) -> torch.Tensor:
        return torch.stack([u.top_probability(o) for u, o in zip(units, out, strict=True)])

    dual = any(u.dual and u.index is not None for u in units)
    with Gradient(model=net, composite=_EBPComposite(lrp_canonizers(net, x), top)) as attributor:
        negate = list(top[0].parameters(recurse=False)) if dual else []  # after batch-norm folding
        saved = [p.data for p in negate]
        try:
            for p, data in zip(negate, saved, strict=True):
                p.data = -data
            _, p_in = attributor(batch, start)
        finally:
            for p, data in zip(negate, saved, strict=True):
                p.data = data
    return p_in.detach().sum(dim=1)


def mwp(model_net: nn.Module, x: torch.Tensor, units: list[Unit], method: str = "ebp") -> torch.Tensor:
    """Pixel MWP maps ``(K, H, W)`` of input ``x`` ``(1, 3, H, W)``, one per unit."""
    with hookable(model_net, x, method, EBP_FORBIDS) as net:
        for name, m in net.named_modules():
            if isinstance(m, Activation) and not isinstance(m, (nn.ReLU, nn.ReLU6)):
                raise ModelError(f"{method}: Excitation Backprop needs non-negative activations (ReLU); "
                                 f"{name} is {type(m).__name__}")
        is_class = [u.index is not None for u in units]
        if any(is_class) and not all(is_class):
            raise ModelError(f"{method}: cannot mix class and linear units in one pass")
        top = _top_layers(net, x) if all(is_class) else []
        needs_negation = [u.dual and u.index is not None for u in units]
        groups = [[u for u, neg in zip(units, needs_negation, strict=True) if neg is flag] for flag in (False, True)]
        maps: dict[int, torch.Tensor] = {}
        for group in groups:
            if group:
                maps.update({id(u): m for u, m in zip(group, _propagate(net, x, group, top), strict=True)})
    return torch.stack([maps[id(u)] for u in units])


def _unit_mass(m: torch.Tensor) -> torch.Tensor:
    total = m.sum()
    return m / total if total > 0 else m


@register
class ExcitationBackprop(Method):
    """Excitation Backprop (Zhang et al. 2016): the pixel map of marginal winning probabilities.

    Non-negative and summing to one, up to the probability of neurons with no excitatory input;
    the total is recorded in ``extras["mass"]``.
    """

    name: ClassVar[str] = "ebp"
    family: ClassVar[str] = "propagation"
    library: ClassVar[str] = "facelens"

    def attribute_one(self, x: torch.Tensor, target: Target, chip: Chip | None) -> torch.Tensor:
        (m,) = mwp(self.model.net, x, [unit_for(target, lambda: self.model.net(x))], self.name)
        self.extras = {"mass": float(m.sum())}
        return m


@register
class ContrastiveExcitationBackprop(Method):
    """Contrastive Excitation Backprop: the MWP map of the unit minus that of its contrast, clipped at 0.

    Zhang et al. (§3.3) contrast an output unit with its *dual*, a unit whose input weights are
    negated, so the difference keeps what speaks for the class and drops what merely excites the
    network (the dual fires on the same edges, textures, skin). That is what a class target gets:
    the top linear layer's weights (after batch-norm folding) are negated for the dual pass. We
    follow the paper rather than "mean of the other classes": the dual needs no choice of classes and
    is defined for any unit, including a similarity unit, whose dual has weights ``−r``.

    For matchers, a `Contrastive` target follows Williford et al.'s xfr: the map for the mate
    unit minus the mean of the maps for the non-mate units (weights ``m̂`` and ``n̂``, as in xfr's
    triplet classifier), each normalized to unit mass before subtracting, then clipped at zero. Maps
    are computed in one batched pass.
    """

    name: ClassVar[str] = "contrastive-ebp"
    family: ClassVar[str] = "propagation"
    library: ClassVar[str] = "facelens"

    def attribute_one(self, x: torch.Tensor, target: Target, chip: Chip | None) -> torch.Tensor:
        if isinstance(target, Contrastive):
            units = [Unit(weights=_unit_vector(target.mate))]
            units += [Unit(weights=_unit_vector(n)) for n in target.nonmates]
            maps = mwp(self.model.net, x, units, self.name)
            positive = _unit_mass(maps[0])
            negative = torch.stack([_unit_mass(m) for m in maps[1:]]).mean(0)
            contrast = "mean of non-mate units"
        else:
            unit = unit_for(target, lambda: self.model.net(x))
            maps = mwp(self.model.net, x, [unit, Unit(unit.index, unit.weights, dual=True)], self.name)
            positive, negative = _unit_mass(maps[0]), _unit_mass(maps[1])
            contrast = "dual unit"
        self.extras = {"contrast": contrast, "mass": float(maps[0].sum())}
        return (positive - negative).clamp(min=0)
