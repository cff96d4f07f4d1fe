"""Feature inversion: which image does a layer "think" it is looking at?

Starting from noise, we optimize an image so that its features at one layer match those of a real face
(Mahendran & Vedaldi 2015, "Understanding deep image representations by inverting them"). What survives
the inversion is what the layer kept of the photo; what comes back blurred or scrambled was thrown away.

Two image priors, because the answer depends on what the optimizer may draw:

* ``"tv"``: free pixels with Mahendran & Vedaldi's objective, the normalized feature loss
  ``‖Φ(x) − Φ0‖² / ‖Φ0‖²`` plus ``λ · TV^β(x)`` (shared :func:`~facelens.internals.priors.total_variation`),
  with the bounded range enforced by projecting the pixels back into ``[0, 1]`` after every step;
* ``"pyramid"``: a Laplacian-pyramid parameterization: the image is ``0.5 + Σ_k s_k · up(L_k)``, each level
  ``L_k`` a free tensor at 1/2^k resolution, with coarser levels scaled up (``s_k = decay^(k − top)``) so that
  Adam moves them faster. Large structures appear first and high frequencies only where the features ask
  for them.

Both also carry Mahendran & Vedaldi's bounded-range penalty (:func:`bounded_range`), which keeps colours the
network hardly sees (dlib's networks subtract a mean and divide by 256) from drifting to saturation.

Every target at one depth and with every prior is optimized in **one batch**: each step is one truncated
forward (stopped at the layer) and one backward. "input" is the identity layer (Φ(x) = x): inverting it
must give the photo back, which tests the optimizer itself.

We write the optimization loop ourselves: captum, zennit and pytorch-grad-cam attribute, they do not
invert features, and lucent/torch-lucent (which have pyramid parameterizations) are unmaintained and
not dependencies of facelens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FaceLensError, ModelError
from ..models.base import FaceModel
from .priors import total_variation

__all__ = [
    "PRIORS",
    "InterpolationResult",
    "InversionBatch",
    "InversionReport",
    "InversionRun",
    "InversionSettings",
    "extract_features",
    "invert_features",
    "invert_report",
    "pixel_metrics",
]

Prior = Literal["tv", "pyramid"]
PRIORS: tuple[str, ...] = ("tv", "pyramid")
INPUT = "input"


@dataclass(frozen=True)
class InversionSettings:
    """Optimization budget and prior strengths (all written to the JSON next to the results)."""

    steps: int = 100
    lr: float = 0.08
    tv_weight: float = 3.0
    tv_beta: float = 2.0
    pyramid_levels: int = 5
    pyramid_tv_weight: float = 1.0
    pyramid_decay: float = 2.0
    range_weight: float = 1.0
    range_alpha: float = 6.0
    input_prior_scale: float = 0.01
    init_noise: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.steps) != self.steps or self.steps < 1:
            raise FaceLensError(f"steps must be a positive integer, got {self.steps!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FaceLensError(f"lr must be a positive number, got {self.lr!r}")
        if self.tv_weight < 0 or self.pyramid_tv_weight < 0:
            raise FaceLensError("TV weights must be >= 0")
        if self.pyramid_levels < 1:
            raise FaceLensError(f"pyramid_levels must be >= 1, got {self.pyramid_levels!r}")


# -- features --------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by the hook once the layer has its output, so deeper layers are never computed."""


def _layer_name(model: FaceModel, layer: str) -> str:
    if layer == INPUT:
        return INPUT
    name = model.layers.get(layer, layer)
    model.layer(name)  # raises ModelError naming the known depths
    return name


