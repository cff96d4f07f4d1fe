"""Filter statistics on inputs and tiny models whose answers are known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from facelens import wrap
from facelens.internals.filter_stats import (
    FilterStats,
    activation_entropy,
    depth_verdicts,
    filter_correlation,
    filter_stats,
    image_entropy,
    kernel_image,
    layer_ladder,
    spatial_variance,
    trend,
)


def tiny_model(identical: bool = True):
    """conv1 (3→3, channel 1 a copy of channel 0) → ReLU → conv2 (3→4, stride 2) → ReLU → head."""
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("conv1", nn.Conv2d(3, 3, 3, padding=1))
    net.add_module("relu1", nn.ReLU())
    net.add_module("conv2", nn.Conv2d(3, 4, 3, stride=2, padding=1))
    net.add_module("relu2", nn.ReLU())
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(4, 2))
    if identical:
        with torch.no_grad():
            net.conv1.weight[1] = net.conv1.weight[0]
            net.conv1.bias[1] = net.conv1.bias[0]
    return wrap(net, task="classification", input_size=(16, 16), class_names=["a", "b"], align=None,
                name="tiny", layers={"early": "model.relu1", "late": "model.relu2"})


def test_correlation_of_identical_and_independent_channels() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 1, 5, 5))
    b = rng.normal(size=(20, 1, 5, 5))
    same = np.concatenate([a, a, 3 * a + 1], axis=1)  # a linear copy is perfectly correlated too
    assert filter_correlation(same) == pytest.approx((1.0, 1.0))
    opposite = np.concatenate([a, -a], axis=1)
    assert filter_correlation(opposite) == pytest.approx((1.0, -1.0))
    big = rng.normal(size=(200, 2, 8, 8))
    abs_r, _ = filter_correlation(big)
    assert abs_r < 0.05
    # a constant (dead) channel is left out rather than producing NaN
    with_dead = np.concatenate([a, a, np.zeros_like(b)], axis=1)
    assert filter_correlation(with_dead) == pytest.approx((1.0, 1.0))


def test_entropy_known_distributions() -> None:
    uniform = np.linspace(0, 1, 3200, endpoint=False).reshape(32, 1, 10, 10)  # 100 values in every bin
    two_level = np.tile([0.0, 1.0], 1600).reshape(32, 1, 10, 10)
    dead = np.zeros((32, 1, 10, 10))
    h, dead_fraction = activation_entropy(np.concatenate([uniform, two_level, dead], 1), bins=32)
    assert h == pytest.approx((5.0 + 1.0) / 2)
    assert dead_fraction == pytest.approx(1 / 3)
    flat = np.full((1, 8, 8, 3), 0.5)
    halves = np.zeros((1, 8, 8, 3))
    halves[:, :, 4:] = 1.0
    assert image_entropy(flat) == pytest.approx(0.0)
    assert image_entropy(halves) == pytest.approx(1.0)


def test_spatial_variance_known_maps() -> None:
    uniform = np.ones((2, 3, 6, 6))
    spot = np.zeros((1, 1, 6, 6))
    spot[0, 0, 2, 3] = 5.0
    corners = np.zeros((1, 1, 6, 6))
    corners[0, 0, [0, 0, 5, 5], [0, 5, 0, 5]] = 1.0
    assert spatial_variance(uniform) == pytest.approx(1.0)
    assert spatial_variance(spot) == pytest.approx(0.0)
    assert spatial_variance(corners) > 1.0  # mass at the edges spreads more than a uniform map
    assert math.isnan(spatial_variance(np.ones((2, 3, 1, 1))))


def test_trend_is_exact_for_few_layers() -> None:
    up = trend("x", [1.0, 2.0, 3.0, 4.0])
    assert up.rho == pytest.approx(1.0) and up.direction == "rises"
    assert up.p == pytest.approx(2 / 24)  # only the sorted and reversed orders reach |ρ| = 1
    assert trend("x", [3.0, 2.0, 1.0]).direction == "falls"
    assert trend("x", [1.0, 3.0, 2.0]).direction == "shows no monotonic trend"
    assert trend("x", [1.0, float("nan"), 2.0]).direction == "undetermined"


def test_filter_stats_on_a_model_with_twin_filters() -> None:
    model = tiny_model(identical=True)
    faces = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert layer_ladder(model) == ["model.relu1", "model.relu2"]
    stats = filter_stats(model, faces, ["late", "model.conv1"])  # sorted into depth order
    first, second = stats.layers
    assert (first.layer, second.layer) == ("model.conv1", "model.relu2") and second.alias == "late"
    assert (first.height, second.height) == (16, 8)
    # conv1: channels 0 and 1 are the same filter (r = 1), channel 2 is another one
    acts = model.net.model.conv1(faces).detach().numpy()
    r02 = np.corrcoef(acts[:, 0].ravel(), acts[:, 2].ravel())[0, 1]
    r12 = np.corrcoef(acts[:, 1].ravel(), acts[:, 2].ravel())[0, 1]
    assert first.correlation == pytest.approx((1.0 + abs(r02) + abs(r12)) / 3, rel=1e-6)
    assert first.dead_fraction == 0.0
    assert stats.kernels is not None and stats.kernels.dtype == np.uint8
    lines = depth_verdicts(stats)
    assert any("undetermined" in line for line in lines)  # two layers cannot make a trend
    rgb = stats.plot()
    assert rgb.ndim == 3 and rgb.shape[2] == 3


def test_kernel_image_shows_every_filter() -> None:
    model = tiny_model()
    mosaic, caption = kernel_image(model, cell=9, columns=3)
    assert "3 first-layer filters" in caption and "model.conv1" in caption
    # one row of three 9×9 tiles with 2-pixel gaps
    assert mosaic.shape == (2 + 9 + 2, 2 + 3 * (9 + 2), 3)
    assert np.array_equal(mosaic[2:11, 2:11], mosaic[2:11, 13:22])  # the twin filters look identical


def test_depth_verdicts_follow_the_numbers() -> None:
    from facelens.internals.filter_stats import LayerStats

    layers = [LayerStats(f"l{i}", "", i, 8, 4, 4, activation_entropy=1.0 + i, dead_fraction=0.0,
                         correlation=0.5 - 0.1 * i, correlation_signed=0.0, spatial_variance=1.0,
                         visualization_entropy=math.nan) for i in range(5)]
    stats = FilterStats("m", layers, faces=10)
    stats.trends = {k: trend(k, [getattr(r, k) for r in layers]) for k in
                    ("activation_entropy", "visualization_entropy", "correlation", "spatial_variance")}
    text = " ".join(depth_verdicts(stats))
    assert "activation entropy rises" in text and "inter-filter correlation falls" in text
    assert "entropy rises: yes; correlation falls: yes" in text
    for layer in layers:
        layer.correlation = 0.1 + 0.1 * layer.depth
    stats.trends["correlation"] = trend("correlation", [r.correlation for r in layers])
    assert "correlation falls: no" in " ".join(depth_verdicts(stats))
