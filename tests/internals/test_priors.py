"""Each image prior lowers the high-frequency energy of activation-maximization images, against none."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facelens.internals.activation_max import AMSettings, maximize
from facelens.internals.priors import (
    FourierImage,
    PixelImage,
    color_sqrt_from_images,
    gaussian_blur,
    high_frequency_energy,
    random_transform,
    total_variation,
)
from facelens.models import load_model

UNITS = [("mid", c) for c in (1, 5, 9, 13)]
BASE = AMSettings.no_priors(steps=16)
PRIORS = {
    "transforms": {"jitter": 0.06, "scale": 0.1, "rotate": 10.0},
    "total_variation": {"tv": 30.0},
    "blur": {"blur_every": 2, "blur_sigma": 1.0},
    "fourier": {"param": "fourier", "decorrelate": True},
}


@pytest.fixture(scope="module")
def gender():
    return load_model("dlib-gender")


@pytest.fixture(scope="module")
def hf_none(gender) -> float:
    res = maximize(gender, UNITS, BASE)
    return float(high_frequency_energy(res.images.transpose(0, 3, 1, 2)).mean())


def test_high_frequency_energy_known_images() -> None:
    checker = (np.indices((32, 32)).sum(0) % 2).astype(np.float64)[None, None]  # all energy at Nyquist
    flat = np.full((1, 1, 32, 32), 0.3)
    wave = np.cos(2 * np.pi * np.arange(32) / 8)[None, None, None, :].repeat(32, 2)  # 1/8 cycle per pixel
    assert high_frequency_energy(checker)[0] == pytest.approx(1.0)
    assert high_frequency_energy(flat)[0] == 0.0
    assert high_frequency_energy(wave)[0] == pytest.approx(0.0, abs=1e-12)
    assert high_frequency_energy(wave, cutoff=0.1)[0] == pytest.approx(1.0)
    # channel-last numpy input gives the same answer as channel-first
    rgb = np.random.default_rng(0).random((2, 16, 16, 3))
    assert np.allclose(high_frequency_energy(rgb), high_frequency_energy(rgb.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("prior", list(PRIORS))
def test_each_prior_lowers_high_frequency_energy(gender, hf_none: float, prior: str) -> None:
    res = maximize(gender, UNITS, BASE, **PRIORS[prior])
    hf = float(high_frequency_energy(res.images.transpose(0, 3, 1, 2)).mean())
    assert hf < 0.85 * hf_none, f"{prior}: high-frequency share {hf:.3f} vs {hf_none:.3f} without priors"


def test_building_blocks_smooth_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 3, 32, 32, generator=gen)
    hf = high_frequency_energy(noise).mean()
    assert high_frequency_energy(gaussian_blur(noise, 1.0)).mean() < 0.5 * hf
    assert total_variation(gaussian_blur(noise, 1.0)).mean() < total_variation(noise).mean()
    assert torch.equal(random_transform(noise), noise)  # all transforms off: identity
    moved = random_transform(noise, jitter=3, rotate=10, scale=0.1, generator=gen)
    assert moved.shape == noise.shape and not torch.allclose(moved, noise)

    fourier = FourierImage(2, (32, 32), sd=0.5, generator=gen)
    pixel = PixelImage(2, (32, 32), sd=0.5, generator=gen)
    with torch.no_grad():
        assert high_frequency_energy(fourier()).mean() < 0.5 * high_frequency_energy(pixel()).mean()
        before = high_frequency_energy(fourier()).mean()
        fourier.blur_(1.5)
        assert high_frequency_energy(fourier()).mean() < before
        img = fourier()
    assert img.shape == (2, 3, 32, 32) and float(img.min()) >= 0 and float(img.max()) <= 1


def test_color_sqrt_reproduces_covariance() -> None:
    rng = np.random.default_rng(1)
    mix = np.array([[1.0, 0.5, 0.2], [0.0, 1.0, 0.3], [0.0, 0.0, 0.6]])
    pixels = rng.normal(size=(4000, 3)) @ mix.T
    sqrt = color_sqrt_from_images(pixels.reshape(10, 20, 20, 3) / 10 + 0.5)
    assert np.allclose(sqrt @ sqrt.T, np.cov(pixels / 10, rowvar=False), atol=1e-3)