def extract_features(model: FaceModel, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The output of ``layer`` (a module name, a depth alias, or ``"input"``) for chips ``x`` in [0, 1].

    The forward pass stops at the layer: inverting an early layer never pays for the rest of the network.
    """
    name = _layer_name(model, layer)
    if name == INPUT:
        return x
    module = model.layer(name)
    store: dict[str, torch.Tensor] = {}

    def hook(_m: torch.nn.Module, _i: Any, out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            raise ModelError(f"{model.name}: layer {name!r} returns {type(out).__name__}, not a tensor")
        store["out"] = out
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        model.net(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "out" not in store:
        raise ModelError(f"{model.name}: layer {name!r} was not reached by the forward pass")
    return store["out"]


# -- priors ----------------------------------------------------------------------------------------
def _pyramid_sizes(h: int, w: int, levels: int) -> list[tuple[int, int]]:
    sizes = []
    for k in range(levels):
        hk, wk = math.ceil(h / 2**k), math.ceil(w / 2**k)
        if min(hk, wk) < 2:
            break
        sizes.append((hk, wk))
    return sizes


class _Images:
    """A batch of images under one prior: free parameters in, N×3×H×W images in [0, 1] out."""

    def __init__(self, prior: str, start: torch.Tensor, settings: InversionSettings) -> None:
        self.prior = prior
        n, c, h, w = start.shape
        if prior == "tv":
            self.params = [start.clone().requires_grad_(True)]
            self.tv_weight = settings.tv_weight
        elif prior == "pyramid":
            self.sizes = _pyramid_sizes(h, w, settings.pyramid_levels)
            top = len(self.sizes) - 1
            # Level k (k = 0 finest) is scaled by decay^(k − top): with Adam every parameter moves about lr per
            # step, so in the image the coarsest level moves decay^top times faster than the finest.
            self.scales = [settings.pyramid_decay ** (k - top) for k in range(len(self.sizes))]
            gen = torch.Generator().manual_seed(settings.seed + 1)
            # Start from noise as well: every level random, so the image is multi-scale noise around grey.
            self.params = [(settings.init_noise * torch.randn(n, c, hk, wk, generator=gen)).requires_grad_(True)
                           for hk, wk in self.sizes]
            self.hw = (h, w)
            self.tv_weight = settings.pyramid_tv_weight
        else:
            raise FaceLensError(f"unknown prior {prior!r}; priors: {', '.join(PRIORS)}")

    def raw(self) -> torch.Tensor:
        """The image before clipping to [0, 1] (the range penalty acts on it)."""
        if self.prior == "tv":
            return self.params[0]
        total = 0.5 + self.params[0] * self.scales[0]
        for level, scale in zip(self.params[1:], self.scales[1:], strict=True):
            total = total + scale * F.interpolate(level, size=self.hw, mode="bilinear", align_corners=False)
        return total

    def project(self) -> None:
        """Projection onto [0, 1] for free pixels (pyramid images are clipped when shown to the network)."""
        if self.prior == "tv":
            with torch.no_grad():
                self.params[0].clamp_(0.0, 1.0)


def bounded_range(raw: torch.Tensor, alpha: float = 6.0) -> torch.Tensor:
    """Mahendran & Vedaldi's bounded-range prior per image: mean ``|2x − 1|^α``, ≈0 for mid-grey, 1 at black or
    white, growing fast beyond; it keeps colours that the network ignores from drifting to saturation."""
    return (2.0 * raw - 1.0).abs().pow(alpha).flatten(1).mean(1)


# -- the optimization --------------------------------------------------------------------------------
@dataclass
class InversionBatch:
    """Images reconstructed from one layer's features, and how close their features got."""

    layer: str
    priors: list[str]
    images: torch.Tensor  # N×3×H×W in [0, 1]
    feature_distance: np.ndarray  # relative ‖Φ(x) − Φ0‖ / ‖Φ0‖ at the end
    start_distance: np.ndarray  # the same for the starting noise
    curve: np.ndarray  # steps × N normalized feature loss ‖Φ(x) − Φ0‖² / ‖Φ0‖²
    seconds: float


def _relative(f: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
    num = (f - f0).flatten(1).pow(2).sum(1)
    den = f0.flatten(1).pow(2).sum(1).clamp_min(1e-12)
    return num / den


def invert_features(model: FaceModel, layer: str, targets: torch.Tensor, priors: Sequence[str] = ("tv",),
                    settings: InversionSettings | None = None, prior_scale: float | None = None) -> InversionBatch:
    """Invert target features of ``layer`` (shape ``T×...``) under each prior: one batch of ``len(priors)·T``.

    Images come back prior-major: ``images[p * T + t]`` is target ``t`` under ``priors[p]``. ``prior_scale``
    multiplies the TV and range weights; by default it is ``settings.input_prior_scale`` for the input layer
    and 1 elsewhere (Mahendran & Vedaldi also weight TV less for shallow layers: a layer that keeps every
    pixel needs almost no prior, and a strong one would only blur the answer).
    """
    settings = settings or InversionSettings()
    start_time = time.perf_counter()
    targets = targets.detach()
    t = targets.shape[0]
    if t < 1:
        raise FaceLensError("invert_features needs at least one target")
    h, w = model.input_size
    gen = torch.Generator().manual_seed(settings.seed)
    noise = (0.5 + settings.init_noise * torch.randn(t, 3, h, w, generator=gen)).clamp(0, 1)
    groups = [_Images(p, noise, settings) for p in priors]
    params = [p for g in groups for p in g.params]
    opt = torch.optim.Adam(params, lr=settings.lr)
    goal = targets.repeat(len(groups), *([1] * (targets.dim() - 1)))
    if prior_scale is None:
        prior_scale = settings.input_prior_scale if _layer_name(model, layer) == INPUT else 1.0
    tv_w = prior_scale * torch.tensor([g.tv_weight for g in groups for _ in range(t)])
    range_w = prior_scale * settings.range_weight
    curve = np.zeros((settings.steps, len(groups) * t), np.float32)
    with torch.no_grad():
        start = _relative(extract_features(model, noise.repeat(len(groups), 1, 1, 1), layer), goal)
    for step in range(settings.steps):
        # Cosine decay to 5 % of lr: big moves first, then settle on the target.
        lr = settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / settings.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        raw = torch.cat([g.raw() for g in groups])
        x = raw.clamp(0.0, 1.0)
        feat_loss = _relative(extract_features(model, x, layer), goal)
        loss = (feat_loss + tv_w * total_variation(x, settings.tv_beta)
                + range_w * bounded_range(raw, settings.range_alpha))
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        for g in groups:
            g.project()
        curve[step] = feat_loss.detach().numpy()
    with torch.no_grad():
        final = torch.cat([g.raw() for g in groups]).clamp(0.0, 1.0).detach()
        end = _relative(extract_features(model, final, layer), goal)
    return InversionBatch(layer=layer, priors=list(priors), images=final,
                          feature_distance=end.sqrt().numpy(), start_distance=start.sqrt().numpy(),
                          curve=curve, seconds=time.perf_counter() - start_time)


# -- pixel metrics -----------------------------------------------------------------------------------
def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.detach().clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def pixel_metrics(image: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """RMSE (in [0, 1] units) and SSIM (scikit-image, over RGB) between two uint8 H×W×3 images."""
    from skimage.metrics import structural_similarity

    a = np.asarray(image, np.float64) / 255.0
    b = np.asarray(reference, np.float64) / 255.0
    rmse = float(np.sqrt(np.mean((a - b) ** 2)))
    ssim = float(structural_similarity(a, b, channel_axis=2, data_range=1.0))
    return {"rmse": rmse, "ssim": ssim}


# -- results ---------------------------------------------------------------------------------------
@dataclass
class InversionRun:
    """One inversion: a depth, a prior, the image it gave and how far it is from the photo."""

    depth: str
    layer: str
    prior: str
    image: np.ndarray = field(repr=False)  # H×W×3 uint8
    feature_distance: float
    start_feature_distance: float
    rmse: float
    ssim: float
    feature_shape: tuple[int, ...] = ()

    def row(self) -> dict[str, Any]:
        return {"depth": self.depth, "layer": self.layer, "prior": self.prior,
                "features": "×".join(str(s) for s in self.feature_shape),
                "feature_distance_start": self.start_feature_distance, "feature_distance": self.feature_distance,
                "feature_drop": self.feature_distance / max(self.start_feature_distance, 1e-12),
                "rmse": self.rmse, "ssim": self.ssim}


@dataclass
class InterpolationResult:
    """Inversions of ``(1 − α)·Φ(A) + α·Φ(B)`` along α at one layer."""

    layer: str
    prior: str
    alphas: list[float]
    images: list[np.ndarray] = field(repr=False)
    image_a: np.ndarray = field(repr=False)
    image_b: np.ndarray = field(repr=False)
    feature_distance: list[float]
    rmse_to_a: list[float]
    rmse_to_b: list[float]
    output_distance_to_a: list[float]
    output_distance_to_b: list[float]
    output_distance_ab: float
    seconds: float = 0.0

    def rows(self) -> list[dict[str, Any]]:
        return [{"alpha": a, "feature_distance": f, "rmse_to_a": ra, "rmse_to_b": rb,
                 "output_distance_to_a": oa, "output_distance_to_b": ob}
                for a, f, ra, rb, oa, ob in zip(self.alphas, self.feature_distance, self.rmse_to_a, self.rmse_to_b,
                                                self.output_distance_to_a, self.output_distance_to_b, strict=True)]

    def figure(self) -> np.ndarray:
        from ..explain.render import figure_to_rgb, new_figure

        n = len(self.images) + 2
        fig, axes = new_figure(1, n, figsize=(1.7 * n, 2.2), squeeze=False)
        panels = [("photo A", self.image_a)]
        panels += [(f"α={a:g}\nfeat {d:.2f}", im) for a, d, im in zip(self.alphas, self.feature_distance,
                                                                     self.images, strict=True)]
        panels.append(("photo B", self.image_b))
        for ax, (title, im) in zip(axes[0], panels, strict=True):
            ax.imshow(im)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        fig.suptitle(f"Inverting a blend of two faces' features at {self.layer} ({self.prior} prior)", fontsize=9)
        return figure_to_rgb(fig)

    def caption(self) -> str:
        return (f"Left and right: the two aligned faces. In between: images reconstructed from noise so that their "
                f"features at layer {self.layer} match the blend (1−α)·features(A) + α·features(B). "
                f"'feat' is how far the reconstruction's features stayed from the blend (0 = exact, relative to "
                f"the blend's size). A smooth morph means the layer's features vary smoothly between the faces.")


@dataclass
class InversionReport:
    """Feature inversion of one face at several depths and with both priors (``facelens invert``)."""

    model: str
    source: str
    original: np.ndarray = field(repr=False)
    runs: list[InversionRun]
    settings: InversionSettings
    depths: dict[str, str]
    interpolation: InterpolationResult | None = None
    seconds: float = 0.0
    seconds_per_depth: dict[str, float] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        return [r.row() for r in self.runs]

    def run(self, depth: str, prior: str) -> InversionRun:
        for r in self.runs:
            if r.depth == depth and r.prior == prior:
                return r
        raise KeyError(f"no inversion for depth {depth!r} with prior {prior!r}")

    def figure(self) -> np.ndarray:
        """Rows = depth (input → late), columns = the photo then one reconstruction per prior."""
        from ..explain.render import figure_to_rgb, new_figure

        depths = list(dict.fromkeys(r.depth for r in self.runs))
        priors = list(dict.fromkeys(r.prior for r in self.runs))
        cols = 1 + len(priors)
        fig, axes = new_figure(len(depths), cols, figsize=(2.3 * cols, 2.45 * len(depths)), squeeze=False)
        for i, depth in enumerate(depths):
            axes[i, 0].imshow(self.original)
            axes[i, 0].set_title("photo" if i == 0 else "", fontsize=8)
            axes[i, 0].set_ylabel(f"{depth}\n{self.depths[depth]}", fontsize=8)
            axes[i, 0].set_xticks([])
            axes[i, 0].set_yticks([])
            for j, prior in enumerate(priors):
                r = self.run(depth, prior)
                ax = axes[i, 1 + j]
                ax.imshow(r.image)
                ax.set_title(f"{prior}: feat {r.feature_distance:.3f}\nRMSE {r.rmse:.3f}  SSIM {r.ssim:.2f}",
                             fontsize=7)
                ax.axis("off")
        fig.suptitle(f"{self.model}: images rebuilt from one layer's features", fontsize=9)
        return figure_to_rgb(fig)

    def caption(self) -> str:
        return ("Each row rebuilds the face from one layer only, starting from noise: the input itself, then "
                "early, mid and late layers. Columns: the aligned photo, then the reconstruction with the "
                "total-variation prior (smooth free pixels) and with the Laplacian-pyramid prior (coarse shapes "
                "first). 'feat' is the remaining feature mismatch relative to the target (0 = the layer cannot "
                "tell the reconstruction from the photo); RMSE and SSIM compare pixels with the photo "
                f"(RMSE 0 and SSIM 1 = identical). Budget: {self.settings.steps} optimization steps per image.")

    def verdicts(self) -> list[str]:
        out = []
        for r in self.runs:
            out.append(f"{r.depth} ({r.layer}), {r.prior} prior: feature distance {r.start_feature_distance:.3f} → "
                       f"{r.feature_distance:.3f}; pixel RMSE {r.rmse:.3f}, SSIM {r.ssim:.3f}")
        return out

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model, "source": self.source, "settings": asdict(self.settings), "depths": self.depths,
            "runs": self.rows(), "seconds": round(self.seconds, 3),
            "seconds_per_depth": {k: round(v, 3) for k, v in self.seconds_per_depth.items()},
            "definitions": {
                "feature_distance": "‖Φ(x) − Φ(photo)‖ / ‖Φ(photo)‖ at the layer, at the end of the optimization",
                "feature_distance_start": "the same for the starting noise",
                "rmse": "root mean squared pixel difference to the aligned photo, pixels in [0, 1]",
                "ssim": "structural similarity to the aligned photo (scikit-image, RGB, data range 1)",
            },
        }
        if self.interpolation is not None:
            it = self.interpolation
            out["interpolation"] = {"layer": it.layer, "prior": it.prior, "rows": it.rows(),
                                    "output_distance_ab": it.output_distance_ab, "seconds": round(it.seconds, 3)}
        return out

    def html(self, *, level: int = 2) -> str:
        from ..report import html as H

        parts = [H.figure(self.figure(), self.caption()),
                 H.table(self.rows(), caption="Feature inversion per depth and prior: feature distance from start "
                                               "to end (relative), and pixel distance to the photo.")]
        if self.interpolation is not None:
            it = self.interpolation
            parts.append(H.figure(it.figure(), it.caption()))
            parts.append(H.table(it.rows(), caption=(
                f"Interpolation at {it.layer}: pixel RMSE and model-output distance of each reconstruction to "
                f"photo A and B (the two photos are {it.output_distance_ab:.3f} apart in output space).")))
        how = (f"Adam for {self.settings.steps} steps (lr {self.settings.lr}, cosine decay) from Gaussian noise; "
               f"TV prior λ={self.settings.tv_weight}, β={self.settings.tv_beta}, pixels projected into [0, 1]; "
               f"pyramid prior with {self.settings.pyramid_levels} levels. All targets of one depth in one batch. "
               f"Took {self.seconds:.1f} s.")
        return H.section(f"Feature inversion — {self.model}", parts, anchor="inversion", level=level, how=how)

    def write(self, out: str | Path) -> dict[str, Path]:
        from ..outputs import save_png, write_json
        from ..report.html import write_fragment

        out = Path(out)
        paths = {"png": save_png(out / "inversion.png", self.figure())}
        if self.interpolation is not None:
            paths["interpolation_png"] = save_png(out / "interpolation.png", self.interpolation.figure())
        for r in self.runs:
            save_png(out / "images" / f"{r.depth}_{r.prior}.png", r.image)
        paths["json"] = write_json(out / "inversion.json", self.as_json())
        paths["html"] = write_fragment(out / "inversion.html", self.html())
        return paths


# -- the entry point -------------------------------------------------------------------------------
def _chip_tensor(model: FaceModel, image: Any, face: int | None) -> tuple[torch.Tensor, np.ndarray]:
    chip = model.chip(image, face)
    return model.to_tensor(chip), chip.image


def _source(image: Any) -> str:
    return str(image) if isinstance(image, (str, Path)) else "array"


def invert_report(image: Any, *, model: FaceModel | str = "dlib-resnet",
                  layers: Sequence[str] = (INPUT, "early", "mid", "late"), priors: Sequence[str] = PRIORS,
                  settings: InversionSettings | None = None, second: Any = None,
                  alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), interpolation_layer: str = "mid",
                  interpolation_prior: str = "tv", face: int | None = None) -> InversionReport:
    """Invert one face's features at every depth in ``layers`` under every prior; with ``second``, also
    invert blends of the two faces' features at ``interpolation_layer``."""
    from ..models import load_model

    fm = load_model(model) if isinstance(model, str) else model
    settings = settings or InversionSettings()
    for p in (*priors, interpolation_prior):
        if p not in PRIORS:
            raise FaceLensError(f"unknown prior {p!r}; priors: {', '.join(PRIORS)}")
    if not layers:
        raise FaceLensError("give at least one layer to invert")
    start = time.perf_counter()
    depths = {d: _layer_name(fm, d) for d in layers}
    x, original = _chip_tensor(fm, image, face)
    runs: list[InversionRun] = []
    per_depth: dict[str, float] = {}
    with torch.no_grad():
        targets = {d: extract_features(fm, x, d) for d in layers}
    for depth in layers:
        batch = invert_features(fm, depth, targets[depth], priors, settings)
        per_depth[depth] = batch.seconds
        for i, prior in enumerate(priors):
            img = _to_uint8(batch.images[i])
            m = pixel_metrics(img, original)
            runs.append(InversionRun(depth=depth, layer=depths[depth], prior=prior, image=img,
                                     feature_distance=float(batch.feature_distance[i]),
                                     start_feature_distance=float(batch.start_distance[i]),
                                     rmse=m["rmse"], ssim=m["ssim"], feature_shape=tuple(targets[depth].shape[1:])))
    interp = None
    if second is not None:
        interp = interpolate(fm, x, second, layer=interpolation_layer, alphas=alphas, prior=interpolation_prior,
                             settings=settings, face=face, original=original)
    return InversionReport(model=fm.name, source=_source(image), original=original, runs=runs, settings=settings,
                           depths=depths, interpolation=interp, seconds=time.perf_counter() - start,
                           seconds_per_depth=per_depth)


def interpolate(model: FaceModel, x_a: torch.Tensor, second: Any, *, layer: str, alphas: Sequence[float],
                prior: str, settings: InversionSettings, face: int | None = None,
                original: np.ndarray | None = None) -> InterpolationResult:
    """Invert ``(1 − α)·Φ(A) + α·Φ(B)`` for every α, all in one batch."""
    if not alphas:
        raise FaceLensError("give at least one interpolation weight α")
    start = time.perf_counter()
    x_b, image_b = _chip_tensor(model, second, face)
    name = _layer_name(model, layer)
    with torch.no_grad():
        fa, fb = extract_features(model, x_a, layer), extract_features(model, x_b, layer)
        a = torch.tensor([float(v) for v in alphas]).view(-1, *([1] * (fa.dim() - 1)))
        goal = (1 - a) * fa + a * fb
    batch = invert_features(model, layer, goal, (prior,), settings)
    images = [_to_uint8(im) for im in batch.images]
    image_a = original if original is not None else _to_uint8(x_a[0])
    with torch.no_grad():
        out = model.net(torch.cat([x_a, x_b, batch.images])).flatten(1)
    oa, ob = out[0], out[1]
    rest = out[2:]
    return InterpolationResult(
        layer=name, prior=prior, alphas=[float(v) for v in alphas], images=images, image_a=image_a, image_b=image_b,
        feature_distance=[float(v) for v in batch.feature_distance],
        rmse_to_a=[pixel_metrics(im, image_a)["rmse"] for im in images],
        rmse_to_b=[pixel_metrics(im, image_b)["rmse"] for im in images],
        output_distance_to_a=[float(v) for v in torch.linalg.vector_norm(rest - oa, dim=1)],
        output_distance_to_b=[float(v) for v in torch.linalg.vector_norm(rest - ob, dim=1)],
        output_distance_ab=float(torch.linalg.vector_norm(oa - ob)), seconds=time.perf_counter() - start)
