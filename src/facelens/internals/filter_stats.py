"""Filter statistics across depth, measured on real faces: entropy, inter-filter correlation, spatial spread.

The CNN-explainability workshop claims that, going deeper, filters become more "complex" (their
entropy rises) and more "independent" (their mutual correlation falls). Here those words are turned
into numbers, per layer, and the trend across depth is tested (Spearman rank correlation between the
layer's depth index and the statistic); :func:`depth_verdicts` writes the finding from the numbers.

Definitions (``A`` is a layer's output on N face chips, N×C×H×W):

- **activation entropy** (bits): for each channel, the Shannon entropy ``−Σ_b p_b log2 p_b`` of the
  histogram of all its N·H·W values in ``bins`` (32) equal bins spanning that channel's [min, max];
  the layer's value is the mean over channels that are not constant (a constant channel has no
  distribution; their share is reported as ``dead_fraction``). Maximum ``log2(bins)`` = 5 bits for
  a uniform spread; a sparse ReLU channel that is mostly zero scores low.
- **visualization entropy** (bits): Shannon entropy of the 256-level grey histogram of each
  activation-maximization image (of its uint8 luma), averaged over
  the layer's visualized channels; max 8 bits.
- **inter-filter correlation**: channels as variables, the N·H·W (face, position) pairs as
  observations; the mean absolute Pearson r over all pairs of distinct non-constant channels (the
  signed mean is kept too). 1 means redundant filters, 0 unrelated ones.
- **spatial variance** (spread): each map (shifted up to ≥ 0 if it has negative values) is read as a
  distribution over positions (normalized to [0, 1] across the chip); its positional variance along
  each axis is divided by that of a uniform map, and the two axes averaged. 1 = activation spread over
  the whole face, → 0 = one spot, > 1 = mass pushed to the borders.
  Undefined (NaN) for 1×1 maps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ModelError
from .activation_max import layer_outputs, resolve_layer

if TYPE_CHECKING:
    from ..models.base import FaceModel

__all__ = ["FilterStats", "LayerStats", "Trend", "activation_entropy", "depth_verdicts", "filter_correlation",
           "filter_stats", "first_conv", "forward_order", "image_entropy", "kernel_image", "layer_ladder",
           "spatial_variance", "trend"]


# -- the statistics ---------------------------------------------------------------------------------
def _as_array(acts: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = acts.detach().cpu().numpy() if isinstance(acts, torch.Tensor) else np.asarray(acts)
    arr = arr.astype(np.float64)
    if arr.ndim == 2:
        arr = arr[:, :, None, None]
    if arr.ndim != 4:
        raise ModelError(f"activations must be N×C×H×W (or N×C), got shape {arr.shape}")
    return arr


def activation_entropy(acts: torch.Tensor | np.ndarray, bins: int = 32) -> tuple[float, float]:
    """(mean histogram entropy in bits over non-constant channels, fraction of constant channels)."""
    arr = _as_array(acts)
    per_channel = arr.transpose(1, 0, 2, 3).reshape(arr.shape[1], -1)
    lo, hi = per_channel.min(1), per_channel.max(1)
    live = hi - lo > 1e-12 * np.maximum(1.0, np.abs(hi))
    ents = []
    for values, a, b in zip(per_channel[live], lo[live], hi[live], strict=True):
        counts, _ = np.histogram(values, bins=bins, range=(a, b))
        p = counts[counts > 0] / counts.sum()
        ents.append(float(-(p * np.log2(p)).sum()))
    return (float(np.mean(ents)) if ents else math.nan), float(1.0 - live.mean())


def filter_correlation(acts: torch.Tensor | np.ndarray) -> tuple[float, float]:
    """(mean |r|, mean r) of the Pearson correlations between distinct non-constant channels."""
    arr = _as_array(acts)
    per_channel = arr.transpose(1, 0, 2, 3).reshape(arr.shape[1], -1)
    live = per_channel.std(1) > 1e-12
    if live.sum() < 2:
        return math.nan, math.nan
    r = np.corrcoef(per_channel[live])
    off = r[~np.eye(len(r), dtype=bool)]
    return float(np.abs(off).mean()), float(off.mean())


def spatial_variance(acts: torch.Tensor | np.ndarray) -> float:
    """Mean positional spread of the activation maps, 1 = uniform over the chip, → 0 = a single spot."""
    arr = _as_array(acts)
    n, c, h, w = arr.shape
    if h * w < 2:
        return math.nan
    maps = arr.reshape(n * c, h, w)
    maps = maps - np.minimum(maps.min(axis=(1, 2), keepdims=True), 0.0)
    mass = maps.sum(axis=(1, 2))
    keep = mass > 1e-12
    if not keep.any():
        return math.nan
    p = maps[keep] / mass[keep, None, None]
    ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
    spreads = []
    for axis_p, coords, size in ((p.sum(2), ys, h), (p.sum(1), xs, w)):
        if size < 2:
            continue
        mean = axis_p @ coords
        var = axis_p @ coords ** 2 - mean ** 2
        spreads.append(var / ((1.0 - 1.0 / size ** 2) / 12.0))
    return float(np.mean(np.mean(spreads, axis=0)))


def image_entropy(images: np.ndarray) -> float:
    """Mean Shannon entropy (bits) of the 256-level grey histograms of N×H×W×3 images (uint8 or [0, 1]).

    The same quantity as ``skimage.measure.shannon_entropy`` of the uint8 luma, computed with one
    ``bincount`` so the statistics need not import scikit-image.
    """
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    if arr.ndim == 3:
        arr = arr[None]
    luma = (arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) + 0.5).astype(np.uint8)
    ents = []
    for g in luma:
        p = np.bincount(g.ravel(), minlength=256) / g.size
        p = p[p > 0]
        ents.append(float(-(p * np.log2(p)).sum()))
    return float(np.mean(ents))


# -- layers in depth order --------------------------------------------------------------------------
def forward_order(model: FaceModel) -> list[tuple[str, tuple[int, ...]]]:
    """(module name, output shape) of every module with a tensor output, in the order they run."""
    order: list[tuple[str, tuple[int, ...]]] = []
    handles = []
    for name, module in model.net.named_modules():
        if not name:
            continue

        def hook(_m: torch.nn.Module, _i: object, out: object, name: str = name) -> None:
            if isinstance(out, torch.Tensor):
                order.append((name, tuple(out.shape)))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.net(torch.full((1, 3, *model.input_size), 0.5))
    finally:
        for h in handles:
            h.remove()
    seen: dict[str, tuple[int, ...]] = {}
    for name, shape in order:
        seen.setdefault(name, shape)
    return list(seen.items())


def layer_ladder(model: FaceModel, n: int = 8) -> list[str]:
    """Up to ``n`` layers at increasing depth: the named early/mid/late layers plus their kin.

    "Kin" are modules whose name has the same pattern with other numbers (``stage1.block2.relu2`` →
    ``stage*.block*.relu2``; the last part keeps its number when all named layers share it) and a 4-D
    output, so the ladder compares like with like (block outputs
    with block outputs). The named layers are always kept; the rest are spread evenly.
    """
    import re

    order = [(name, shape) for name, shape in forward_order(model) if len(shape) == 4]
    index = {name: i for i, (name, _) in enumerate(order)}
    named = [model.layers[d] for d in ("early", "mid", "late") if d in model.layers]
    named += [v for k, v in model.layers.items() if v not in named]
    if named:
        lasts = {v.rsplit(".", 1)[-1] for v in named}

        def pattern(v: str) -> re.Pattern[str]:
            head, _, last = v.rpartition(".")
            if len(lasts) > 1 or not head:  # e.g. relu2, relu3, relu4: the number is the depth
                return re.compile(re.sub(r"\d+", r"\\d+", re.escape(v)) + "$")
            return re.compile(re.sub(r"\d+", r"\\d+", re.escape(head)) + re.escape("." + last) + "$")

        patterns = [pattern(v) for v in named]
        kin = [name for name, _ in order if any(p.match(name) for p in patterns)]
    else:
        kin = [name for name, _ in order if re.search(r"relu|act", name, re.IGNORECASE)] or [n_ for n_, _ in order]
    kin = sorted(set(kin) | {v for v in named if v in index}, key=lambda x: index[x])
    if len(kin) <= n:
        return kin
    keep = set(named)
    others = [k for k in kin if k not in keep]
    slots = max(0, n - len(keep))
    if slots and others:
        picks = np.linspace(0, len(others) - 1, slots)
        keep |= {others[round(float(i))] for i in picks}
    return sorted(keep, key=lambda x: index[x])


def first_conv(model: FaceModel) -> tuple[str, torch.nn.Conv2d]:
    """The first convolution the input meets (by execution order)."""
    modules = dict(model.net.named_modules())
    for name, _ in forward_order(model):
        if isinstance(modules[name], torch.nn.Conv2d):
            return name, modules[name]
    raise ModelError(f"{model.name} has no Conv2d layer")


def kernel_image(model: FaceModel, *, cell: int = 40, columns: int = 16) -> tuple[np.ndarray, str]:
    """The first layer's kernels as one RGB mosaic (grey for one-channel input), and a caption.

    Each kernel is scaled on its own so that 0 is mid-grey and its largest |weight| reaches black or
    white: the pattern each filter matches is visible, its strength is not.
    """
    import cv2

    name, conv = first_conv(model)
    w = conv.weight.detach().cpu().numpy().astype(np.float64)
    out_c, in_c, kh, kw = w.shape
    if in_c == 3:
        tiles = w.transpose(0, 2, 3, 1)
        kind = "RGB colour"
    else:
        tiles = np.repeat(w[:, :1].transpose(0, 2, 3, 1), 3, axis=-1)
        kind = "grey (one input channel)" if in_c == 1 else f"input channel 0 of {in_c}"
    scale = np.abs(tiles).reshape(out_c, -1).max(1).clip(1e-12)[:, None, None, None]
    tiles = 0.5 + 0.5 * tiles / scale
    cols = min(columns, out_c)
    rows = math.ceil(out_c / cols)
    up = max(1, cell // max(kh, kw))
    th, tw = kh * up, kw * up
    pad = 2
    mosaic = np.ones((rows * (th + pad) + pad, cols * (tw + pad) + pad, 3))
    for k in range(out_c):
        r, c = divmod(k, cols)
        tile = cv2.resize(tiles[k].astype(np.float32), (tw, th), interpolation=cv2.INTER_NEAREST)
        y, x = pad + r * (th + pad), pad + c * (tw + pad)
        mosaic[y:y + th, x:x + tw] = tile.reshape(th, tw, 3)
    caption = (f"The {out_c} first-layer filters of {model.name} ({name}, {kh}×{kw}, {kind}), each scaled on "
               "its own: mid-grey is 0, bright and dark are the strongest positive and negative weights.")
    return (mosaic * 255 + 0.5).astype(np.uint8), caption


# -- per-layer table and trends ---------------------------------------------------------------------
@dataclass
class LayerStats:
    """The statistics of one layer (see the module docstring for definitions)."""

    layer: str
    alias: str
    depth: int
    channels: int
    height: int
    width: int
    activation_entropy: float
    dead_fraction: float
    correlation: float
    correlation_signed: float
    spatial_variance: float
    visualization_entropy: float = math.nan


@dataclass
class Trend:
    """Spearman ρ between a statistic and depth, over the layers where it is defined."""

    metric: str
    rho: float
    p: float
    n: int

    @property
    def direction(self) -> str:
        if self.n < 3 or not math.isfinite(self.rho):
            return "undetermined"
        if self.rho > 0.5:
            return "rises"
        if self.rho < -0.5:
            return "falls"
        return "shows no monotonic trend"


def trend(metric: str, values: Sequence[float]) -> Trend:
    """Spearman rank correlation of ``values`` (in depth order) with depth, ignoring NaNs.

    With at most 8 layers the two-sided p-value is exact (all orderings enumerated): scipy's
    t-approximation would call a perfect ρ over 3 layers "p = 0", when 2 of the 6 orderings give |ρ| = 1.
    """
    import itertools

    from scipy.stats import rankdata, spearmanr

    vals = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(vals)
    n = int(ok.sum())
    if n < 3 or np.ptp(vals[ok]) == 0:
        return Trend(metric, math.nan, math.nan, n)
    depth = np.arange(len(vals))[ok].astype(np.float64)
    rho = float(spearmanr(depth, vals[ok]).statistic)
    if n <= 8:
        ranks = rankdata(vals[ok])
        perms = np.array(list(itertools.permutations(range(n))))
        centred = ranks[perms] - ranks.mean()  # every ordering at once: Pearson of ranks with depth
        x = np.arange(n) - (n - 1) / 2
        rho_perm = (centred @ x) / (np.sqrt((centred**2).sum(1)) * np.sqrt((x**2).sum()))
        p = float(np.mean(np.abs(rho_perm) >= abs(rho) - 1e-12))
    else:
        p = float(spearmanr(depth, vals[ok]).pvalue)
    return Trend(metric, rho, p, n)


METRICS = {"activation_entropy": "activation entropy", "visualization_entropy": "visualization entropy",
           "correlation": "inter-filter correlation", "spatial_variance": "spatial spread"}


@dataclass
class FilterStats:
    """Per-layer statistics of one model at increasing depth, the trends, and the kernels mosaic."""

    model: str
    layers: list[LayerStats]
    faces: int
    trends: dict[str, Trend] = field(default_factory=dict)
    kernels: np.ndarray | None = None
    kernels_caption: str = ""

    def rows(self) -> list[dict[str, object]]:
        return [asdict(s) for s in self.layers]

    def as_json(self) -> dict[str, object]:
        return {"model": self.model, "faces": self.faces, "layers": self.rows(),
                "trends": {k: {**asdict(t), "direction": t.direction} for k, t in self.trends.items()},
                "verdicts": depth_verdicts(self)}

    def plot(self) -> np.ndarray:
        """An RGB figure: entropies, correlation and spatial spread against depth."""
        from ..explain.render import figure_to_rgb, new_figure

        fig, axes = new_figure(1, 3, figsize=(12, 3.6))
        x = np.arange(len(self.layers))
        labels = [s.alias or s.layer for s in self.layers]
        act_h = [s.activation_entropy for s in self.layers]
        vis_h = [s.visualization_entropy for s in self.layers]
        axes[0].plot(x, act_h, "o-", label="activations on faces (of 5 bits)")
        vis_ok = [i for i, v in enumerate(vis_h) if math.isfinite(v)]
        if vis_ok:
            ax2 = axes[0].twinx()
            ax2.plot([x[i] for i in vis_ok], [vis_h[i] for i in vis_ok], "s--", color="C3",
                     label="visualizations (of 8 bits)")
            ax2.set_ylabel("visualization entropy (bits)", color="C3", fontsize=8)
            ax2.legend(loc="lower right", fontsize=7)
        axes[0].set_ylabel("activation entropy (bits)", fontsize=8)
        axes[0].legend(loc="upper left", fontsize=7)
        axes[0].set_title("Entropy", fontsize=9)
        axes[1].plot(x, [s.correlation for s in self.layers], "o-", label="mean |r|")
        axes[1].plot(x, [s.correlation_signed for s in self.layers], "^:", label="mean r")
        axes[1].set_title("Inter-filter correlation", fontsize=9)
        axes[1].legend(fontsize=7)
        axes[2].plot(x, [s.spatial_variance for s in self.layers], "o-")
        axes[2].set_title("Spatial spread (1 = uniform)", fontsize=9)
        for ax in axes:
            ax.set_xticks(x)
            ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=6)
            ax.set_xlabel("layer, shallow → deep", fontsize=8)
        fig.suptitle(f"{self.model}: filter statistics across depth ({self.faces} faces)", fontsize=10)
        return figure_to_rgb(fig)


def filter_stats(model: FaceModel, faces: torch.Tensor, layers: Sequence[str] | None = None, *,
                 visualizations: Mapping[str, np.ndarray] | None = None, bins: int = 32,
                 batch_size: int = 32, kernels: bool = True) -> FilterStats:
    """Measure every statistic at each layer (default :func:`layer_ladder`) on face chips (N×3×H×W).

    ``visualizations`` maps a layer (name or alias) to its activation-maximization images (N×H×W×3).
    """
    if faces.dim() != 4 or len(faces) < 2:
        raise ModelError(f"filter statistics need at least 2 face chips as N×3×H×W, got {tuple(faces.shape)}")
    names = list(layers) if layers is not None else layer_ladder(model)
    modules = [resolve_layer(model, n) for n in names]
    depth_index = {name: i for i, (name, _) in enumerate(forward_order(model))}
    order = sorted(range(len(names)), key=lambda i: depth_index.get(modules[i], i))
    names, modules = [names[i] for i in order], [modules[i] for i in order]
    collected: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    with torch.no_grad():
        for i in range(0, len(faces), batch_size):
            out = layer_outputs(model, modules, faces[i:i + batch_size])
            for m in modules:
                collected[m].append(out[m])
    aliases: dict[str, str] = {}
    for k, v in model.layers.items():  # the depth alias wins when one layer has two (dlib-age's early is its cam)
        aliases.setdefault(v, k)
    vis = {resolve_layer(model, k): v for k, v in (visualizations or {}).items()}
    rows: list[LayerStats] = []
    for depth, module in enumerate(modules):
        acts = torch.cat(collected[module]).numpy()
        shape = acts.shape if acts.ndim == 4 else (*acts.shape, 1, 1)
        h_act, dead = activation_entropy(acts, bins)
        corr, corr_signed = filter_correlation(acts)
        rows.append(LayerStats(layer=module, alias=aliases.get(module, ""), depth=depth, channels=int(shape[1]),
                               height=int(shape[2]), width=int(shape[3]), activation_entropy=h_act,
                               dead_fraction=dead, correlation=corr, correlation_signed=corr_signed,
                               spatial_variance=spatial_variance(acts),
                               visualization_entropy=image_entropy(vis[module]) if module in vis else math.nan))
    stats = FilterStats(model=model.name, layers=rows, faces=len(faces))
    stats.trends = {k: trend(k, [getattr(r, k) for r in rows]) for k in METRICS}
    if kernels:
        stats.kernels, stats.kernels_caption = kernel_image(model)
    return stats


def depth_verdicts(stats: FilterStats) -> list[str]:
    """Plain sentences, computed from the trends, on the workshop's claim (entropy ↑, correlation ↓)."""
    out = []
    for key, label in METRICS.items():
        t = stats.trends.get(key)
        if t is None:
            continue
        if t.direction == "undetermined":
            out.append(f"{stats.model}: {label} — trend undetermined ({t.n} layers with a value).")
            continue
        sig = f"p = {t.p:.2g}" if t.p >= 0.001 else "p < 0.001"
        sig += ", not significant at 0.05" if t.p >= 0.05 else ""
        out.append(f"{stats.model}: {label} {t.direction} with depth (Spearman ρ = {t.rho:+.2f} over "
                   f"{t.n} layers, exact {sig}).")
    ent = [stats.trends[k].direction for k in ("activation_entropy", "visualization_entropy") if k in stats.trends]
    cor = stats.trends["correlation"].direction if "correlation" in stats.trends else "undetermined"
    ent_ok = [d == "rises" for d in ent if d != "undetermined"]
    parts = []
    if ent_ok:
        parts.append("entropy rises: " + ("yes" if all(ent_ok) else "no" if not any(ent_ok) else
                                          "only for " + ", ".join(
                                              METRICS[k] for k in ("activation_entropy", "visualization_entropy")
                                              if k in stats.trends and stats.trends[k].direction == "rises")))
    if cor != "undetermined":
        parts.append("correlation falls: " + ("yes" if cor == "falls" else "no"))
    if parts:
        out.append(f"{stats.model}: the workshop's claim on our faces — " + "; ".join(parts) + ".")
    return out
