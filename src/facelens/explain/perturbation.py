"""Perturbation methods on the shared engine: occlusion, RISE, LIME and KernelSHAP.

Captum has Occlusion, Lime and KernelShap, and pytorch-grad-cam has nothing of
the kind; we still write these four over our own `PerturbationEngine` because
every perturbation method and metric must share one batching, memory, seeding
and caching policy (and explain pair targets such as "why is A matched to B").
Captum's versions are the reference they are tested against.

Cost: each perturbed batch is built from a small description (window indices,
low-resolution RISE grids, binary feature vectors) by one ``addcmul`` inside the
engine, so the forward passes dominate. All sampling is drawn up front from the
method's seed in an order that does not depend on ``batch_size``, so the same
seed gives the same map whatever the batch size.

``fill_image`` (what a removed pixel becomes) and ``feature_attribution`` (LIME,
KernelSHAP or occlusion over any label map) are public: the metrics and the
face-region methods reuse them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ModelError
from ..faces.align import Chip
from ..targets import Target
from .base import PerturbationMethod, register
from .engine import PerturbationEngine

__all__ = [
    "BLUR_SIGMA",
    "FILL_KINDS",
    "REMOVAL_BLUR_SIGMA",
    "FeatureAttribution",
    "KernelShap",
    "Lime",
    "Occlusion",
    "Rise",
    "RiseMasks",
    "feature_attribution",
    "fill_image",
    "occlusion_windows",
    "rise_masks",
    "superpixels",
]

FillKind = Literal["zero", "mean", "blur"]
FILL_KINDS = ("zero", "mean", "blur")
BLUR_SIGMA = 0.04  # σ as a fraction of the image side, as DISE blurs
#: σ (fraction of the side) of the blur that *removes* a face in faithfulness metrics and target ranges.
#: DISE's 0.04 keeps a face recognizable: on 24 FRL London chips dlib-resnet still matched 92 % of them
#: to the intact photo (cohort z 2.9 of 5.5); at 0.12 the score falls to the impostor level (−0.09).
REMOVAL_BLUR_SIGMA = 0.12
FeatureMethod = Literal["lime", "kernelshap", "occlusion"]

# Occlusion windows scale with the chip: 16 px windows, stride 8, on 150 px dlib chips.
_REFERENCE_SIDE = 150
_REFERENCE_WINDOW = 16
_REFERENCE_STRIDE = 8
_MASK_CHUNK = 4096  # RISE grids are drawn this many at a time, whatever the batch size


# -- fills -----------------------------------------------------------------------------------------------
def fill_image(x: torch.Tensor, kind: str = "zero", *, blur_sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """What removed pixels become: ``zero`` (black), ``mean`` (each image's per-channel mean)
    or ``blur`` (Gaussian blur with σ = ``blur_sigma`` × the mean image side).

    ``x`` is ``(N, C, H, W)``; the result has the same shape. Black is what the RISE and
    Score-CAM papers use; mean and blur remove detail without adding a strong dark edge.
    """
    if x.dim() != 4:
        raise ModelError(f"fill_image needs N×C×H×W images, got shape {tuple(x.shape)}")
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
    if kind == "blur":
        from torchvision.transforms.v2.functional import gaussian_blur

        h, w = x.shape[-2:]
        sigma = float(blur_sigma) * (h + w) / 2.0
        if sigma <= 0:
            raise ModelError(f"blur_sigma must be positive, got {blur_sigma}")
        # ±3σ, but reflect padding needs the half-width below the image side
        half = max(1, min(math.ceil(3 * sigma), h - 1, w - 1))
        return gaussian_blur(x, kernel_size=[2 * half + 1, 2 * half + 1], sigma=[sigma, sigma])
    raise ModelError(f"fill must be one of {', '.join(FILL_KINDS)}; got {kind!r}")


# -- features ---------------------------------------------------------------------------------------------
def superpixels(x: torch.Tensor, n_segments: int = 50, kind: str = "slic") -> np.ndarray:
    """An ``H×W`` int label map of one image ``(1, 3, H, W)`` or ``(3, H, W)``.

    ``slic``: skimage's SLIC superpixels (what LIME's image explainer uses);
    ``grid``: a square grid of about ``n_segments`` cells (round(√n) per side),
    which does not depend on the image content.
    """
    img = x[0] if x.dim() == 4 else x
    h, w = img.shape[-2:]
    if n_segments < 1:
        raise ModelError(f"n_segments must be ≥ 1, got {n_segments}")
    if kind == "grid":
        side = max(1, round(math.sqrt(n_segments)))
        rows = (np.arange(h) * side) // h
        cols = (np.arange(w) * side) // w
        return (rows[:, None] * side + cols[None, :]).astype(np.int64)
    if kind == "slic":
        from skimage.segmentation import slic

        rgb = img.detach().float().cpu().permute(1, 2, 0).numpy().astype(np.float64)
        if rgb.shape[2] != 3:
            raise ModelError(f"SLIC superpixels need a 3-channel image, got {rgb.shape[2]} channels")
        return slic(rgb, n_segments=int(n_segments), compactness=10.0, start_label=0,
                    channel_axis=-1).astype(np.int64)
    raise ModelError(f"features must be 'slic' or 'grid', got {kind!r}")


@dataclass(frozen=True)
class FeatureAttribution:
    """Scores of the features of a label map, and the same painted on the pixel grid.

    Attributes:
        labels: the label of each feature, ``(F,)``, ascending (negative labels are not features).
        values: one score per feature, ``(F,)``: LIME coefficients, Shapley values, or occlusion drops.
        map: ``(H, W)``: each pixel carries its feature's value (0 on pixels that are never perturbed).
        intercept: LIME's intercept; KernelSHAP's φ₀ = score with every feature removed;
            occlusion's score of the intact image.
        evaluations: forward evaluations spent.
    """

    labels: torch.Tensor
    values: torch.Tensor
    map: torch.Tensor
    intercept: float
    evaluations: int


def _shapley_kernel(sizes: np.ndarray, n_features: int) -> np.ndarray:
    """(M−1) / (C(M, k)·k·(M−k)) for 0 < k < M, the weight of a coalition of size k."""
    m = n_features
    return np.array([(m - 1) / (math.comb(m, int(k)) * k * (m - k)) for k in sizes], np.float64)


def _kernelshap_design(n_features: int, n_samples: int, g: torch.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """Coalitions (first all-present, second all-removed) and their regression weights.

    When every coalition fits in the budget they are all enumerated with their exact
    Shapley-kernel weights, which gives the exact Shapley values. Otherwise coalition
    sizes are drawn in proportion to the kernel's total mass per size, subsets uniformly
    within a size, each paired with its complement (as the shap package does), so the
    draws already follow the kernel and carry equal weights.
    """
    m = n_features
    full, empty = torch.ones(1, m, dtype=torch.bool), torch.zeros(1, m, dtype=torch.bool)
    if m < 30 and 2 ** m <= n_samples:
        codes = torch.arange(1, 2 ** m - 1)
        inner = (codes[:, None] >> torch.arange(m)[None, :]) & 1 == 1
        weights = _shapley_kernel(inner.sum(1).numpy(), m)
        return torch.cat([full, empty, inner]), weights
    n_draw = n_samples - 2
    if n_draw < 1:
        raise ModelError(f"kernelshap needs n_samples ≥ 3, got {n_samples}")
    sizes = np.arange(1, m)
    size_mass = (m - 1) / (sizes * (m - sizes))  # kernel weight × number of subsets of that size
    probs = torch.as_tensor(size_mass / size_mass.sum())
    n_pairs, odd = divmod(n_draw, 2)
    k = torch.multinomial(probs, n_pairs + odd, replacement=True, generator=g) + 1
    ranks = torch.rand(n_pairs + odd, m, generator=g).argsort(1).argsort(1)
    z = ranks < k[:, None]
    inner = torch.cat([z, ~z[:n_pairs]])
    return torch.cat([full, empty, inner]), np.ones(len(inner))


def _lime_design(n_features: int, n_samples: int, g: torch.Generator) -> torch.Tensor:
    """LIME's samples: the intact image, then a uniformly drawn number of kept features and a
    uniform subset of that size (Ribeiro et al. 2016, §3.3)."""
    m = n_features
    if n_samples < 2:
        raise ModelError(f"lime needs n_samples ≥ 2, got {n_samples}")
    k = torch.randint(1, m + 1, (n_samples - 1,), generator=g)
    ranks = torch.rand(n_samples - 1, m, generator=g).argsort(1).argsort(1)
    return torch.cat([torch.ones(1, m, dtype=torch.bool), ranks < k[:, None]])


def _fit_kernelshap(z: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, float]:
    """Weighted least squares under the efficiency constraint Σφ = f(all) − f(none).

    Rows 0 and 1 of ``z`` are the all-present and all-removed coalitions; the constraint
    eliminates the last feature, as in Lundberg & Lee's reference implementation.
    """
    f_all, f_none = float(y[0]), float(y[1])
    total = f_all - f_none
    m = z.shape[1]
    if m == 1:
        return np.array([total]), f_none
    zz, yy = z[2:].astype(np.float64), y[2:].astype(np.float64)
    target = yy - f_none - zz[:, -1] * total
    design = zz[:, :-1] - zz[:, -1:]
    sw = np.sqrt(weights)[:, None]
    coef, *_ = np.linalg.lstsq(design * sw, target * sw[:, 0], rcond=None)
    return np.append(coef, total - coef.sum()), f_none


def _fit_lime(z: np.ndarray, y: np.ndarray, kernel_width: float, regressor: str,
              alpha: float) -> tuple[np.ndarray, float]:
    """Exponential kernel on the cosine distance to the intact image, then a weighted
    (ridge or lasso) linear fit, as in LIME."""
    from sklearn.linear_model import Lasso, Ridge

    zf = z.astype(np.float64)
    kept = zf.sum(1)
    cosine_distance = 1.0 - np.sqrt(kept / z.shape[1])  # cos(z, 1) = |z| / (√|z| · √M)
    weights = np.exp(-(cosine_distance ** 2) / kernel_width ** 2)
    model = Ridge(alpha=alpha) if regressor == "ridge" else Lasso(alpha=alpha)
    model.fit(zf, y.astype(np.float64), sample_weight=weights)
    return np.asarray(model.coef_, np.float64), float(model.intercept_)


def feature_attribution(
    engine: PerturbationEngine,
    base: torch.Tensor,
    fill: torch.Tensor,
    feature_map: np.ndarray | torch.Tensor,
    method: FeatureMethod = "kernelshap",
    n_samples: int = 1000,
    generator: torch.Generator | None = None,
    *,
    kernel_width: float = 0.25,
    regressor: str = "ridge",
    alpha: float = 1.0,
) -> FeatureAttribution:
    """Attribute ``engine``'s target to the features of a label map by removing features.

    A feature is the set of pixels sharing a label in ``feature_map`` (``H×W`` ints: superpixels,
    grid cells, landmark regions...); pixels with a negative label are never removed. A
    removed feature's pixels take their values from ``fill`` (``(1, C, H, W)``, see `fill_image`).

    Methods:
        ``kernelshap``: Shapley values by KernelSHAP (exact when 2^F ≤ ``n_samples``).
        ``lime``: LIME's weighted ridge (or lasso) coefficients; ``kernel_width``, ``regressor``
            and ``alpha`` as in LIME.
        ``occlusion``: score drop when each feature alone is removed (F + 1 evaluations;
            ``n_samples`` is ignored).

    Coalitions are drawn from ``generator`` (seed 0 when None) before any forward pass, so the
    result does not depend on the engine's batch size.
    """
    if method == "lime" and (regressor not in ("ridge", "lasso") or kernel_width <= 0):
        raise ModelError(f"lime needs regressor 'ridge' or 'lasso' and kernel_width > 0; "
                         f"got {regressor!r}, {kernel_width}")
    fmap = torch.as_tensor(np.asarray(feature_map)).long()
    if fmap.shape != base.shape[-2:]:
        raise ModelError(f"feature map is {tuple(fmap.shape)}, the image is {tuple(base.shape[-2:])}")
    labels, inverse = torch.unique(fmap, return_inverse=True)
    n_fixed_labels = int((labels < 0).sum())
    labels = labels[n_fixed_labels:]
    n_features = len(labels)
    if n_features == 0:
        raise ModelError("feature map has no features (every label is negative)")
    # column 0 of the padded coalition matrix is "always kept" for never-removed pixels
    pixel_column = (inverse - n_fixed_labels + 1).clamp(min=0).flatten().to(base.device)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    before = engine.evaluations

    if method == "kernelshap":
        coalitions, weights = _kernelshap_design(n_features, int(n_samples), g)
    elif method == "lime":
        coalitions, weights = _lime_design(n_features, int(n_samples), g), np.empty(0)
    elif method == "occlusion":
        coalitions = torch.cat([torch.ones(1, n_features, dtype=torch.bool),
                                ~torch.eye(n_features, dtype=torch.bool)])
        weights = np.empty(0)
    else:
        raise ModelError(f"method must be 'lime', 'kernelshap' or 'occlusion', got {method!r}")

    padded = torch.cat([torch.ones(len(coalitions), 1, dtype=torch.bool), coalitions], 1)
    padded = padded.to(base.device, base.dtype)  # converted once: masks are gathered ready to use
    h, w = base.shape[-2:]

    def masks(start: int, stop: int) -> torch.Tensor:
        return padded[start:stop].index_select(1, pixel_column).view(-1, 1, h, w)

    scores = engine.run_masks(base, fill, len(coalitions), masks).double().cpu().numpy()
    z = coalitions.numpy()
    if method == "kernelshap":
        values, intercept = _fit_kernelshap(z, scores, weights)
    elif method == "lime":
        values, intercept = _fit_lime(z, scores, kernel_width, regressor, alpha)
    else:
        values, intercept = scores[0] - scores[1:], float(scores[0])
    vals = torch.as_tensor(values, dtype=torch.float32)
    painted = torch.cat([torch.zeros(1), vals]).index_select(0, pixel_column.cpu()).view(h, w)
    return FeatureAttribution(labels=labels, values=vals, map=painted, intercept=float(intercept),
                              evaluations=engine.evaluations - before)


# -- occlusion --------------------------------------------------------------------------------------------
def occlusion_windows(size: int, window: int, stride: int) -> torch.Tensor:
    """``(n, size)`` bool: which pixels of one axis each window position covers.

    Positions are ``0, stride, 2·stride, ...`` with ``ceil((size − window) / stride) + 1`` of
    them, the last cropped at the border, exactly as captum's ``Occlusion`` slides its window.
    """
    if not 1 <= window <= size:
        raise ModelError(f"occlusion window must be between 1 and the image side {size}, got {window}")
    if not 1 <= stride <= window:
        raise ModelError(f"occlusion stride must be between 1 and the window {window}, got {stride}")
    count = math.ceil((size - window) / stride) + 1
    starts = torch.arange(count)[:, None] * stride
    pixels = torch.arange(size)[None, :]
    return (pixels >= starts) & (pixels < starts + window)


def _scaled(reference: int, side: int) -> int:
    return max(1, round(reference * side / _REFERENCE_SIDE))


@register
class Occlusion(PerturbationMethod):
    """Sliding-window occlusion (Zeiler & Fergus 2014) on the shared engine.

    Each pixel gets the mean score drop over the windows that cover it, as captum's
    ``Occlusion`` defines it; windows cover all colour channels, so the map is that
    per-pixel value (no channel reduction). ``window``/``stride`` default to 16/8 px on a
    150 px chip, scaled with the chip side; the values used are recorded. Signed: an
    occluded window can raise the score.

    ``incremental`` (see `facelens.explain.incremental`): ``"exact"`` recomputes only what
    each window changes and gives the full recompute's map up to float rounding; ``"approx"``
    also caps the changed regions at ``tau`` of each map's side and drills down from a coarse
    grid of windows (``drill_factor``, ``drill_fraction``) and, with ``precision="auto"`` on a
    CPU with native bfloat16, rounds its convolutions to bfloat16; ``None`` scores every window with
    full forwards. The default ``"auto"`` is ``"exact"`` when every layer a window reaches is
    supported, else ``None``. What ran is recorded in ``extras["incremental"]``.
    """

    name = "occlusion"
    library = "facelens"
    signed = True
    defaults: ClassVar[dict[str, object]] = {"window": None, "stride": None, "fill": "zero", "incremental": "auto",
                                             "tau": 0.4, "drill_factor": 2, "drill_fraction": 0.25,
                                             "precision": "auto"}

    def _geometry(self, h: int, w: int) -> tuple[int, int]:
        side = min(h, w)
        window = int(self.settings["window"]) if self.settings["window"] is not None else _scaled(
            _REFERENCE_WINDOW, side)
        stride = int(self.settings["stride"]) if self.settings["stride"] is not None else min(
            window, _scaled(_REFERENCE_STRIDE, side))
        return window, stride

    def used_settings(self) -> dict[str, object]:
        used = super().used_settings()
        if getattr(self, "_resolved", None):
            used.update(self._resolved)
        return used

    def _incremental_mode(self, x: torch.Tensor) -> str | None:
        """The incremental mode to run: the setting, with ``"auto"`` resolved for this network."""
        from .incremental import incremental_net

        setting = self.settings["incremental"]
        if setting is None or setting is False or setting == "none":
            return None
        if setting in ("exact", "approx"):
            return str(setting)
        if setting != "auto":
            raise ModelError(f"occlusion: incremental must be 'auto', 'exact', 'approx' or None; got {setting!r}")
        inet = incremental_net(self.model.net)
        return "exact" if inet.traced and not inet.unsupported(tuple(x.shape)) else None

    def attribute_one(self, x: torch.Tensor, target: Target, chip: Chip | None) -> torch.Tensor:
        h, w = x.shape[-2:]
        window, stride = self._geometry(h, w)
        rows = occlusion_windows(h, window, stride).to(x.device, x.dtype)
        cols = occlusion_windows(w, window, stride).to(x.device, x.dtype)
        mode = self._incremental_mode(x)
        self._resolved = {"window": window, "stride": stride, "incremental": mode}
        fill = fill_image(x, str(self.settings["fill"]))
        if mode is not None:
            from .incremental import incremental_occlusion

            result = incremental_occlusion(
                self.model.net, x, target, window=window, stride=stride, fill=fill, mode=mode,  # type: ignore[arg-type]
                batch_size=self.batch_size, tau=float(self.settings["tau"]),  # type: ignore[arg-type]
                drill_factor=int(self.settings["drill_factor"]),  # type: ignore[call-overload]
                drill_fraction=float(self.settings["drill_fraction"]),  # type: ignore[arg-type]
                precision=str(self.settings["precision"]))  # type: ignore[arg-type]
            self.extras = {"incremental": result.record()}
            return result.map
        n_rows, n_cols = len(rows), len(cols)
        engine = self.engine(target)
        intact = engine.score(x)[0].float()

        def masks(start: int, stop: int) -> torch.Tensor:
            idx = torch.arange(start, stop, device=x.device)
            covered = rows[idx // n_cols][:, :, None] * cols[idx % n_cols][:, None, :]
            return (1.0 - covered).unsqueeze(1)

        scores = engine.run_masks(x, fill, n_rows * n_cols, masks)
        drops = (intact - scores.to(x.device)).view(n_rows, n_cols).to(x.dtype)
        total = rows.T @ drops @ cols
        coverage = rows.sum(0)[:, None] * cols.sum(0)[None, :]
        self.extras = {"incremental": {"mode": None, "evaluations": n_rows * n_cols + 1}}
        return total / coverage


# -- RISE -------------------------------------------------------------------------------------------------
@dataclass
class RiseMasks:
    """RISE's random masks, kept as low-resolution grids plus shifts and upsampled per batch.

    Memory is ``n × grid²`` bits plus two shifts per mask, whatever ``n`` and the image size.
    """

    grids: torch.Tensor  # (n, 1, grid, grid) bool
    shifts: torch.Tensor  # (n, 2) int: row and column offsets of the crop
    size: tuple[int, int]
    cell: tuple[int, int]

    def __len__(self) -> int:
        return len(self.grids)

    def __call__(self, start: int, stop: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Masks ``start..stop-1`` as ``(B, 1, H, W)`` in [0, 1]."""
        grid = self.grids.shape[-1]
        h, w = self.size
        big = ((grid + 1) * self.cell[0], (grid + 1) * self.cell[1])
        low = self.grids[start:stop].to(device=device, dtype=dtype)
        up = F.interpolate(low, size=big, mode="bilinear", align_corners=False)[:, 0]
        shift = self.shifts[start:stop].to(device)
        # every (h, w) crop of each mask as a view; picking one per mask copies whole rows, twice as
        # fast as indexing every pixel
        crops = up.unfold(1, h, 1).unfold(2, w, 1)
        return crops[torch.arange(len(up), device=device), shift[:, 0], shift[:, 1]].unsqueeze(1)

    def weighted_sum(self, weights: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """``Σ_i weights_i · mask_i`` as ``(H, W)`` float64, without rebuilding every mask.

        Upsampling and cropping are linear, so masks sharing a shift are summed as low-resolution
        grids first: at most one upsample per distinct shift (``cell²`` of them), not one per mask.
        """
        grid = self.grids.shape[-1]
        keys = self.shifts[:, 0] * self.cell[1] + self.shifts[:, 1]
        used, slot = torch.unique(keys, return_inverse=True)
        summed = torch.zeros(len(used), 1, grid, grid, dtype=torch.float64)
        summed.index_add_(0, slot, weights.double().cpu()[:, None, None, None] * self.grids)
        shifts = torch.stack([used // self.cell[1], used % self.cell[1]], 1)
        grouped = RiseMasks(summed, shifts, self.size, self.cell)
        total = torch.zeros(self.size, dtype=torch.float64)
        for start in range(0, len(used), chunk):
            total += grouped(start, min(len(used), start + chunk), dtype=torch.float64).sum(0)[0]
        return total


def rise_masks(n: int, size: tuple[int, int], grid: int = 7, p_keep: float = 0.5,
               generator: torch.Generator | None = None) -> RiseMasks:
    """Petsiuk et al.'s masks: a ``grid×grid`` Bernoulli(``p_keep``) grid, bilinearly upsampled
    to ``(grid + 1)`` cells and cropped at a random shift within one cell.

    Drawn in fixed chunks of the generator's stream, so they depend on the seed only.
    """
    if grid < 1 or not 0.0 < p_keep <= 1.0 or n < 1:
        raise ModelError(f"RISE needs n_masks ≥ 1, grid ≥ 1 and 0 < p_keep ≤ 1; got {n}, {grid}, {p_keep}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    h, w = size
    cell = (math.ceil(h / grid), math.ceil(w / grid))
    grids, shifts = [], []
    for start in range(0, n, _MASK_CHUNK):
        m = min(_MASK_CHUNK, n - start)
        grids.append(torch.rand(m, 1, grid, grid, generator=g) < p_keep)
        shifts.append(torch.stack([torch.randint(0, cell[0], (m,), generator=g),
                                   torch.randint(0, cell[1], (m,), generator=g)], 1))
    return RiseMasks(torch.cat(grids), torch.cat(shifts), (h, w), cell)


@register
class Rise(PerturbationMethod):
    """RISE (Petsiuk et al. 2018): the score-weighted mean of random soft masks,
    ``Σ score·mask / (N·p_keep)``; masks keep pixels (1) or replace them by ``fill``.

    The paper's map carries the mean score as an offset, plus that offset times the random
    fluctuation of mask density from pixel to pixel: noise that grows with the target's
    additive constant (a logit, a cosine near 1). ``center=True`` subtracts the mean score
    first, ``Σ (score − mean)·mask / (N·p_keep)``: the covariance of score and mask, signed
    (negative where keeping the pixel lowers the score), which localizes far better on
    the known-answer model at the same budget.
    """

    name = "rise"
    library = "facelens"
    signed = False
    defaults: ClassVar[dict[str, object]] = {"n_masks": 2000, "grid": 7, "p_keep": 0.5, "fill": "zero",
                                             "center": False}

    def attribute_one(self, x: torch.Tensor, target: Target, chip: Chip | None) -> torch.Tensor:
        n = int(self.settings["n_masks"])  # type: ignore[call-overload]
        p_keep = float(self.settings["p_keep"])  # type: ignore[arg-type]
        h, w = x.shape[-2:]
        masks = rise_masks(n, (h, w), int(self.settings["grid"]), p_keep,  # type: ignore[call-overload]
                           self.generator())
        engine = self.engine(target)

        def batch(start: int, stop: int) -> torch.Tensor:
            return masks(start, stop, x.device, x.dtype)

        scores = engine.run_masks(x, fill_image(x, str(self.settings["fill"])), n, batch).double()
        if self.settings["center"]:
            scores = scores - scores.mean()
        return (masks.weighted_sum(scores) / (n * p_keep)).float().to(x.device)


# -- LIME and KernelSHAP ----------------------------------------------------------------------------------
class _SuperpixelMethod(PerturbationMethod):
    """Shared by LIME and KernelSHAP: superpixel (or grid) features, a fill, a budget."""

    signed = True
    kind: ClassVar[FeatureMethod]
    defaults: ClassVar[dict[str, object]] = {"n_samples": 1000, "n_segments": 50, "features": "slic",
                                             "fill": "mean"}

    def _fit_options(self) -> dict[str, object]:
        return {}

    def attribute_one(self, x: torch.Tensor, target: Target, chip: Chip | None) -> torch.Tensor:
        labels = superpixels(x, int(self.settings["n_segments"]),  # type: ignore[call-overload]
                             str(self.settings["features"]))
        result = feature_attribution(
            self.engine(target), x, fill_image(x, str(self.settings["fill"])), labels, self.kind,
            int(self.settings["n_samples"]), self.generator(), **self._fit_options())  # type: ignore[arg-type, call-overload]
        self.extras = {"features": labels, "feature_values": result.values.numpy(),
                       "intercept": result.intercept}
        return result.map


@register
class Lime(_SuperpixelMethod):
    """LIME (Ribeiro et al. 2016) over superpixels, on the shared engine; each pixel carries
    its superpixel's coefficient."""

    name = "lime"
    library = "facelens"
    kind = "lime"
    defaults: ClassVar[dict[str, object]] = {**_SuperpixelMethod.defaults, "kernel_width": 0.25,
                                             "regressor": "ridge", "alpha": 1.0}

    def _fit_options(self) -> dict[str, object]:
        return {"kernel_width": float(self.settings["kernel_width"]),  # type: ignore[arg-type]
                "regressor": str(self.settings["regressor"]), "alpha": float(self.settings["alpha"])}  # type: ignore[arg-type]


@register
class KernelShap(_SuperpixelMethod):
    """KernelSHAP (Lundberg & Lee 2017) over superpixels, on the shared engine; each pixel
    carries its superpixel's Shapley value, and the values sum to score(image) − score(fill)."""

    name = "kernelshap"
    library = "facelens"
    kind = "kernelshap"

