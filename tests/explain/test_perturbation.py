"""Occlusion, RISE, LIME, KernelSHAP and the fills: peers, exact answers, seeding, known answers."""

from __future__ import annotations

import functools
import itertools
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import KernelShap as CaptumKernelShap
from captum.attr import Occlusion as CaptumOcclusion
from torch import nn

from facelens.errors import ModelError
from facelens.explain import perturbation as P
from facelens.explain.engine import PerturbationEngine
from facelens.models import FaceModel, load_model, wrap
from facelens.targets import ClassScore, Similarity
from tests.fixtures.synthetic import mass_inside, region_only_model


def _image(h: int, w: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=(h, w or h), mode="bilinear")


def _small_cnn(h: int = 20, w: int = 22) -> FaceModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    with torch.no_grad():
        net[-1].weight.mul_(20.0)  # scores of order one, so 1e-5 is a meaningful tolerance
    return wrap(net, task="classification", input_size=(h, w), class_names=["a", "b"], align=None)


def _linear_model(size: int = 12, seed: int = 0) -> tuple[FaceModel, nn.Linear]:
    torch.manual_seed(seed)
    linear = nn.Linear(3 * size * size, 1)
    net = nn.Sequential(nn.Flatten(), linear)
    return wrap(net, task="classification", input_size=size, class_names=["y"], align=None), linear


def _linear_contributions(linear: nn.Linear, x: torch.Tensor, fill: torch.Tensor,
                          labels: np.ndarray) -> torch.Tensor:
    """The exact answer for a linear model: each feature's Σ w·(x − fill) over its pixels."""
    per_pixel = ((x[0] - fill[0]) * linear.weight.view(x.shape[1:])).sum(0).detach()
    lab = torch.as_tensor(labels)
    return torch.stack([per_pixel[lab == j].sum() for j in np.unique(labels) if j >= 0])


# -- fills --------------------------------------------------------------------------------------------------
def test_fills() -> None:
    x = _image(30, 26, seed=3)
    assert torch.equal(P.fill_image(x, "zero"), torch.zeros_like(x))
    mean = P.fill_image(x, "mean")
    torch.testing.assert_close(mean[0, :, 7, 5], x[0].mean(dim=(1, 2)))
    assert float(mean.std(dim=(2, 3)).max()) < 1e-6
    # blur: σ = 4 % of the side, the same Gaussian OpenCV computes with reflect-101 borders
    blurred = P.fill_image(x, "blur")
    sigma = 0.04 * (30 + 26) / 2
    half = math.ceil(3 * sigma)
    ref = cv2.GaussianBlur(x[0].permute(1, 2, 0).numpy(), (2 * half + 1, 2 * half + 1), sigma,
                           borderType=cv2.BORDER_REFLECT_101)
    np.testing.assert_allclose(blurred[0].permute(1, 2, 0).numpy(), ref, atol=1e-5)
    assert float(blurred.std()) < float(x.std())
    with pytest.raises(ModelError, match="fill must be one of"):
        P.fill_image(x, "noise")


# -- occlusion ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fill", ["zero", "blur"])
def test_occlusion_equals_captum(fill: str) -> None:
    # 20×22 with window 6, stride 4: the last windows are cropped at the border, as captum's are
    model, x, target = _small_cnn(), torch.rand(1, 3, 20, 22, generator=torch.Generator().manual_seed(1)), ClassScore(1)
    ours = P.Occlusion(model, batch_size=7, window=6, stride=4, fill=fill).attribute(x, target)[0]
    theirs = CaptumOcclusion(lambda z: target(model.net(z))).attribute(
        x, sliding_window_shapes=(3, 6, 6), strides=(3, 4, 4), baselines=P.fill_image(x, fill),
        perturbations_per_eval=5)
    assert float(ours.abs().max()) > 1e-2
    for channel in range(3):
        torch.testing.assert_close(ours, theirs[0, channel], rtol=0, atol=1e-5)


