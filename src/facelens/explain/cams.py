"""Class-activation maps: CAM, Grad-CAM, Grad-CAM++ and Score-CAM.

Grad-CAM and Grad-CAM++ are pytorch-grad-cam's (its channel weights, its
hooks, released by its context manager). CAM (Zhou et al. 2016) is ours because
pytorch-grad-cam has none. Score-CAM is ours because it is a perturbation method:
it runs on the shared `PerturbationEngine` (batching, memory, pair targets) and
pytorch-grad-cam's ``ScoreCAM`` — scoring image by image with a ``.item()`` per
output — is the peer it is tested against.

Every map is computed at the layer's resolution and upsampled bilinearly
(half-pixel centres) to the chip, keeping its units: no per-image min–max
rescaling, so CAM stays in logit units and Grad-CAM on a pooled linear head is
CAM / (h·w). In-place activations are switched off while a map is computed
(they would overwrite the captured features), and a layer that runs more than
once per forward (a reused module) is refused with a clear error rather than
silently mixing its calls.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from torch import nn

from ..errors import ModelError
from ..faces.align import Chip
from ..targets import Target
from .base import CamMethod, register
from .engine import PerturbationEngine
from .perturbation import fill_image

__all__ = ["DEPTHS", "Cam", "GradCam", "GradCamPlusPlus", "ScoreCam", "inplace_disabled", "upsample_map"]

DEPTHS = ("early", "mid", "late")


@contextmanager
def inplace_disabled(net: nn.Module) -> Iterator[None]:
    """Switch off ``inplace`` on every module for the duration, then restore it."""
    flipped = [m for m in net.modules() if isinstance(getattr(m, "inplace", None), bool) and m.inplace]
    for m in flipped:
        m.inplace = False  # type: ignore[assignment]
    try:
        yield
    finally:
        for m in flipped:
            m.inplace = True  # type: ignore[assignment]


@contextmanager
def _count_calls(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the module's outputs during the block (one entry per call)."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    try:
        yield outputs
    finally:
        handle.remove()


def upsample_map(cam: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(h, w)`` → ``(H, W)``, bilinear with half-pixel centres (as cv2.resize and skimage)."""
    return F.interpolate(cam[None, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0, 0]


class _LayerCam(CamMethod):
    """A CAM computed at one layer, optionally also at the model's three named depths.

    With ``all_depths=True``, ``extras["depths"]`` maps ``early``/``mid``/``late`` to their
    maps on the chip grid (``H×W`` for one input, ``N×H×W`` for several), the input to the
    classic "regions × layers" attention analysis. Depths where the method is undefined are
    listed with the reason in ``extras["depths_undefined"]``.
    """

    defaults: ClassVar[dict[str, object]] = {"layer": "late", "all_depths": False}
    # whether a depth where the method is undefined is reported (CAM) rather than raised
    undefined_is_ok: ClassVar[bool] = False

    def attribute(self, inputs: torch.Tensor, target: Target | Sequence[Target],
                  chips: Sequence[Chip | None] | None = None) -> torch.Tensor:
        self._depth_maps: list[dict[str, torch.Tensor]] = []
        self._undefined: dict[str, str] = {}
        maps = super().attribute(inputs, target, chips)
        self.extras: dict[str, object] = {"layer": self.layer_name()}
        if self.settings.get("all_depths"):
            names = [d for d in DEPTHS if self._depth_maps and all(d in per for per in self._depth_maps)]
            if len(inputs) == 1:
                depths = {d: self._depth_maps[0][d].numpy() for d in names}
            else:
                depths = {d: torch.stack([per[d] for per in self._depth_maps]).numpy() for d in names}
            self.extras["depths"] = depths
            self.extras["depths_undefined"] = dict(self._undefined)
        return maps

    def _module(self, name: str) -> nn.Module:
        return self.model.layer(name)

    def _checked(self, name: str, outputs: list[torch.Tensor]) -> torch.Tensor:
        if len(outputs) != 1:
            raise ModelError(
                f"{self.model.name}: layer {name!r} ran {len(outputs)} times in one forward pass "
                f"(a reused module); name a module that runs once, such as its enclosing block")
        out = outputs[0]
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(f"{self.model.name}: layer {name!r} outputs {shape}; "
                             f"{self.name} needs N×C×h×w feature maps")
        return out

    def attribute_one(self, x: torch.Tensor, target: Target, chip: Chip | None) -> torch.Tensor:
        size = x.shape[-2:]
        main_name = self.layer_name()
        with inplace_disabled(self.model.net):
            main = upsample_map(self.layer_map(x, target, main_name), size)
            if self.settings.get("all_depths"):
                per_depth: dict[str, torch.Tensor] = {}
                for depth in DEPTHS:
                    name = self.model.layers.get(depth)
                    if name is None:
                        self._undefined[depth] = f"{self.model.name} names no {depth!r} layer"
                        continue
                    if name == main_name:
                        per_depth[depth] = main
                        continue
                    try:
                        per_depth[depth] = upsample_map(self.layer_map(x, target, name), size)
                    except ModelError as exc:
                        if not self.undefined_is_ok:
                            raise
                        self._undefined[depth] = str(exc)
                self._depth_maps.append({d: m.detach().float().cpu() for d, m in per_depth.items()})
        return main

    @abstractmethod
    def layer_map(self, x: torch.Tensor, target: Target, name: str) -> torch.Tensor:
        """The map ``(h, w)`` at the layer's own resolution."""


def _is_global_average(features: torch.Tensor, pooled: object) -> bool:
    if not isinstance(pooled, torch.Tensor) or pooled.numel() != features.shape[0] * features.shape[1]:
        return False
    with torch.no_grad():
        mean = features.mean(dim=(2, 3))
        scale = float(mean.abs().max()) + 1e-6
        return bool(torch.allclose(pooled.reshape(mean.shape), mean, rtol=1e-4, atol=1e-5 * scale))


@register
class Cam(_LayerCam):
    """CAM (Zhou et al. 2016): ``Σ_k w_k A_k`` over the features ``A`` that feed global average pooling.

    ``w = ∂target/∂(pooled feature)``, which is the classifier row for a linear head and a
    logit target, and generalizes to any head (e.g. a similarity to a reference embedding).
    Signed: negative values are evidence against the target. Undefined, and refused, at a
    layer that is not followed by global average pooling.
    """

    name = "cam"
    library = "facelens"
    signed = True
    undefined_is_ok = True

    def layer_map(self, x: torch.Tensor, target: Target, name: str) -> torch.Tensor:
        layer = self._module(name)
        calls: list[tuple[nn.Module, object, object]] = []

        def spy(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
            calls.append((module, inputs[0] if inputs else None, output))

        handles = [m.register_forward_hook(spy) for m in self.model.net.modules()]
        try:
            with torch.enable_grad():
                score = target(self.model.net(x.detach().clone().requires_grad_(True)))
        finally:
            for h in handles:
                h.remove()
        features = self._checked(name, [out for mod, _, out in calls if mod is layer])  # type: ignore[misc]
        pooled = next((out for _, inp, out in calls if inp is features and _is_global_average(features, out)), None)
        if pooled is None:
            raise ModelError(
                f"{self.model.name}: layer {name!r} is not followed by global average pooling, so CAM is "
                f"undefined there{self._gap_hint(calls)}; Grad-CAM works at any layer")
        weights = torch.autograd.grad(score.sum(), pooled)[0].reshape(features.shape[:2])  # type: ignore[arg-type]
        return (weights[:, :, None, None] * features.detach()).sum(1)[0]

    def _gap_hint(self, calls: list[tuple[nn.Module, object, object]]) -> str:
        names = {id(m): n for n, m in self.model.net.named_modules()}
        for _, inp, out in calls:
            if isinstance(inp, torch.Tensor) and inp.dim() == 4 and _is_global_average(inp, out):
                producer = next((m for m, _, o in calls if o is inp), None)
                if producer is not None and id(producer) in names:
                    return f" (the pooling is fed by layer={names[id(producer)]!r})"
        return " (this model has no global average pooling)"


class _RawCamsMixin:
    """pytorch-grad-cam's channel weights and weighted sum, without its per-image min–max
    scaling and cv2 resize: we keep the units and upsample the same way for every CAM."""

    activations_and_grads: object
    target_layers: list[nn.Module]
    get_cam_image: Callable[..., np.ndarray]

    def compute_cam_per_layer(self, input_tensor: torch.Tensor, targets: list[Target],
                              eigen_smooth: bool) -> list[np.ndarray]:
        acts = [a.cpu().numpy() for a in self.activations_and_grads.activations]  # type: ignore[attr-defined]
        grads = [g.cpu().numpy() for g in self.activations_and_grads.gradients]  # type: ignore[attr-defined]
        if len(acts) != len(self.target_layers) or len(grads) != len(self.target_layers):
            raise ModelError(f"captured {len(acts)} activations and {len(grads)} gradients for "
                             f"{len(self.target_layers)} layer(s)")
        return [np.maximum(self.get_cam_image(input_tensor, layer, targets, acts[i], grads[i], eigen_smooth), 0)
                for i, layer in enumerate(self.target_layers)]

    def aggregate_multi_layers(self, cam_per_layer: list[np.ndarray]) -> np.ndarray:
        return cam_per_layer[0]


class _RawGradCAM(_RawCamsMixin, GradCAM):
    pass


class _RawGradCAMPlusPlus(_RawCamsMixin, GradCAMPlusPlus):
    pass


class _PgcCam(_LayerCam):
    """A pytorch-grad-cam method at one layer; our targets are valid PGC targets."""

    library = "pytorch-grad-cam"
    pgc_class: ClassVar[type]

    def layer_map(self, x: torch.Tensor, target: Target, name: str) -> torch.Tensor:
        layer = self._module(name)
        net = self.model.net
        inputs = x.detach().clone().requires_grad_(True)
        with self.pgc_class(model=net, target_layers=[layer]) as pgc, _count_calls(layer) as outputs:
            try:
                raw = pgc(inputs, targets=[target])
            except (IndexError, ModelError) as exc:  # PGC's __exit__ would swallow an IndexError
                self._checked(name, outputs)  # a reused layer is the usual cause: say so
                raise ModelError(f"{self.model.name}: {self.name} failed at layer {name!r}: {exc}") from None
        self._checked(name, outputs)
        net.zero_grad(set_to_none=True)
        return torch.from_numpy(np.ascontiguousarray(raw[0])).float()


@register
class GradCam(_PgcCam):
    """Grad-CAM (Selvaraju et al. 2017): ReLU(Σ_k mean(∂target/∂A_k)·A_k), via pytorch-grad-cam."""

    name = "gradcam"
    pgc_class = _RawGradCAM


@register
class GradCamPlusPlus(_PgcCam):
    """Grad-CAM++ (Chattopadhay et al. 2018): higher-order channel weights, via pytorch-grad-cam."""

    name = "gradcam++"
    pgc_class = _RawGradCAMPlusPlus


@register
class ScoreCam(_LayerCam):
    """Score-CAM (Wang et al. 2020) on the shared engine.

    One forward gives the layer's K feature maps; each, upsampled and min–max normalized,
    is a soft keep-mask; the K masked images are scored by the engine (``batch_size`` at a
    time); the map is ReLU(Σ_k softmax(scores)_k·A_k). The paper's baseline subtraction is
    omitted because softmax ignores a constant shift. ``fill`` is what masked-out pixels
    become (black, as in the paper, by default).
    """

    name = "scorecam"
    library = "facelens"
    defaults: ClassVar[dict[str, object]] = {**_LayerCam.defaults, "fill": "zero"}

    def layer_map(self, x: torch.Tensor, target: Target, name: str) -> torch.Tensor:
        layer = self._module(name)
        with torch.inference_mode(), _count_calls(layer) as outputs:
            self.model.net(x)
        acts = self._checked(name, outputs)[0].detach().clone()
        size = x.shape[-2:]
        engine = PerturbationEngine(self.model.net, target, batch_size=self.batch_size,
                                    progress=self.progress, desc=self.name)

        def masks(start: int, stop: int) -> torch.Tensor:
            up = F.interpolate(acts[start:stop, None], size=size, mode="bilinear", align_corners=False)
            flat = up.flatten(1)
            low, high = flat.min(1).values, flat.max(1).values
            return (up - low[:, None, None, None]) / (high - low + 1e-8)[:, None, None, None]

        scores = engine.run_masks(x, fill_image(x, str(self.settings["fill"])), acts.shape[0], masks)
        weights = torch.softmax(scores.double(), 0).to(acts.device, acts.dtype)
        return torch.relu((weights[:, None, None] * acts).sum(0))
