"""Image priors shared by activation maximization and feature inversion.

An image optimized only to excite a unit fills with high-frequency patterns the network responds to
but no photo contains. The priors here are the standard remedies (Olah, Mordvintsev & Schubert,
"Feature Visualization", Distill 2017; Mahendran & Vedaldi 2015), each usable on its own:

- :func:`total_variation`: penalize differences between neighbouring pixels;
- :func:`random_transform`: random jitter, scale and rotation at every step (transformation robustness);
- :func:`gaussian_blur`: blur the image every few steps;
- :class:`FourierImage`: a decorrelated-colour, 1/f-scaled Fourier parameterization;
  :class:`PixelImage` is the plain alternative (one free logit per pixel and colour).

lucid (TensorFlow 1) and its PyTorch port lucent are not maintained for torch 2.x: ``torch-lucent``
0.1.8 (2021, the last release) pins ``kornia<=0.4.1`` and pulls pytest and coveralls in as runtime
dependencies, so the parameterization and transforms are written here from the paper's description.

:func:`high_frequency_energy` measures what the priors are for: the share of an image's spectral
energy above a radial frequency.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IMAGENET_COLOR_SQRT",
    "FourierImage",
    "PixelImage",
    "color_sqrt_from_images",
    "gaussian_blur",
    "high_frequency_energy",
    "make_image",
    "random_transform",
    "total_variation",
]


def total_variation(x: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Mean TV^β of an N×C×H×W batch, per image (shape N): Mahendran & Vedaldi's smoothness prior.

    β = 2 is the usual choice; β = 1 is the classic (anisotropic-free) TV and favours flat patches.
    """
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    tv = (dx[..., :-1, :] ** 2 + dy[..., :, :-1] ** 2).clamp_min(1e-12) ** (beta / 2)
    return tv.flatten(1).mean(1)


# Square root of the RGB covariance of ImageNet photos (rows: R, G, B), as published with lucid and
# used by Olah et al.: multiplying decorrelated channels by it gives natural colour statistics.
IMAGENET_COLOR_SQRT = np.array([[0.26, 0.09, 0.02],
                                [0.27, 0.00, -0.05],
                                [0.27, -0.09, 0.03]], dtype=np.float64)