def test_occlusion_window_scales_with_the_chip_and_is_recorded() -> None:
    model = _small_cnn(48, 48)
    method = P.Occlusion(model)
    method.attribute(_image(48), ClassScore(0))
    assert method.used_settings()["window"] == round(16 * 48 / 150)
    assert method.used_settings()["stride"] == round(8 * 48 / 150)
    with pytest.raises(ModelError, match="window"):
        P.Occlusion(model, window=60).attribute(_image(48), ClassScore(0))
    with pytest.raises(ModelError, match="stride"):
        P.Occlusion(model, window=4, stride=5).attribute(_image(48), ClassScore(0))


# -- feature attribution ------------------------------------------------------------------------------------
def test_kernelshap_recovers_linear_contributions_as_captum_does() -> None:
    model, linear = _linear_model()
    x = _image(12, seed=2)
    fill = P.fill_image(x, "mean")
    labels = P.superpixels(x, 9, "grid")
    truth = _linear_contributions(linear, x, fill, labels)
    engine = PerturbationEngine(model.net, ClassScore(0), batch_size=16)
    # 60 < 2⁹ coalitions: the sampled path, which must still be exact for a linear model
    ours = P.feature_attribution(engine, x, fill, labels, "kernelshap", n_samples=60,
                                 generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours.values, truth, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.map, truth[torch.as_tensor(labels)], rtol=0, atol=1e-5)
    mask = torch.as_tensor(labels)[None, None].expand(1, 3, 12, 12)
    with torch.no_grad():
        theirs = CaptumKernelShap(lambda z: model.net(z)[:, 0]).attribute(
            x, baselines=fill, feature_mask=mask, n_samples=60)
    torch.testing.assert_close(theirs[0, 0], truth[torch.as_tensor(labels)], rtol=0, atol=1e-5)


def test_lime_and_single_feature_occlusion_recover_linear_contributions() -> None:
    model, linear = _linear_model(seed=3)
    x = _image(12, seed=4)
    fill = P.fill_image(x, "zero")
    labels = P.superpixels(x, 16, "grid")
    truth = _linear_contributions(linear, x, fill, labels)
    engine = PerturbationEngine(model.net, ClassScore(0), batch_size=32)
    lime = P.feature_attribution(engine, x, fill, labels, "lime", n_samples=80, alpha=1e-9)
    torch.testing.assert_close(lime.values, truth, rtol=0, atol=1e-4)
    occ = P.feature_attribution(engine, x, fill, labels, "occlusion")
    torch.testing.assert_close(occ.values, truth, rtol=0, atol=1e-5)
    assert occ.evaluations == 16 + 1


def test_kernelshap_is_exact_shapley_when_every_coalition_fits() -> None:
    model = _small_cnn(8, 8)
    target = ClassScore(0)
    x = _image(8, seed=5)
    fill = P.fill_image(x, "zero")
    labels = np.repeat(np.repeat(np.arange(4).reshape(2, 2), 4, 0), 4, 1)  # four 4×4 quadrants

    @functools.cache
    def value(coalition: tuple[int, ...]) -> float:
        keep = torch.as_tensor(np.isin(labels, coalition), dtype=torch.float32)
        with torch.no_grad():
            return float(target(model.net(fill + keep * (x - fill)))[0])

    m = 4
    brute = torch.tensor([
        sum(math.factorial(len(s)) * math.factorial(m - len(s) - 1) / math.factorial(m)
            * (value(tuple(sorted((*s, j)))) - value(s))
            for r in range(m) for s in itertools.combinations([k for k in range(m) if k != j], r))
        for j in range(m)], dtype=torch.float32)
    engine = PerturbationEngine(model.net, target, batch_size=5)
    ours = P.feature_attribution(engine, x, fill, labels, "kernelshap", n_samples=16)
    assert ours.evaluations == 16
    torch.testing.assert_close(ours.values, brute, rtol=0, atol=1e-5)
    assert abs(float(ours.values.sum()) - (value((0, 1, 2, 3)) - value(()))) < 1e-5


