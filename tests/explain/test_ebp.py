"""Excitation Backprop: the MWP by hand, probability mass, contrast, known-answer localization, zoo."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from facelens.errors import ModelError
from facelens.explain.api import resolve_target
from facelens.explain.ebp import ContrastiveExcitationBackprop, ExcitationBackprop
from facelens.faces.align import AlignRecipe
from facelens.models import FaceModel, load_model
from facelens.models.layers import Normalize
from facelens.targets import ClassScore, Contrastive, Similarity, Target
from tests.fixtures.synthetic import mass_inside, region_only_model

PHOTOS = ("images/demo/grace_hopper.jpg", "images/demo/astronaut_eileen_collins.png")


def _tiny_model(activation: type[nn.Module] = nn.ReLU) -> FaceModel:
    """2×2 RGB → 1×1 conv (4) → ReLU → dense (5) → ReLU → dense (2), with biases."""
    torch.manual_seed(0)
    net = nn.Sequential(Normalize((127.5, 127.5, 127.5), 64.0), nn.Conv2d(3, 4, 1), activation(), nn.Flatten(),
                        nn.Linear(16, 5), activation(), nn.Linear(5, 2))
    return FaceModel(name="tiny", task="classification", net=net, input_size=(2, 2),
                     recipe=AlignRecipe(size=2, method="none"), class_names=["a", "b"])


def _mwp_by_hand(model: FaceModel, x: torch.Tensor, index: int, dual: bool = False) -> np.ndarray:
    """Zhang et al.'s recursion written out in numpy for the tiny net: P(child) = Σ P(parent)·a·w⁺ / Σ a·w⁺."""
    norm, conv, _, _, fc1, _, fc2 = model.net
    with torch.no_grad():
        a1 = torch.relu(conv(norm(x)))[0].numpy()  # (4, 2, 2)
        h2 = torch.relu(fc1(torch.from_numpy(a1).reshape(1, -1)))[0].numpy()  # (5,)
    w2, w3 = fc1.weight.detach().numpy(), fc2.weight.detach().numpy()
    top = -w3[index] if dual else w3[index]
    p2 = h2 * np.clip(top, 0, None)
    assert p2.sum() > 0, "no excitation: pick another input"
    p2 /= p2.sum()
    flat = a1.reshape(-1)
    contrib = flat[None, :] * np.clip(w2, 0, None)  # (5, 16): a_i w_ji⁺
    totals = contrib.sum(1, keepdims=True)
    shares = np.divide(contrib, totals, out=np.zeros_like(contrib), where=totals > 0)  # a unit with no input
    p1 = (p2[:, None] * shares).sum(0).reshape(4, 2, 2)
    # Flat on the 1×1 first layer: each unit's probability split evenly over its 3 input channels
    return p1.sum(0)


def test_mwp_matches_the_recursion_by_hand() -> None:
    model = _tiny_model()
    x = torch.rand(1, 3, 2, 2, generator=torch.Generator().manual_seed(3))  # both units and duals excited
    for index in (0, 1):
        ours = ExcitationBackprop(model).attribute(x, ClassScore(index))[0].numpy()
        expected = _mwp_by_hand(model, x, index)
        assert np.allclose(ours, expected, rtol=1e-5, atol=1e-7)
        assert ours.sum() == pytest.approx(1.0, abs=1e-5)  # a probability: no bias takes a share
        contrast = ContrastiveExcitationBackprop(model).attribute(x, ClassScore(index))[0].numpy()
        dual = _mwp_by_hand(model, x, index, dual=True)
        assert np.allclose(contrast, np.clip(expected / expected.sum() - dual / dual.sum(), 0, None), atol=1e-6)


def test_dual_pass_leaves_the_model_unchanged() -> None:
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    x = torch.rand(1, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    ContrastiveExcitationBackprop(model).attribute(x, ClassScore(0))
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())


