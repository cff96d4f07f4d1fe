"""CAM, Grad-CAM, Grad-CAM++ and Score-CAM: identities, peers, hooks and real models."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
from scipy.stats import pearsonr, spearmanr
from torch import nn

from facelens.errors import ModelError
from facelens.explain import cams  # registers the CAM methods
from facelens.explain.base import METHODS
from facelens.models import FaceModel, load_model, wrap
from facelens.targets import ClassScore, Similarity
from tests.fixtures.synthetic import mass_inside, region_only_model

SIZE = 32


def get_method(name: str) -> type:
    assert METHODS[name].__module__ == cams.__name__
    return METHODS[name]


def _gap_linear_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def _toy(seed: int = 0) -> FaceModel:
    return wrap(_gap_linear_net(seed), task="classification", input_size=SIZE, class_names=["a", "b", "c"],
                align=None, layers={"early": "0", "mid": "1", "late": "3"})


def _image(size: int = SIZE, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=(size, size), mode="bilinear")


def _upsample(m: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    return F.interpolate(m[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]


def _no_hooks(net: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._backward_hooks for m in net.modules())


def test_cam_is_the_hand_computed_weighted_sum_of_the_features() -> None:
    model, x = _toy(), _image()
    for cls in range(3):
        features = model.net.model[:4](model.net.normalize(x))[0]  # (8, 16, 16)
        hand = torch.einsum("k,khw->hw", model.net.model[6].weight[cls], features).detach()
        ours = get_method("cam")(model).attribute(x, ClassScore(cls))[0]
        torch.testing.assert_close(ours, _upsample(hand), rtol=1e-5, atol=1e-6)
    assert _no_hooks(model.net)


def test_gradcam_on_a_pooled_linear_head_is_relu_cam_over_the_area() -> None:
    # ∂logit/∂A_k(i, j) = w_k / (h·w) everywhere, so Grad-CAM = ReLU(CAM) / (h·w) at layer resolution
    model, x = _toy(), _image()
    features = model.net.model[:4](model.net.normalize(x))[0]
    hand = torch.relu(torch.einsum("k,khw->hw", model.net.model[6].weight[1], features)).detach() / (16 * 16)
    ours = get_method("gradcam")(model).attribute(x, ClassScore(1))[0]
    torch.testing.assert_close(ours, _upsample(hand), rtol=1e-4, atol=1e-7)
    assert _no_hooks(model.net)


@pytest.mark.parametrize(("name", "peer"), [("gradcam", GradCAM), ("gradcam++", GradCAMPlusPlus)])
def test_gradient_cams_match_pytorch_grad_cam_up_to_its_display_scaling(name: str, peer: type) -> None:
    model, x = _toy(3), _image(seed=4)
    ours = get_method(name)(model).attribute(x, ClassScore(2))[0].numpy()
    with peer(model=model.net, target_layers=[model.layer("late")]) as cam:
        theirs = cam(x, targets=[ClassScore(2)])[0]
    scaled = (ours - ours.min()) / (ours.max() - ours.min() + 1e-7)
    np.testing.assert_allclose(scaled, theirs, atol=1e-3)


def test_in_place_activations_do_not_change_the_map_and_are_restored() -> None:
    model, x = _toy(5), _image(seed=6)
    clean = get_method("gradcam")(model, layer="model.2").attribute(x, ClassScore(0))[0]
    inplace_model = copy.deepcopy(model)
    inplace_model.net.model[3].inplace = True  # the ReLU right after the hooked convolution
    got = get_method("gradcam")(inplace_model, layer="model.2").attribute(x, ClassScore(0))[0]
    torch.testing.assert_close(got, clean)
    assert inplace_model.net.model[3].inplace is True


class _ReusedRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.conv2(self.relu(self.conv1(x))))).flatten(1))


@pytest.mark.parametrize("name", ["cam", "gradcam", "scorecam"])
def test_a_reused_module_is_refused_by_name(name: str) -> None:
    model = wrap(_ReusedRelu(), task="classification", input_size=16, class_names=["a", "b"], align=None)
    with pytest.raises(ModelError, match="ran 2 times"):
        get_method(name)(model, layer="model.relu").attribute(_image(16), ClassScore(0))
    assert _no_hooks(model.net)


def test_cam_refuses_a_layer_not_followed_by_global_average_pooling_and_names_the_right_one() -> None:
    model = _toy()
    with pytest.raises(ModelError, match=r"not followed by global average pooling.*layer='model.3'"):
        get_method("cam")(model, layer="early").attribute(_image(), ClassScore(0))
    gender = load_model("dlib-gender")
    with pytest.raises(ModelError, match="no global average pooling"):
        get_method("cam")(gender).attribute(torch.rand(1, 3, 32, 32), ClassScore(0))


def test_all_depths_give_one_map_per_named_depth() -> None:
    model, x = _toy(), _image()
    method = get_method("gradcam")(model, all_depths=True)
    main = method.attribute(x, ClassScore(0))[0]
    depths = method.extras["depths"]
    assert set(depths) == {"early", "mid", "late"}
    assert all(d.shape == (SIZE, SIZE) and np.isfinite(d).all() for d in depths.values())
    np.testing.assert_array_equal(depths["late"], main.numpy())
    assert not np.allclose(depths["early"], depths["late"])
    # CAM is only defined where the pooling is fed: the other depths are reported, not invented
    cam = get_method("cam")(model, all_depths=True)
    cam.attribute(torch.cat([x, _image(seed=9)]), ClassScore(0))
    assert set(cam.extras["depths"]) == {"late"} and cam.extras["depths"]["late"].shape == (2, SIZE, SIZE)
    assert set(cam.extras["depths_undefined"]) == {"early", "mid"}


def _zero_bias_region_model(mask: np.ndarray) -> FaceModel:
    # The fixture's last 1×1 convolution has a bias, so its ReLU is a non-zero constant outside the
    # mask; without it the late features are exactly zero there and a CAM must be too.
    model = region_only_model(mask)
    with torch.no_grad():
        model.net.conv3.bias.zero_()
    return model


@pytest.mark.parametrize("name", ["cam", "gradcam", "gradcam++", "scorecam"])
def test_cams_localize_the_known_region(name: str) -> None:
    mask = np.zeros((40, 40), bool)
    mask[6:20, 20:36] = True
    model = _zero_bias_region_model(mask)
    for seed in range(2):
        saliency = get_method(name)(model).attribute(_image(40, seed), ClassScore(1))[0].numpy()
        assert saliency.shape == (40, 40) and np.isfinite(saliency).all() and np.abs(saliency).sum() > 0
        # exact by construction: late features vanish outside the mask (area share 14 %)
        assert mass_inside(saliency, mask, radius=1) > 0.999


def _small_scorecam_model() -> FaceModel:
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(16, 4))
    return wrap(net, task="classification", input_size=48, class_names=list("abcd"), align=None,
                layers={"late": "5"})


def test_scorecam_agrees_with_pytorch_grad_cam_and_is_not_slower() -> None:
    model = _small_scorecam_model()
    x, target = _image(48, 3), ClassScore(2)
    ours = get_method("scorecam")(model, batch_size=16).attribute(x, target)[0].numpy()
    with ScoreCAM(model=model.net, target_layers=[model.layer("late")]) as cam:
        cam.batch_size = 16
        theirs = cam(x, targets=[target])[0]
    # their masks use align_corners=True upsampling; ours half-pixel centres: close, not identical
    # (measured: both above 0.9999 on five images)
    assert spearmanr(ours.ravel(), theirs.ravel())[0] > 0.99
    assert pearsonr(ours.ravel(), theirs.ravel())[0] > 0.99

    def best_of(fn: object, repeats: int = 3) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()  # type: ignore[operator]
            times.append(time.perf_counter() - t0)
        return min(times)

    def run_theirs() -> None:
        with ScoreCAM(model=model.net, target_layers=[model.layer("late")]) as cam:
            cam.batch_size = 16
            cam(x, targets=[target])

    ours_s = best_of(lambda: get_method("scorecam")(model, batch_size=16).attribute(x, target))
    theirs_s = best_of(run_theirs)
    assert ours_s <= theirs_s, f"ours {ours_s:.3f}s, pytorch-grad-cam {theirs_s:.3f}s"


def test_scorecam_does_not_depend_on_batch_size() -> None:
    model, x = _small_scorecam_model(), _image(48, 5)
    a = get_method("scorecam")(model, batch_size=3).attribute(x, ClassScore(0))[0]
    b = get_method("scorecam")(model, batch_size=64).attribute(x, ClassScore(0))[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["cam", "gradcam", "gradcam++", "scorecam"])
def test_torchvision_resnet18_with_random_weights(name: str) -> None:
    # in-place ReLUs switched off by the registry, one ReLU module reused per block, residual adds;
    # Score-CAM scores 512 masked images, so it gets a smaller input (the net is fully convolutional)
    model = load_model("torchvision:resnet18", weights=None)
    size = 32 if name == "scorecam" else 64
    saliency = get_method(name)(model, batch_size=256).attribute(_image(size, 2), ClassScore(3))[0]
    assert saliency.shape == (size, size) and torch.isfinite(saliency).all()
    assert _no_hooks(model.net)


ZOO = ["dlib-resnet", "dlib-age", "dlib-gender", "fer-emotion"]


@pytest.mark.parametrize("zoo_name", ZOO)
def test_zoo_models_give_finite_maps_at_every_depth(zoo_name: str) -> None:
    model = load_model(zoo_name)
    h, w = model.input_size
    x = _image(h, 8)
    with torch.inference_mode():
        out = model.net(x)[0]
    target = ClassScore(int(out.argmax())) if model.task == "classification" else Similarity(out.flip(0))
    method = get_method("gradcam")(model, all_depths=True)
    saliency = method.attribute(x, target)[0]
    assert saliency.shape == (h, w) and torch.isfinite(saliency).all() and saliency.abs().sum() > 0
    assert set(method.extras["depths"]) == {"early", "mid", "late"}
    assert all(np.isfinite(m).all() and m.shape == (h, w) for m in method.extras["depths"].values())
    saliency = get_method("gradcam++")(model).attribute(x, target)[0]
    assert saliency.shape == (h, w) and torch.isfinite(saliency).all()
    if zoo_name == "dlib-gender":  # 64 channels at 32×32: the cheap one for Score-CAM
        saliency = get_method("scorecam")(model, batch_size=64).attribute(x, target)[0]
        assert saliency.shape == (h, w) and torch.isfinite(saliency).all()
    assert _no_hooks(model.net)


def test_region_attention_per_depth_on_a_real_face(shared_faces: Path, manifest_rows: list[dict[str, str]]) -> None:
    # the classic "facial regions × layers" table: one region-attention row per named depth
    from facelens.explain.api import explain
    from facelens.explain.explanation import region_attention
    from facelens.faces.regions import chip_region_masks

    photo = shared_faces / manifest_rows[0]["path"]
    e = explain("dlib-gender", photo, method="gradcam", all_depths=True)
    assert set(e.extras["depths"]) == {"early", "mid", "late"}
    np.testing.assert_array_equal(e.extras["depths"]["late"], e.chip_map)
    masks = chip_region_masks(e.chip)
    for depth_map in e.extras["depths"].values():
        shares = region_attention(depth_map, masks).mass
        assert 0.5 < sum(shares.values()) <= 1.0 + 1e-6