def test_sampled_kernelshap_keeps_efficiency_on_a_nonlinear_model() -> None:
    model = _small_cnn(16, 16)
    x, target = _image(16, seed=6), ClassScore(1)
    fill = P.fill_image(x, "blur")
    labels = P.superpixels(x, 16, "grid")
    engine = PerturbationEngine(model.net, target, batch_size=32)
    ours = P.feature_attribution(engine, x, fill, labels, "kernelshap", n_samples=100)
    with torch.no_grad():
        total = float(target(model.net(x))[0] - target(model.net(fill))[0])
        empty = float(target(model.net(fill))[0])
    assert abs(float(ours.values.sum()) - total) < 1e-5
    assert abs(ours.intercept - empty) < 1e-5


def test_negative_labels_are_never_perturbed() -> None:
    model, linear = _linear_model(seed=7)
    x = _image(12, seed=8)
    with torch.no_grad():  # the model only reads the top half
        linear.weight.view(3, 12, 12)[:, 6:] = 0
    labels = P.superpixels(x, 16, "grid")
    labels[:6] = -1  # top half fixed: no feature left that the model can see
    engine = PerturbationEngine(model.net, ClassScore(0), batch_size=32)
    for method in ("kernelshap", "lime", "occlusion"):
        result = P.feature_attribution(engine, x, P.fill_image(x, "zero"), labels, method, n_samples=40)
        assert len(result.values) == 8 and float(result.values.abs().max()) < 1e-5
        assert float(result.map[:6].abs().max()) == 0.0
    with pytest.raises(ModelError, match="feature map is"):
        P.feature_attribution(engine, x, x, labels[:5], "lime")
    with pytest.raises(ModelError, match="no features"):
        P.feature_attribution(engine, x, x, np.full((12, 12), -1), "lime")


def test_superpixels() -> None:
    x = _image(40, seed=9)
    grid = P.superpixels(x, 50, "grid")
    assert grid.shape == (40, 40) and len(np.unique(grid)) == 49
    slic = P.superpixels(x, 20, "slic")
    assert slic.shape == (40, 40) and 5 <= len(np.unique(slic)) <= 40
    with pytest.raises(ModelError, match="features must be"):
        P.superpixels(x, 20, "hexagons")


# -- RISE ---------------------------------------------------------------------------------------------------
def test_rise_masks_are_soft_shifted_grids_from_the_seed() -> None:
    masks = P.rise_masks(300, (30, 34), grid=5, p_keep=0.3, generator=torch.Generator().manual_seed(2))
    batch = masks(0, 300)
    assert batch.shape == (300, 1, 30, 34) and float(batch.min()) >= 0 and float(batch.max()) <= 1 + 1e-6
    assert abs(float(batch.mean()) - 0.3) < 0.05
    again = P.rise_masks(300, (30, 34), grid=5, p_keep=0.3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(again(100, 200), batch[100:200])
    weights = torch.randn(300, dtype=torch.float64)
    explicit = torch.einsum("n,nhw->hw", weights, masks(0, 300, dtype=torch.float64)[:, 0])
    torch.testing.assert_close(masks.weighted_sum(weights), explicit)


def test_rise_is_the_score_weighted_mask_mean() -> None:
    model, x, target = _small_cnn(24, 24), _image(24, seed=10), ClassScore(0)
    ours = P.Rise(model, n_masks=40, grid=4, p_keep=0.5, seed=3).attribute(x, target)[0]
    masks = P.rise_masks(40, (24, 24), 4, 0.5, torch.Generator().manual_seed(3))(0, 40)
    with torch.no_grad():
        scores = target(model.net(masks * x))
    expected = torch.einsum("n,nhw->hw", scores.double(), masks[:, 0].double()) / (40 * 0.5)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-5, atol=1e-6)
    centered = P.Rise(model, n_masks=40, grid=4, p_keep=0.5, seed=3, center=True).attribute(x, target)[0]
    offset = float(scores.double().mean()) * masks[:, 0].double().sum(0) / (40 * 0.5)
    torch.testing.assert_close(ours - centered, offset.float(), rtol=1e-5, atol=1e-5)