@pytest.mark.parametrize("name", ["ebp", "contrastive-ebp"])
@pytest.mark.parametrize("task", ["classification", "embedding"])
def test_known_answer_localization(name: str, task: str) -> None:
    """Probability only flows through the masked features, so it all lands in the dilated mask."""
    mask = np.zeros((64, 64), bool)
    mask[10:30, 20:50] = True
    model = region_only_model(mask, task)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 64, 64, generator=gen)
    if task == "classification":
        target: Target = ClassScore(0)
    else:
        with torch.no_grad():
            target = Similarity(model.net(torch.rand(1, 3, 64, 64, generator=gen))[0])
    cls = ExcitationBackprop if name == "ebp" else ContrastiveExcitationBackprop
    saliency = cls(model).attribute(x, target)[0].numpy()
    assert np.isfinite(saliency).all() and saliency.min() >= 0 and saliency.sum() > 0
    assert mass_inside(saliency, mask) >= 0.99


def test_contrastive_target_is_mate_map_minus_mean_non_mate_map() -> None:
    """xfr's definition, checked against separate single-unit EBP runs."""
    mask = np.ones((32, 32), bool)
    model = region_only_model(mask, "embedding")
    gen = torch.Generator().manual_seed(3)
    x, others = torch.rand(1, 3, 32, 32, generator=gen), torch.rand(3, 3, 32, 32, generator=gen)
    with torch.no_grad():
        mate, nonmates = model.net(others[:1])[0], model.net(others[1:])
    ours = ContrastiveExcitationBackprop(model).attribute(x, Contrastive(mate, nonmates))[0]
    single = [ExcitationBackprop(model).attribute(x, Similarity(e))[0] for e in (mate, *nonmates)]
    unit = [m / m.sum() for m in single]
    expected = (unit[0] - (unit[1] + unit[2]) / 2).clamp(min=0)
    assert torch.allclose(ours, expected, atol=1e-7)
    assert ours.sum() > 0


def test_networks_with_other_activations_are_refused() -> None:
    model = _tiny_model(nn.Tanh)
    with pytest.raises(ModelError, match=r"ebp: .*Tanh"):
        ExcitationBackprop(model).attribute(torch.rand(1, 3, 2, 2), ClassScore(0))


@functools.cache
def _zoo_case(name: str, photos: Path) -> tuple[FaceModel, torch.Tensor, torch.Tensor]:
    if name.startswith("torchvision:"):
        gen = torch.Generator().manual_seed(0)
        return load_model(name, weights=None), torch.rand(1, 3, 128, 128, generator=gen), torch.zeros(0)
    model = load_model(name)
    x = model.to_tensor([model.chip(photos / p) for p in PHOTOS])
    return model, x[:1], x[1:]


@pytest.mark.parametrize("model_name", ["torchvision:resnet18", "dlib-resnet", "dlib-age", "dlib-gender",
                                        "fer-emotion"])
def test_zoo_maps_are_probabilities(shared_faces: Path, model_name: str) -> None:
    """On real faces the MWP keeps its unit mass through every layer (measured ≥ 0.997 on all five)."""
    model, x, other = _zoo_case(model_name, shared_faces)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    with torch.no_grad():
        out = model.net(x)[0]
    if model.task == "classification":
        targets: list[Target] = [ClassScore(int(out.argmax()))]
    else:
        with torch.no_grad():
            ref = model.net(other)[0]
        targets = [Similarity(ref), resolve_target(model, model.chip(shared_faces / PHOTOS[0]))]
    for target in targets:
        mwp = ExcitationBackprop(model).attribute(x, target)
        assert mwp.shape == (1, *x.shape[-2:]) and torch.isfinite(mwp).all() and mwp.min() >= 0
        assert float(mwp.sum()) == pytest.approx(1.0, abs=1e-2)
        contrast = ContrastiveExcitationBackprop(model).attribute(x, target)
        assert torch.isfinite(contrast).all() and contrast.min() >= 0
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())
