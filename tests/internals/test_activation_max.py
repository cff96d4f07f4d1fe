"""Activation maximization reaches far above the noise response, in one batch, with clean errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facelens.errors import ModelError
from facelens.internals.activation_max import AMSettings, layer_outputs, maximize, pick_channels, visualize_depths
from facelens.models import load_model


@pytest.fixture(scope="module")
def gender():
    return load_model("dlib-gender")


@pytest.fixture(scope="module")
def depths_result(gender):
    return visualize_depths(gender, channels=4, steps=20)


def test_reached_activation_far_above_noise(gender, depths_result) -> None:
    res = depths_result
    assert res.images.shape == (12, 32, 32, 3)
    assert [u.layer for u in res.units] == ["early"] * 4 + ["mid"] * 4 + ["late"] * 4
    deep = np.array([u.layer != "early" for u in res.units])
    # Recompute the objective on the returned images: the reported numbers are what the network gives.
    x = torch.from_numpy(res.images).permute(0, 3, 1, 2).contiguous()
    for i, u in enumerate(res.units):
        with torch.no_grad():
            out = layer_outputs(gender, [u.layer], x[i:i + 1])[u.layer]
        assert out[0, u.channel].mean().item() == pytest.approx(res.activation[i], rel=1e-4, abs=1e-5)
    assert np.median(res.gain[deep]) >= 3.0
    assert np.mean(res.z_score[deep] >= 5) >= 0.75
    assert np.all(np.isfinite(res.noise_mean)) and np.all(res.noise_std >= 0)
    # the optimization made progress: the last steps beat the first on average
    assert res.history[-3:].mean() > res.history[:3].mean()


def test_grid_has_a_row_per_depth(depths_result) -> None:
    rgb = depths_result.grid(title="test")
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8
    assert rgb.shape[0] > 200 and rgb.std() > 10


def test_diversity_pushes_facets_apart(gender) -> None:
    def gram_similarity(res) -> float:
        x = torch.from_numpy(res.images).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            act = layer_outputs(gender, ["mid"], x)["mid"].flatten(2)
        gram = torch.nn.functional.normalize(torch.einsum("fci,fdi->fcd", act, act).flatten(1), dim=1)
        sim = gram @ gram.T
        return float((sim.sum() - sim.diagonal().sum()) / (len(sim) * (len(sim) - 1)))

    plain = maximize(gender, [("mid", 9)], steps=20, facets=3, diversity=0.0)
    diverse = maximize(gender, [("mid", 9)], steps=20, facets=3, diversity=5.0)
    assert plain.images.shape[0] == diverse.images.shape[0] == 3
    assert diverse.facets == [0, 1, 2]
    assert gram_similarity(diverse) < gram_similarity(plain)


def test_errors_and_helpers(gender) -> None:
    with pytest.raises(ModelError, match="no channel 999"):
        maximize(gender, [("mid", 999)], steps=1)
    with pytest.raises(ModelError, match="no layer"):
        maximize(gender, [("nope", 0)], steps=1)
    with pytest.raises(ModelError):
        maximize(gender, [], steps=1)
    with pytest.raises(ModelError, match="objective"):
        maximize(gender, [("mid", 0)], AMSettings(objective="max"), steps=1)  # type: ignore[arg-type]
    assert pick_channels(64, 4) == [0, 21, 42, 63]
    assert pick_channels(3, 8) == [0, 1, 2]
    center = maximize(gender, [("mid", 9)], steps=2, objective="center")
    assert center.settings.objective == "center" and center.images.shape == (1, 32, 32, 3)
