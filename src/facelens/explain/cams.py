"""Class-activation maps: CAM, Grad-CAM, Grad-CAM++, Layer-CAM and Score-CAM.

Grad-CAM, Grad-CAM++ and Layer-CAM are pytorch-grad-cam's (its weights, its
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

Resolution: a map is never finer than its layer. Each zoo model's ``late`` layer, the
default of Grad-CAM, Grad-CAM++, Layer-CAM and Score-CAM, is its deepest map of at least 8×8; CAM
defaults to the layer that feeds global average pooling, wherever that is (2×2 on
dlib-resnet). ``extras`` records every layer's name and ``h×w`` (and warns below 8×8),
so a table of maps can say how coarse each one is.
"""

from __future__ import annotations

from abc import abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
from torch import nn

from ..errors import ModelError
from ..faces.align import Chip
from ..targets import Target
from .base import CamMethod, register
from .engine import PerturbationEngine
from .perturbation import fill_image

__all__ = ["DEPTHS", "GAP", "MIN_SIDE", "Cam", "GradCam", "GradCamPlusPlus", "LayerCam", "ScoreCam",
           "inplace_disabled", "upsample_map"]

DEPTHS = ("early", "mid", "late")
#: CAM's default ``layer``: whichever module feeds the global average pooling, found by tracing a forward
GAP = "gap"
#: below this side a map cannot tell the eyes from the nose on a face chip; ``extras`` warns
MIN_SIDE = 8


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

    ``extras`` says how coarse the map is: ``layer`` (the module used), ``layer_shape`` (its
    ``[h, w]``; the map is that grid upsampled to the chip), ``layer_channels`` and, below
    8×8, a ``resolution_warning``. With ``all_depths=True``, ``extras["depths"]`` maps
    ``early``/``mid``/``late`` to their maps on the chip grid (``H×W`` for one input, ``N×H×W``
    for several), the input to the classic "regions × layers" attention analysis, and
    ``depth_layers``/``depth_shapes`` give each depth's layer and ``[h, w]`` (for the table's
    "layer, h×w" column). Depths where the method is undefined are listed with the reason in
    ``extras["depths_undefined"]``.
    """

    defaults: ClassVar[dict[str, object]] = {"layer": "cam", "all_depths": False}
    # whether a depth where the method is undefined is reported (CAM) rather than raised
    undefined_is_ok: ClassVar[bool] = False

    def attribute(self, inputs: torch.Tensor, target: Target | Sequence[Target],
                  chips: Sequence[Chip | None] | None = None) -> torch.Tensor:
        self._depth_maps: list[dict[str, torch.Tensor]] = []
        self._undefined: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, int, int]] = {}
        maps = super().attribute(inputs, target, chips)
        name = self.layer_name()
        self.extras: dict[str, object] = {"layer": name, **self._shape_extras(name)}
        if self.settings.get("all_depths"):
            names = [d for d in DEPTHS if self._depth_maps and all(d in per for per in self._depth_maps)]
            if len(inputs) == 1:
                depths = {d: self._depth_maps[0][d].numpy() for d in names}
            else:
                depths = {d: torch.stack([per[d] for per in self._depth_maps]).numpy() for d in names}
            layers = {d: self.model.layers[d] for d in DEPTHS if d in self.model.layers}
            self.extras["depths"] = depths
            self.extras["depth_layers"] = layers
            self.extras["depth_shapes"] = {d: list(self._shapes[n][1:]) for d, n in layers.items() if n in self._shapes}
            self.extras["depths_undefined"] = dict(self._undefined)
        return maps

    def _shape_extras(self, name: str) -> dict[str, object]:
        """The layer's resolution, and a warning when it is too coarse to resolve facial features."""
        if name not in self._shapes:
            return {}
        c, h, w = self._shapes[name]
        out: dict[str, object] = {"layer_shape": [h, w], "layer_channels": c}
        if min(h, w) < MIN_SIDE:
            out["resolution_warning"] = (
                f"{name} is {h}×{w}: the map is a {h}×{w} grid upsampled to the input, too coarse to tell "
                f"facial features apart")
        return out

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
        self._shapes[name] = (int(out.shape[1]), int(out.shape[2]), int(out.shape[3]))
        return out

    def _zero_gradient(self, target: Target, name: str) -> ModelError:
        return ModelError(
            f"{self.model.name}: the gradient of the {target.describe()} at layer {name!r} is exactly zero, "
            f"so {self.name} has nothing to weight (a cosine or distance to the face's own embedding is at "
            f"its optimum); explain a cohort or projection target, or a match to another photo")

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
    """Whether ``pooled`` is the spatial mean of ``features`` (a 1×1 map never counts: any
    per-channel op on it, e.g. an identity-initialized affine layer, would look like a mean)."""
    if (not isinstance(pooled, torch.Tensor) or features.shape[2] * features.shape[3] < 2
            or pooled.numel() != features.shape[0] * features.shape[1]):
        return False
    with torch.no_grad():
        mean = features.mean(dim=(2, 3))
        scale = float(mean.abs().max()) + 1e-6
        return bool(torch.allclose(pooled.reshape(mean.shape), mean, rtol=1e-4, atol=1e-5 * scale))


