"""Gradient methods: known-answer localization, exact identities, completeness, seeding, zoo coverage."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from facelens.errors import ModelError
from facelens.explain.api import resolve_target
from facelens.explain.base import METHODS
from facelens.explain.gradients import (
    DeepLiftMethod,
    GradientXInput,
    IntegratedGradientsMethod,
    SmoothGrad,
    VanillaGradient,
    baseline_image,
)
from facelens.models import FaceModel, load_model
from facelens.targets import ClassScore, Similarity, Target
from tests.fixtures.synthetic import mass_inside, region_only_model

GRADIENT_METHODS = ["gradient", "gradient-x-input", "smoothgrad", "integrated-gradients", "guided-backprop",
                    "deeplift"]
CHEAP = {"smoothgrad": {"n_samples": 4}, "integrated-gradients": {"n_steps": 8}}
ZOO = ["torchvision:resnet18", "dlib-resnet", "dlib-age", "dlib-gender", "fer-emotion"]
PHOTOS = ("images/demo/grace_hopper.jpg", "images/demo/astronaut_eileen_collins.png")


def _mask() -> np.ndarray:
    mask = np.zeros((64, 64), bool)
    mask[10:30, 20:50] = True  # 20×30: 15 % of the chip (23 % once dilated by the receptive radius)
    return mask


def _input(seed: int = 0, size: int = 64) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _synthetic_case(task: str) -> tuple[FaceModel, torch.Tensor, Target]:
    model = region_only_model(_mask(), task)
    x = _input()
    if task == "classification":
        return model, x, ClassScore(0)
    with torch.no_grad():
        other = model.net(_input(1))[0]  # a different "face": self-similarity has zero gradient
    return model, x, Similarity(other)


@pytest.mark.parametrize("task", ["classification", "embedding"])
@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_known_answer_localization(name: str, task: str) -> None:
    """The output has zero derivative outside the dilated mask, so every correct map is zero there.

    The floor (99 %) allows float rounding only; the dilated mask covers 23 % of the chip.
    """
    cls = METHODS[name]
    assert cls.localizes
    model, x, target = _synthetic_case(task)
    saliency = cls(model, **CHEAP.get(name, {})).attribute(x, target)[0].numpy()
    assert saliency.shape == (64, 64) and np.isfinite(saliency).all()
    assert np.abs(saliency).sum() > 0
    assert mass_inside(saliency, _mask()) >= 0.99


def test_vanilla_gradient_and_gradient_x_input_match_autograd() -> None:
    model, x, target = _synthetic_case("classification")
    probe = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(target(model.net(probe)).sum(), probe)
    assert torch.allclose(VanillaGradient(model).attribute(x, target)[0], grad.abs().amax(1)[0])
    assert torch.allclose(GradientXInput(model).attribute(x, target)[0], (grad * x).sum(1)[0])


@pytest.mark.parametrize("baseline", ["black", "blur", "mean"])
def test_integrated_gradients_completeness_on_the_synthetic_net(baseline: str) -> None:
    """Σ IG = f(x) − f(baseline); with 50 Gauss–Legendre points the measured gap is ≤ 0.6 %, we allow 2 %."""
    model, x, target = _synthetic_case("classification")
    method = IntegratedGradientsMethod(model, baseline=baseline)
    total = float(method.attribute(x, target)[0].sum())
    with torch.no_grad():
        expected = float(target(model.net(x))[0] - target(model.net(baseline_image(x, baseline)))[0])
    assert abs(total - expected) <= 0.02 * abs(expected)
    assert method.extras["convergence_delta"] == pytest.approx(total - expected, abs=1e-5)


@functools.cache
def _zoo_case(name: str, photos: Path) -> tuple[FaceModel, torch.Tensor, torch.Tensor]:
    """A model, the chip of a real photo and the chip of another person, as network inputs."""
    if name.startswith("torchvision:"):
        model = load_model(name, weights=None)
        return model, _input(0, 224), _input(1, 224)
    model = load_model(name)
    chips = [model.chip(photos / p) for p in PHOTOS]
    x = model.to_tensor(chips)
    return model, x[:1], x[1:]


@pytest.mark.parametrize("baseline", ["black", "blur"])
def test_integrated_gradients_completeness_on_a_zoo_model(shared_faces: Path, baseline: str) -> None:
    """On dlib's gender CNN and a real face the gap is 1.1 % (black) and 0.13 % (blur) at 256 steps; we allow 3 %.

    At 50 steps it can reach 6 % here and 25 % on dlib-resnet, which is why the delta is reported.
    """
    model, x, _ = _zoo_case("dlib-gender", shared_faces)
    with torch.no_grad():
        logits = model.net(x)[0]
    target = ClassScore(int(logits.argmax()))
    total = float(IntegratedGradientsMethod(model, n_steps=256, baseline=baseline).attribute(x, target)[0].sum())
    with torch.no_grad():
        expected = float(target(model.net(x))[0] - target(model.net(baseline_image(x, baseline)))[0])
    assert abs(total - expected) <= 0.03 * abs(expected)


def test_deeplift_sums_to_the_difference_from_the_baseline() -> None:
    """DeepLIFT's summation-to-delta is exact when every nonlinearity is a module (here: ReLUs)."""
    model, x, target = _synthetic_case("classification")
    method = DeepLiftMethod(model)
    total = float(method.attribute(x, target)[0].sum())
    with torch.no_grad():
        expected = float(target(model.net(x))[0] - target(model.net(torch.zeros_like(x)))[0])
    assert total == pytest.approx(expected, rel=1e-4)
    assert abs(method.extras["convergence_delta"]) < 1e-5  # type: ignore[arg-type]


