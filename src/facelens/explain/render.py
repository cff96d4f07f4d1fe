"""Drawing maps: overlays on the photo, a colorbar, and side-by-side grids of methods.

Figures are made with matplotlib's Agg backend only, so rendering works on a
headless server and never opens a window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .explanation import Explanation

__all__ = ["figure_grid", "figure_to_rgb", "new_figure", "normalize_map", "overlay"]


def new_figure(*args: object, **kwargs: object) -> tuple[object, object]:
    """``plt.subplots`` on the headless Agg backend (no window, safe on servers and in threads)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def figure_to_rgb(fig: object) -> np.ndarray:
    """Render a figure to an RGB uint8 array and close it (figures are saved with `save_png`)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()  # type: ignore[attr-defined]
    fig.canvas.draw()  # type: ignore[attr-defined]
    rgb = np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return rgb


def normalize_map(saliency: np.ndarray, signed: bool = False, percentile: float = 99.5) -> np.ndarray:
    """Scale a map for display: [0, 1] (or [−1, 1] when signed), robust to a few extreme pixels."""
    m = np.nan_to_num(np.asarray(saliency, np.float64))
    if signed:
        scale = np.percentile(np.abs(m), percentile) or np.abs(m).max() or 1.0
        return np.clip(m / scale, -1, 1)
    lo = m.min()
    hi = np.percentile(m, percentile)
    if hi <= lo:
        hi = m.max()
    return np.clip((m - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(m)


def overlay(image: np.ndarray, saliency: np.ndarray, *, signed: bool = False, alpha: float = 0.55,
            region: np.ndarray | None = None) -> np.ndarray:
    """An RGB uint8 overlay of a map on an image (jet for magnitude, blue-white-red when signed).

    Pixels outside ``region`` (e.g. outside the aligned chip) keep the photo untouched. With a region
    (a map drawn on the photo) the colour's weight also follows the saliency, and a boolean region is
    feathered over 6 % of its size, so the chip's edge fades into the photo instead of showing as a
    hard-edged square.
    """
    import cv2
    from matplotlib import colormaps

    if saliency.shape != image.shape[:2]:
        saliency = cv2.resize(saliency.astype(np.float32), (image.shape[1], image.shape[0]),
                              interpolation=cv2.INTER_LINEAR)
    m = normalize_map(saliency, signed)
    colors = colormaps["bwr"]((m + 1) / 2) if signed else colormaps["jet"](m)
    heat = (colors[..., :3] * 255).astype(np.float32)
    base = image.astype(np.float32)
    weight = alpha * (np.abs(m) if signed else np.ones_like(m))[..., None]
    if region is not None:
        if not signed:  # the low end of the map leaves the photo visible: no tinted square around the face
            weight = weight * np.sqrt(m)[..., None]
        if region.dtype == np.bool_ and region.any():
            sigma = max(1.0, 0.06 * float(np.sqrt(region.sum())))
            region = cv2.GaussianBlur(region.astype(np.float32), (0, 0), sigma) * region  # fades inward only
        weight = weight * region[..., None]
    return np.clip(base * (1 - weight) + heat * weight, 0, 255).astype(np.uint8)


def figure_grid(explanations: Sequence[Explanation], *, on: str = "chip", title: str | None = None,
                captions: bool = True, reference: np.ndarray | None = None) -> np.ndarray:
    """A side-by-side grid of methods (with colorbars) as an RGB array, ready to save as PNG.

    ``reference``: the photo (or chip) a match was explained against, shown beside the input, so the
    grid says what the maps are about.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    n = len(explanations)
    lead = 1 if reference is None else 2
    per_row = min(n, 4)
    cols = per_row + lead
    rows = -(-n // per_row)
    fig, axes = new_figure(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    first = explanations[0]
    image = first.chip.image if on == "chip" else first.photo
    for r in range(rows):
        axes[r, 0].imshow(image)
        axes[r, 0].set_title("input" if r == 0 else "", fontsize=9)
        axes[r, 0].axis("off")
        if reference is not None:
            axes[r, 1].axis("off")
            if r == 0:
                axes[r, 1].imshow(reference)
                axes[r, 1].set_title("reference", fontsize=9)
    for i, e in enumerate(explanations):
        ax = axes[i // per_row, lead + i % per_row]
        sal = e.chip_map if on == "chip" else e.photo_map
        img = e.chip.image if on == "chip" else e.photo
        region = None if on == "chip" else e.chip_region_on_photo()
        ax.imshow(overlay(img, sal, signed=e.signed, region=region))
        # the overlay's own colour scale (an invisible image would give a blank bar)
        scale = ScalarMappable(Normalize(-1 if e.signed else 0, 1), cmap="bwr" if e.signed else "jet")
        cb = fig.colorbar(scale, ax=ax, fraction=0.046, pad=0.02)
        cb.ax.tick_params(labelsize=6)
        cb.set_label("evidence against ↔ for" if e.signed else "relative saliency", fontsize=6)
        if captions:
            ax.set_title(f"{e.method}\n{e.seconds * 1000:.0f} ms", fontsize=8)
        ax.axis("off")
    for j in range(n, rows * per_row):
        axes[j // per_row, lead + j % per_row].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return figure_to_rgb(fig)