def color_sqrt_from_images(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """The 3×3 square root (U·√S) of the RGB covariance of some images (N×3×H×W or N×H×W×3 in [0, 1]).

    Face photos are warmer and less saturated than ImageNet, so a colour basis estimated from face
    chips is the more faithful prior for face networks; :class:`FourierImage` takes either.
    """
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    arr = arr.astype(np.float64)
    if arr.ndim != 4:
        raise ValueError(f"images must be N×3×H×W or N×H×W×3, got shape {arr.shape}")
    pixels = arr.transpose(0, 2, 3, 1).reshape(-1, 3) if arr.shape[1] == 3 else arr.reshape(-1, 3)
    if arr.max() > 1.5:
        pixels = pixels / 255.0
    cov = np.cov(pixels, rowvar=False)
    u, s, _ = np.linalg.svd(cov)
    return u * np.sqrt(np.maximum(s, 0.0))


class PixelImage(nn.Module):
    """N images with one free parameter per pixel and colour; the image is ``sigmoid(logits)``.

    The "no prior" baseline: every spatial frequency is equally easy for the optimizer to change.
    """

    def __init__(self, n: int, size: tuple[int, int], *, sd: float = 0.01,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        h, w = size
        self.logits = nn.Parameter(torch.randn(n, 3, h, w, generator=generator) * sd)

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    @torch.no_grad()
    def blur_(self, sigma: float) -> None:
        """Blur the logits in place (a monotone map of the image, so the image is smoothed too)."""
        self.logits.copy_(gaussian_blur(self.logits, sigma))


class FourierImage(nn.Module):
    """N images parameterized by a 1/f-scaled spectrum in a decorrelated colour space (Olah et al. 2017).

    The free parameters are the real and imaginary parts of ``rfft2`` coefficients of three decorrelated
    colour channels. Each coefficient is multiplied by ``1 / max(f, 1/max(H, W))**decay`` (``f`` the
    radial frequency in cycles per pixel), so a step of plain gradient descent changes low frequencies
    as much as high ones relative to their natural power: the optimizer stops favouring pixel noise.
    The inverse FFT gives the decorrelated image; ``color_sqrt`` (normalized to unit largest column
    norm) mixes it back to RGB, and a sigmoid maps it into [0, 1].
    """

    def __init__(self, n: int, size: tuple[int, int], *, decay: float = 1.0, decorrelate: bool = True,
                 color_sqrt: np.ndarray | None = None, sd: float = 0.01,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        h, w = size
        self.size = (int(h), int(w))
        fy = torch.fft.fftfreq(h).view(-1, 1)
        fx = torch.fft.rfftfreq(w).view(1, -1)
        freqs = torch.sqrt(fy ** 2 + fx ** 2)
        scale = 1.0 / freqs.clamp_min(1.0 / max(h, w)) ** decay
        scale = scale * math.sqrt(h * w) / 4.0  # /4 keeps the initial image near mid-grey after the sigmoid
        self.register_buffer("scale", scale.float())
        self.spectrum = nn.Parameter(torch.randn(n, 3, h, w // 2 + 1, 2, generator=generator) * sd)
        if decorrelate:
            m = np.asarray(IMAGENET_COLOR_SQRT if color_sqrt is None else color_sqrt, dtype=np.float64)
            m = m / np.linalg.norm(m, axis=0).max()
        else:
            m = np.eye(3)
        self.register_buffer("color", torch.from_numpy(m).float())

    def forward(self) -> torch.Tensor:
        coeffs = torch.view_as_complex(self.spectrum) * self.scale
        decorrelated = torch.fft.irfft2(coeffs, s=self.size)
        rgb = torch.einsum("ij,njhw->nihw", self.color, decorrelated)
        return torch.sigmoid(rgb)

    @torch.no_grad()
    def blur_(self, sigma: float) -> None:
        """Gaussian blur done exactly in the frequency domain: multiply by exp(−2π²σ²f²)."""
        fy = torch.fft.fftfreq(self.size[0]).view(-1, 1)
        fx = torch.fft.rfftfreq(self.size[1]).view(1, -1)
        gain = torch.exp(-2.0 * math.pi ** 2 * sigma ** 2 * (fy ** 2 + fx ** 2))
        self.spectrum.mul_(gain[..., None].to(self.spectrum))


def make_image(param: str, n: int, size: tuple[int, int], *, decay: float = 1.0, decorrelate: bool = True,
               color_sqrt: np.ndarray | None = None, generator: torch.Generator | None = None) -> nn.Module:
    """A :class:`FourierImage` (``param="fourier"``) or a :class:`PixelImage` (``"pixel"``)."""
    if param == "fourier":
        return FourierImage(n, size, decay=decay, decorrelate=decorrelate, color_sqrt=color_sqrt,
                            generator=generator)
    if param == "pixel":
        return PixelImage(n, size, generator=generator)
    raise ValueError(f"unknown image parameterization {param!r}; use 'fourier' or 'pixel'")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of an N×C×H×W batch (reflect padding); σ in pixels, σ ≤ 0 is a no-op."""
    if sigma <= 0:
        return x
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, (min(x.shape[-2:]) - 1) // 2) or 1
    return tv_blur(x, [2 * radius + 1, 2 * radius + 1], [float(sigma), float(sigma)])


def random_transform(x: torch.Tensor, *, jitter: float = 0.0, scale: float = 0.0, rotate: float = 0.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image moved by up to ``jitter`` pixels, scaled by a factor in [1−scale, 1+scale] and
    rotated by up to ``rotate`` degrees (uniform, independent per image), with reflected borders.

    Transformation robustness: a pattern that excites the unit under every small shift, zoom and
    turn cannot rely on single-pixel alignment, which removes most high-frequency artefacts.
    """
    if not (jitter or scale or rotate):
        return x
    n, _, h, w = x.shape

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle = torch.deg2rad(uniform(-rotate, rotate)) if rotate else torch.zeros(n)
    zoom = uniform(1.0 - scale, 1.0 + scale) if scale else torch.ones(n)
    tx = uniform(-jitter, jitter) * 2.0 / w if jitter else torch.zeros(n)
    ty = uniform(-jitter, jitter) * 2.0 / h if jitter else torch.zeros(n)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin * h / w, tx], 1), torch.stack([sin * w / h, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def high_frequency_energy(images: torch.Tensor | np.ndarray, cutoff: float = 0.25) -> np.ndarray:
    """Per image, the share of spectral energy at radial frequencies above ``cutoff`` cycles per pixel.

    Each colour channel's mean is removed, the power spectrum ``|FFT2|²`` is summed over channels, and
    the energy at ``sqrt(fx² + fy²) > cutoff`` (Nyquist is 0.5) is divided by the total. Images are
    N×C×H×W (torch or numpy) or N×H×W×C numpy; a flat image gets 0.
    """
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    arr = arr.astype(np.float64)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"images must be 4-D, got shape {arr.shape}")
    if arr.shape[1] not in (1, 3) and arr.shape[-1] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    h, w = arr.shape[-2:]
    arr = arr - arr.mean(axis=(-2, -1), keepdims=True)
    power = (np.abs(np.fft.fft2(arr)) ** 2).sum(axis=1)
    radius = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2)
    total = power.sum(axis=(-2, -1))
    high = power[:, radius > cutoff].sum(axis=-1)
    return np.where(total > 0, high / np.where(total > 0, total, 1.0), 0.0)

