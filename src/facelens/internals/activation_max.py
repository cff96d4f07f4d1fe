"""Filter visualization by activation maximization: the image that most excites a channel.

Gradient ascent on the input image, from near-grey noise, maximizes one unit: the mean of a channel's
activation map (``objective="mean"``, the classic "channel" objective) or its centre neuron
(``"center"``). Without priors the result is high-frequency noise that says more about the optimizer
than about the unit, so every prior of :mod:`facelens.internals.priors` can be switched on or off in
:class:`AMSettings`. Many units are optimized as **one batch** (one image per unit, or per facet), in
one forward pass that stops at the deepest layer needed. A diversity term (Olah et al. 2017) pushes
the facets of one unit apart by penalizing the cosine similarity of their Gram matrices.

Every unit's reached activation is compared with its activation on uniform-noise images (and, when
given, on real face chips), so a visualization that did not actually excite its unit shows up in the
numbers, not just in the picture.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from ..errors import ModelError
from . import priors

if TYPE_CHECKING:
    from ..models.base import FaceModel

__all__ = ["AMSettings", "ActivationMaxResult", "Unit", "layer_outputs", "maximize", "pick_channels",
           "resolve_layer", "sees_gray", "visualize_depths"]

DEPTHS: tuple[str, ...] = ("early", "mid", "late")


class _Stop(Exception):
    """Raised by a hook once every requested layer has run, so the rest of the network is skipped."""


def resolve_layer(model: FaceModel, layer: str) -> str:
    """The module name behind a layer name or depth alias (raises ModelError if there is none)."""
    model.layer(layer)
    return model.layers.get(layer, layer)


def layer_outputs(model: FaceModel, layers: Sequence[str], x: torch.Tensor, *,
                  stop: bool = True) -> dict[str, torch.Tensor]:
    """Outputs of the named layers (names or depth aliases) for input ``x``, keyed as given.

    With ``stop=True`` the forward pass is abandoned as soon as the last of them has run: activation
    maximization of an early layer then costs only the early layers.
    """
    wanted: dict[str, list[str]] = {}
    for name in layers:
        wanted.setdefault(resolve_layer(model, name), []).append(name)
    modules = dict(model.net.named_modules())
    out: dict[str, torch.Tensor] = {}
    handles = []

    def hook(module_name: str):
        def fn(_mod: torch.nn.Module, _inp: object, output: object) -> None:
            if not isinstance(output, torch.Tensor):
                raise ModelError(f"{model.name}: layer {module_name!r} does not output a tensor")
            for key in wanted[module_name]:
                out[key] = output
            if stop and len(out) == len(set(layers)):
                raise _Stop
        return fn

    for module_name in wanted:
        handles.append(modules[module_name].register_forward_hook(hook(module_name)))
    try:
        model.net(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in out]
    if missing:
        raise ModelError(f"{model.name}: layers {missing} did not run in the forward pass")
    return out


@dataclass(frozen=True)
class Unit:
    """One channel of one layer (``layer`` is a module name or a depth alias)."""

    layer: str
    channel: int

    def label(self) -> str:
        return f"{self.layer}:{self.channel}"


@dataclass(frozen=True)
class AMSettings:
    """Optimization budget and priors; every prior is off when its number is 0 (or ``param="pixel"``).

    ``size`` is the square side of the optimized image (None: the model's input size). ``jitter`` is a
    fraction of the image side (0.03: ±4.5 px at 150 px, ±1 px at 32 px), ``scale`` a fraction (0.1:
    zoom 0.9–1.1), ``rotate`` in degrees. ``tv`` weighs total variation (β = 2) against the objective,
    relative to each unit's current objective magnitude, so one weight suits layers whose activations
    differ by orders of magnitude. Every ``blur_every`` steps the image is blurred by ``blur_sigma``
    pixels. ``facets`` images per unit are pushed apart with weight ``diversity``.
    ``redirect``: for an image whose unit is exactly zero (a silent ReLU unit, which a plain gradient
    cannot move), the step's gradient is taken through "redirected" ReLUs that also pass gradients
    which would switch an inactive input on (Olah et al. 2017).
    """

    steps: int = 32
    size: int | None = None
    lr: float = 0.08
    param: Literal["fourier", "pixel"] = "fourier"
    decay: float = 1.0
    decorrelate: bool = True
    jitter: float = 0.03
    scale: float = 0.1
    rotate: float = 10.0
    tv: float = 0.0
    blur_every: int = 0
    blur_sigma: float = 0.5
    objective: Literal["mean", "center"] = "mean"
    facets: int = 1
    diversity: float = 0.0
    redirect: bool = True
    noise_samples: int = 8
    seed: int = 0

    @classmethod
    def no_priors(cls, **overrides: object) -> AMSettings:
        """Plain pixel-space gradient ascent: no transforms, TV, blur or Fourier parameterization."""
        base = cls(param="pixel", decorrelate=False, jitter=0.0, scale=0.0, rotate=0.0, tv=0.0, blur_every=0)
        return replace(base, **overrides)  # type: ignore[arg-type]

    def check(self) -> None:
        if self.steps < 0 or self.facets < 1 or self.noise_samples < 1:
            raise ModelError(f"steps must be >= 0, facets and noise_samples >= 1 (got {self.steps}, "
                             f"{self.facets}, {self.noise_samples})")
        if self.objective not in ("mean", "center"):
            raise ModelError(f"objective must be 'mean' or 'center', got {self.objective!r}")
        if self.param not in ("fourier", "pixel"):
            raise ModelError(f"param must be 'fourier' or 'pixel', got {self.param!r}")
        if self.size is not None and self.size < 8:
            raise ModelError(f"image size must be at least 8 pixels, got {self.size}")

    def priors_on(self) -> list[str]:
        on = []
        if self.param == "fourier":
            on.append("fourier" + ("+decorrelated colour" if self.decorrelate else ""))
        if self.jitter or self.scale or self.rotate:
            on.append(f"transforms (jitter ±{self.jitter:g}·side, scale ±{self.scale:g}, rotate ±{self.rotate:g}°)")
        if self.tv:
            on.append(f"TV {self.tv:g}")
        if self.blur_every:
            on.append(f"blur σ={self.blur_sigma:g} every {self.blur_every}")
        if self.facets > 1:
            on.append(f"{self.facets} facets, diversity {self.diversity:g}")
        return on


@dataclass
class ActivationMaxResult:
    """Images that maximize units, and how strongly they excite them.

    ``images`` is N×H×W×3 float32 in [0, 1]; row ``i`` maximizes ``units[i]`` (facet ``facets[i]``).
    ``activation`` is the objective on the final image (no random transform), ``noise_mean`` and
    ``noise_std`` its mean and spread over uniform-noise images of the same size, ``face_mean`` its
    mean over real face chips (NaN when none were given).
    """

    model: str
    units: list[Unit]
    facets: list[int]
    images: np.ndarray
    activation: np.ndarray
    noise_mean: np.ndarray
    noise_std: np.ndarray
    face_mean: np.ndarray
    settings: AMSettings
    layer_names: dict[str, str] = field(default_factory=dict)
    history: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    grayscale: bool = False
    seconds: float = 0.0

    @property
    def gain(self) -> np.ndarray:
        """Reached activation over the noise activation (∞ where noise gives ≤ 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.noise_mean > 0, self.activation / np.where(self.noise_mean > 0,
                                                                            self.noise_mean, 1), np.inf)

    @property
    def z_score(self) -> np.ndarray:
        """How many noise standard deviations the reached activation lies above the noise mean."""
        return (self.activation - self.noise_mean) / np.maximum(self.noise_std, 1e-8)

    def rows(self) -> list[dict[str, object]]:
        return [{"layer": u.layer, "module": self.layer_names.get(u.layer, u.layer), "channel": u.channel,
                 "facet": f, "activation": float(a), "noise_mean": float(nm), "noise_std": float(ns),
                 "face_mean": float(fm), "gain_vs_noise": float(g), "z_vs_noise": float(z)}
                for u, f, a, nm, ns, fm, g, z in zip(self.units, self.facets, self.activation, self.noise_mean,
                                                     self.noise_std, self.face_mean, self.gain, self.z_score,
                                                     strict=True)]

    def as_json(self) -> dict[str, object]:
        return {"model": self.model, "settings": asdict(self.settings), "priors": self.settings.priors_on(),
                "layers": self.layer_names, "units": self.rows(), "seconds": round(self.seconds, 3)}

    def uint8(self) -> np.ndarray:
        """The images as uint8 RGB; shown as luma when the network only sees grey (its colours are arbitrary)."""
        imgs = np.clip(self.images, 0, 1)
        if self.grayscale:
            imgs = np.repeat((imgs @ np.array([0.299, 0.587, 0.114], np.float32))[..., None], 3, axis=-1)
        return (imgs * 255 + 0.5).astype(np.uint8)

    def grid(self, *, title: str | None = None) -> np.ndarray:
        """An RGB figure: one row per layer (in the order first seen), one column per channel/facet."""
        from ..explain.render import figure_to_rgb, new_figure

        layers = list(dict.fromkeys(u.layer for u in self.units))
        rows_idx = [[i for i, u in enumerate(self.units) if u.layer == layer] for layer in layers]
        cols = max(len(r) for r in rows_idx)
        fig, axes = new_figure(len(layers), cols, figsize=(1.35 * cols + 0.9, 1.55 * len(layers) + 0.5),
                               squeeze=False)
        imgs = self.uint8()
        gains = self.gain
        for r, (layer, idx) in enumerate(zip(layers, rows_idx, strict=True)):
            for c in range(cols):
                ax = axes[r][c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c >= len(idx):
                    ax.axis("off")
                    continue
                i = idx[c]
                ax.imshow(imgs[i], interpolation="nearest")
                facet = f" f{self.facets[i]}" if self.settings.facets > 1 else ""
                g = gains[i]
                gtxt = f"×{g:.1f}" if np.isfinite(g) else f"z={self.z_score[i]:.0f}"
                ax.set_title(f"ch {self.units[i].channel}{facet}  {gtxt}", fontsize=7)
            module = self.layer_names.get(layer, layer)
            label = layer if module == layer else f"{layer}\n{module}"
            axes[r][0].set_ylabel(label, fontsize=7)
        if title:
            fig.suptitle(title, fontsize=9)
        return figure_to_rgb(fig)


def sees_gray(model: FaceModel) -> bool:
    """Whether the network turns its RGB input into grey first (then only luma is meaningful)."""
    from ..models.layers import RGBToGray

    return model.recipe.grayscale or any(isinstance(m, RGBToGray) for m in model.net.modules())


def pick_channels(n_channels: int, n: int) -> list[int]:
    """``n`` channels spread evenly over ``0 … n_channels−1`` (all when there are fewer)."""
    if n >= n_channels:
        return list(range(n_channels))
    return sorted({round(float(v)) for v in np.linspace(0, n_channels - 1, n)})


class _RedirectedReLU(torch.autograd.Function):
    """ReLU whose backward also lets through gradients that would switch an inactive input on.

    A unit that is zero on the grey starting image gets no gradient through a plain ReLU and would never
    move. Used only for such images, only while optimizing.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad * ((x > 0) | (grad < 0)).to(grad.dtype)


def _redirect_relus(model: FaceModel) -> list[torch.utils.hooks.RemovableHandle]:
    def hook(_m: torch.nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> torch.Tensor:
        return _RedirectedReLU.apply(inp[0])

    return [m.register_forward_hook(hook) for m in model.net.modules() if isinstance(m, torch.nn.ReLU)]


def _objective(act: torch.Tensor, channels: torch.Tensor, rows: torch.Tensor, kind: str) -> torch.Tensor:
    """Per row, the unit's objective on a layer output (N×C×H×W, or N×C for a vector layer)."""
    sel = act[rows, channels]
    if sel.dim() == 1:
        return sel
    if kind == "center":
        return sel[:, sel.shape[-2] // 2, sel.shape[-1] // 2]
    return sel.flatten(1).mean(1)


def _unit_scores(model: FaceModel, units: Sequence[Unit], x: torch.Tensor, kind: str) -> torch.Tensor:
    """Objective of every unit on every image: shape (len(x), len(units)), without gradients."""
    layers = list(dict.fromkeys(u.layer for u in units))
    with torch.no_grad():
        acts = layer_outputs(model, layers, x)
    cols = []
    for u in units:
        a = acts[u.layer][:, u.channel]
        cols.append(a if a.dim() == 1 else (a[:, a.shape[-2] // 2, a.shape[-1] // 2] if kind == "center"
                                            else a.flatten(1).mean(1)))
    return torch.stack(cols, 1)


def _diversity(acts: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of the Gram matrices of a group of facets (F×C×H×W)."""
    flat = acts.flatten(2)
    gram = torch.einsum("fci,fdi->fcd", flat, flat).flatten(1)
    gram = torch.nn.functional.normalize(gram, dim=1)
    sim = gram @ gram.T
    f = sim.shape[0]
    return (sim.sum() - sim.diagonal().sum()) / (f * (f - 1))


def maximize(model: FaceModel, units: Sequence[Unit | tuple[str, int]], settings: AMSettings | None = None,
             *, faces: torch.Tensor | None = None, **overrides: object) -> ActivationMaxResult:
    """Optimize one image per unit (``settings.facets`` per unit) in a single batch.

    ``faces`` (N×3×H×W in [0, 1], e.g. ``model.to_tensor(chips)``) adds each unit's mean activation on
    real faces to the result, for scale. Keyword ``overrides`` replace fields of ``settings``.
    """
    s = replace(settings or AMSettings(), **overrides)  # type: ignore[arg-type]
    s.check()
    start = time.perf_counter()
    units = [u if isinstance(u, Unit) else Unit(str(u[0]), int(u[1])) for u in units]
    if not units:
        raise ModelError("activation maximization needs at least one unit")
    layer_names = {u.layer: resolve_layer(model, u.layer) for u in units}
    hw: tuple[int, int] = (int(s.size), int(s.size)) if s.size else tuple(model.input_size)  # type: ignore[assignment]
    probe = layer_outputs(model, list(layer_names), torch.full((1, 3, *hw), 0.5))
    for u in units:
        c = probe[u.layer].shape[1]
        if not 0 <= u.channel < c:
            raise ModelError(f"{model.name}: layer {u.layer!r} has {c} channels, no channel {u.channel}")

    batch_units = [u for u in units for _ in range(s.facets)]
    facets = [f for _ in units for f in range(s.facets)]
    n = len(batch_units)
    gen = torch.Generator().manual_seed(s.seed)
    image = priors.make_image(s.param, n, hw, decay=s.decay, decorrelate=s.decorrelate, generator=gen)
    opt = torch.optim.Adam(image.parameters(), lr=s.lr)
    layers = list(layer_names)
    groups = {layer: (torch.tensor([i for i, u in enumerate(batch_units) if u.layer == layer]),
                      torch.tensor([u.channel for u in batch_units if u.layer == layer])) for layer in layers}
    history = np.zeros((s.steps, n), np.float32)
    params = list(image.parameters())
    jitter = s.jitter * min(hw)
    for step in range(s.steps):
        opt.zero_grad(set_to_none=True)
        x = image()
        xt = priors.random_transform(x, jitter=jitter, scale=s.scale, rotate=s.rotate, generator=gen)
        acts = layer_outputs(model, layers, xt)
        obj = torch.zeros(n)
        for layer, (rows, chans) in groups.items():
            obj = obj.index_add(0, rows, _objective(acts[layer], chans, rows, s.objective))
        dead = torch.nonzero(obj.detach() == 0).flatten() if s.redirect else torch.zeros(0, dtype=torch.long)
        if len(dead):
            # Silent units get no gradient through plain ReLUs: re-run just those images with redirected ones.
            obj = obj * (obj.detach() != 0)
            handles = _redirect_relus(model)
            try:
                dead_acts = layer_outputs(model, layers, xt[dead])
            finally:
                for h in handles:
                    h.remove()
            for layer in layers:
                local = torch.tensor([k for k, i in enumerate(dead.tolist()) if batch_units[i].layer == layer])
                if len(local):
                    chans = torch.tensor([batch_units[int(dead[k])].channel for k in local.tolist()])
                    obj = obj.index_add(0, dead[local], _objective(dead_acts[layer], chans, local, s.objective))
        loss = -obj.sum()
        if s.tv:
            loss = loss + s.tv * (priors.total_variation(x) * obj.detach().abs().clamp_min(1.0)).sum()
        if s.facets > 1 and s.diversity:
            for k in range(len(units)):
                sl = slice(k * s.facets, (k + 1) * s.facets)
                act = acts[units[k].layer][sl]
                if act.dim() == 4:
                    loss = loss + s.diversity * _diversity(act) * obj[sl].detach().abs().mean().clamp_min(1.0)
        loss.backward(inputs=params)  # image gradients only: the shared model's weights stay untouched
        opt.step()
        history[step] = obj.detach().numpy()
        if s.blur_every and (step + 1) % s.blur_every == 0 and step + 1 < s.steps:
            image.blur_(s.blur_sigma)  # type: ignore[operator]

    with torch.no_grad():
        final = image().detach()
    reached = _unit_scores(model, batch_units, final, s.objective).diagonal().numpy()
    noise = torch.rand(s.noise_samples, 3, *hw, generator=gen)
    noise_scores = _unit_scores(model, units, noise, s.objective).numpy()
    noise_mean = np.repeat(noise_scores.mean(0), s.facets)
    noise_std = np.repeat(noise_scores.std(0), s.facets)
    face_mean = np.full(n, np.nan)
    if faces is not None and len(faces):
        f = faces if tuple(faces.shape[-2:]) == hw else torch.nn.functional.interpolate(
            faces, size=hw, mode="bilinear", align_corners=False, antialias=True)
        face_mean = np.repeat(_unit_scores(model, units, f, s.objective).numpy().mean(0), s.facets)
    return ActivationMaxResult(
        model=model.name, units=batch_units, facets=facets, images=final.permute(0, 2, 3, 1).numpy().astype(np.float32),
        activation=reached.astype(np.float64), noise_mean=noise_mean.astype(np.float64),
        noise_std=noise_std.astype(np.float64), face_mean=face_mean.astype(np.float64), settings=s,
        layer_names=layer_names, history=history, grayscale=sees_gray(model), seconds=time.perf_counter() - start)


def visualize_depths(model: FaceModel, depths: Sequence[str] = DEPTHS, channels: int | Sequence[int] = 8,
                     settings: AMSettings | None = None, *, faces: torch.Tensor | None = None,
                     **overrides: object) -> ActivationMaxResult:
    """The workshop figure's data: ``channels`` units at each depth, optimized together in one batch.

    ``channels`` is a count (spread evenly over each layer's channels) or explicit indices used at
    every depth. Call ``.grid()`` on the result for the figure (rows = depth, columns = channels).
    """
    units: list[Unit] = []
    for depth in depths:
        if isinstance(channels, int):
            out = layer_outputs(model, [depth], torch.full((1, 3, *model.input_size), 0.5))[depth]
            chosen = pick_channels(out.shape[1], channels)
        else:
            chosen = [int(c) for c in channels]
        units.extend(Unit(depth, c) for c in chosen)
    return maximize(model, units, settings, faces=faces, **overrides)