# -- seeding and batch size ---------------------------------------------------------------------------------
SEEDED = [(P.Rise, {"n_masks": 60}), (P.Lime, {"n_samples": 40}), (P.KernelShap, {"n_samples": 40}),
          (P.Occlusion, {"window": 8, "stride": 4})]


@pytest.mark.parametrize(("cls", "settings"), SEEDED, ids=[c.name for c, _ in SEEDED])
def test_same_seed_same_map_whatever_the_batch_size(cls: type, settings: dict[str, object]) -> None:
    model, x = _small_cnn(32, 32), _image(32, seed=11)
    a = cls(model, batch_size=7, seed=5, **settings).attribute(x, ClassScore(1))[0]
    b = cls(model, batch_size=64, seed=5, **settings).attribute(x, ClassScore(1))[0]
    assert torch.equal(a, b)
    if cls is not P.Occlusion:
        c = cls(model, batch_size=64, seed=6, **settings).attribute(x, ClassScore(1))[0]
        assert not torch.equal(a, c)


# -- known answers ------------------------------------------------------------------------------------------
KNOWN = [  # (method, settings, floor on the magnitude share inside the mask dilated by 3 px)
    # measured minima over eight images: occlusion 0.93, KernelSHAP grid 0.79 / SLIC 0.71,
    # LIME grid 0.61, centred RISE (500 masks) 0.57; the dilated mask covers 27.5 % of the chip
    (P.Occlusion, {}, 0.85),
    (P.KernelShap, {"n_samples": 200, "features": "grid"}, 0.7),
    (P.KernelShap, {"n_samples": 200}, 0.6),
    (P.Lime, {"n_samples": 200, "features": "grid"}, 0.55),
    (P.Rise, {"n_masks": 500, "center": True}, 0.45),
]


@pytest.mark.parametrize(("cls", "settings", "floor"), KNOWN,
                         ids=[f"{c.name}-{s.get('features', '')}" for c, s, _ in KNOWN])
def test_perturbation_maps_localize_the_known_region(cls: type, settings: dict[str, object],
                                                     floor: float) -> None:
    mask = np.zeros((40, 40), bool)
    mask[6:20, 20:36] = True
    model = region_only_model(mask)
    for seed in range(2):
        saliency = cls(model, batch_size=250, seed=seed, **settings).attribute(
            _image(40, seed=seed), ClassScore(seed % 2))[0].numpy()
        assert saliency.shape == (40, 40) and np.isfinite(saliency).all()
        # magnitude: the region's evidence may lower the score, which a signed map shows as negative
        assert mass_inside(np.abs(saliency), mask) >= floor


# -- real models --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zoo_name", ["dlib-resnet", "fer-emotion", "dlib-age", "dlib-gender"])
def test_zoo_models_give_finite_maps(zoo_name: str) -> None:
    model = load_model(zoo_name)
    h, w = model.input_size
    x = _image(h, w, seed=12)
    with torch.inference_mode():
        out = model.net(x)[0]
    target = ClassScore(int(out.argmax())) if model.task == "classification" else Similarity(out)
    cheap = {"rise": {"n_masks": 10}, "lime": {"n_samples": 10, "features": "grid", "n_segments": 9},
             "kernelshap": {"n_samples": 10, "n_segments": 9},
             "occlusion": {"window": h // 2, "stride": h // 2}}
    for cls in (P.Rise, P.Lime, P.KernelShap, P.Occlusion):
        saliency = cls(model, batch_size=32, **cheap[cls.name]).attribute(x, target)[0]
        assert saliency.shape == (h, w) and torch.isfinite(saliency).all() and saliency.abs().sum() > 0