_Call = tuple[nn.Module, object, object]  # (module, its first input, its output) from a forward hook


@register
class Cam(_LayerCam):
    """CAM (Zhou et al. 2016): ``Σ_k w_k A_k`` over the features ``A`` that feed global average pooling.

    ``w = ∂target/∂(pooled features)``: the classifier row for a linear head and a logit target;
    for an embedding, ``Wᵀ ∂target/∂embedding``, the linear layer's weights projected on the
    target's direction (e.g. a cohort similarity to a reference). Signed: negative values are
    evidence against the target.

    CAM is only defined where the pooling is fed, so its default ``layer="gap"`` is that layer,
    found by tracing a forward. It is often coarse, and ``extras`` says so (``layer_shape``,
    ``resolution_warning``): on dlib-resnet it is stage 5, 2×2, where only the top-left cell sees
    the last convolutions, so the map is four cells upsampled to the chip and cannot single out a
    facial feature. A layer named explicitly (``late`` included) that is not followed by global
    average pooling is refused, naming the one that is.
    """

    name = "cam"
    library = "facelens"
    signed = True
    undefined_is_ok = True
    defaults: ClassVar[dict[str, object]] = {**_LayerCam.defaults, "layer": GAP}

    def attribute(self, inputs: torch.Tensor, target: Target | Sequence[Target],
                  chips: Sequence[Chip | None] | None = None) -> torch.Tensor:
        self._gap_layer: str | None = None
        if self._wants_gap():
            with inplace_disabled(self.model.net), torch.no_grad():
                calls, _ = self._trace(inputs[:1], None)
            self._gap_layer = self._gap_producer(calls)
            if self._gap_layer is None:
                raise ModelError(f"{self.model.name}: CAM needs the layer that feeds global average pooling, and "
                                 f"none was found{self._gap_hint(calls)}; name one with layer=..., or use Grad-CAM, "
                                 f"which works at any layer")
        return super().attribute(inputs, target, chips)

    def _wants_gap(self) -> bool:
        return self.settings.get("layer") == GAP and GAP not in self.model.layers

    def layer_name(self) -> str:
        if self._wants_gap():
            found = getattr(self, "_gap_layer", None)
            if found is None:
                raise ModelError("cam: the layer feeding global average pooling is found by attribute()")
            return found
        return super().layer_name()

    def _trace(self, x: torch.Tensor, target: Target | None) -> tuple[list[_Call], torch.Tensor | None]:
        """One forward with every module hooked; the target's score when a target is given."""
        calls: list[_Call] = []

        def spy(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
            calls.append((module, inputs[0] if inputs else None, output))

        handles = [m.register_forward_hook(spy) for m in self.model.net.modules()]
        try:
            out = self.model.net(x)
            score = target(out) if target is not None else None
        finally:
            for h in handles:
                h.remove()
        return calls, score

    def layer_map(self, x: torch.Tensor, target: Target, name: str) -> torch.Tensor:
        layer = self._module(name)
        with torch.enable_grad():
            calls, score = self._trace(x.detach().clone().requires_grad_(True), target)
        assert score is not None
        features = self._checked(name, [out for mod, _, out in calls if mod is layer])  # type: ignore[misc]
        pooled = next((out for _, inp, out in calls if inp is features and _is_global_average(features, out)), None)
        if pooled is None:
            raise ModelError(
                f"{self.model.name}: layer {name!r} is not followed by global average pooling, so CAM is "
                f"undefined there{self._gap_hint(calls)}; Grad-CAM works at any layer")
        weights = torch.autograd.grad(score.sum(), pooled)[0].reshape(features.shape[:2])  # type: ignore[arg-type]
        if not bool(weights.any()):
            raise self._zero_gradient(target, name)
        return (weights[:, :, None, None] * features.detach()).sum(1)[0]

    def _gap_producer(self, calls: list[_Call]) -> str | None:
        """The innermost named module that runs once and whose output is globally average-pooled.

        The last pooling of the forward is the head's; earlier ones (squeeze-excitation) are not.
        """
        names = {id(m): n for n, m in self.model.net.named_modules() if n}
        runs = Counter(id(m) for m, _, _ in calls)
        for _, inp, out in reversed(calls):
            if isinstance(inp, torch.Tensor) and inp.dim() == 4 and _is_global_average(inp, out):
                # hooks fire innermost first: a ReLU before the block and the stage that return its tensor
                producer = next((m for m, _, o in calls if o is inp and runs[id(m)] == 1 and id(m) in names), None)
                return names[id(producer)] if producer is not None else None
        return None

    def _gap_hint(self, calls: list[_Call]) -> str:
        producer = self._gap_producer(calls)
        if producer is not None:
            return f" (the pooling is fed by layer={producer!r})"
        if any(isinstance(inp, torch.Tensor) and inp.dim() == 4 and _is_global_average(inp, out)
               for _, inp, out in calls):
            return " (the pooled tensor comes from no single named module)"
        return " (this model has no global average pooling)"


class _RawCamsMixin:
    """pytorch-grad-cam's channel weights and weighted sum, without its per-image min–max
    scaling and cv2 resize: we keep the units and upsample the same way for every CAM."""

    activations_and_grads: object
    target_layers: list[nn.Module]
    gradient_is_zero: list[bool]  # per layer, set on each call: an all-zero gradient gives an empty map
    get_cam_image: Callable[..., np.ndarray]

    def compute_cam_per_layer(self, input_tensor: torch.Tensor, targets: list[Target],
                              eigen_smooth: bool) -> list[np.ndarray]:
        acts = [a.cpu().numpy() for a in self.activations_and_grads.activations]  # type: ignore[attr-defined]
        grads = [g.cpu().numpy() for g in self.activations_and_grads.gradients]  # type: ignore[attr-defined]
        if len(acts) != len(self.target_layers) or len(grads) != len(self.target_layers):
            raise ModelError(f"captured {len(acts)} activations and {len(grads)} gradients for "
                             f"{len(self.target_layers)} layer(s)")
        self.gradient_is_zero = [not np.any(g) for g in grads]
        return [np.maximum(self.get_cam_image(input_tensor, layer, targets, acts[i], grads[i], eigen_smooth), 0)
                for i, layer in enumerate(self.target_layers)]

    def aggregate_multi_layers(self, cam_per_layer: list[np.ndarray]) -> np.ndarray:
        return cam_per_layer[0]


class _RawGradCAM(_RawCamsMixin, GradCAM):
    pass


class _RawGradCAMPlusPlus(_RawCamsMixin, GradCAMPlusPlus):
    pass


class _RawLayerCAM(_RawCamsMixin, LayerCAM):
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
            zero = pgc.gradient_is_zero[0]
        self._checked(name, outputs)
        if zero:
            raise self._zero_gradient(target, name)
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
class LayerCam(_PgcCam):
    """Layer-CAM (Jiang et al. 2021): ReLU(Σ_k ReLU(∂target/∂A_k) ⊙ A_k), via pytorch-grad-cam.

    Each activation is weighted by the positive gradient at its own cell, not by the channel's
    mean gradient as in Grad-CAM, so the map keeps *where* the gradient is. That matters at a
    layer whose gradient varies over the map: on dlib-resnet's 8×8 default layer, with the cohort
    target, Grad-CAM is nearly flat while Layer-CAM follows occlusion (Spearman ≈ 0.7 vs 0.16 on
    FRL London photos). A gradient that is nowhere positive gives an all-zero map (no evidence for
    the target), not an error; an exactly zero gradient is refused as for Grad-CAM.
    """

    name = "layercam"
    pgc_class = _RawLayerCAM


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