def test_smoothgrad_is_seeded_and_independent_of_batch_size() -> None:
    model, x, target = _synthetic_case("classification")
    maps = [SmoothGrad(model, n_samples=7, batch_size=b, seed=3).attribute(x, target)[0] for b in (1, 3, 64)]
    assert torch.allclose(maps[0], maps[1], rtol=1e-5, atol=1e-9)
    assert torch.allclose(maps[0], maps[2], rtol=1e-5, atol=1e-9)
    other_seed = SmoothGrad(model, n_samples=7, seed=4).attribute(x, target)[0]
    assert not torch.allclose(maps[0], other_seed)
    plain = VanillaGradient(model).attribute(x, target)[0]
    assert torch.allclose(SmoothGrad(model, n_samples=3, stdev=0.0).attribute(x, target)[0], plain)


def test_baselines() -> None:
    x = _input(5)
    assert torch.equal(baseline_image(x, "black"), torch.zeros_like(x))
    mean = baseline_image(x, "mean")
    assert torch.allclose(mean, x.mean(dim=(2, 3), keepdim=True).expand_as(x))
    blur = baseline_image(x, "blur")
    assert blur.shape == x.shape and blur.std() < 0.2 * x.std()  # detail gone, colour kept
    assert float(blur.mean()) == pytest.approx(float(x.mean()), abs=0.02)


@pytest.mark.parametrize(("cls", "settings"), [
    (IntegratedGradientsMethod, {"baseline": "white"}),
    (IntegratedGradientsMethod, {"n_steps": 0}),
    (IntegratedGradientsMethod, {"method": "simpson"}),
    (SmoothGrad, {"n_samples": 2.5}),
    (SmoothGrad, {"stdev": -0.1}),
    (DeepLiftMethod, {"baseline": "noise"}),
    (VanillaGradient, {"n_steps": 10}),
])
def test_bad_settings_are_refused(cls: type, settings: dict[str, object]) -> None:
    model, _, _ = _synthetic_case("classification")
    with pytest.raises(ModelError, match=cls.name):
        cls(model, **settings)


def _zoo_targets(model: FaceModel, x: torch.Tensor, other: torch.Tensor, photos: Path) -> list[Target]:
    with torch.no_grad():
        out = model.net(x)[0]
    if model.task == "classification":
        return [ClassScore(int(out.argmax()))]
    chip = model.chip(photos / PHOTOS[0])
    with torch.no_grad():
        reference = model.net(other)[0]
    return [Similarity(reference, label="another person"), resolve_target(model, chip)]


@pytest.mark.parametrize("model_name", ZOO)
def test_finite_maps_on_the_zoo(shared_faces: Path, model_name: str) -> None:
    model, x, other = _zoo_case(model_name, shared_faces)
    for target in _zoo_targets(model, x, other, shared_faces):
        for name in GRADIENT_METHODS:
            saliency = METHODS[name](model, **CHEAP.get(name, {})).attribute(x, target)
            assert saliency.shape == (1, *model.input_size), name
            assert torch.isfinite(saliency).all(), name
