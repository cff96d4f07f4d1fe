"""CAM, Grad-CAM, Grad-CAM++, Layer-CAM and Score-CAM: identities, peers, hooks and real models."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM
from scipy.stats import pearsonr, spearmanr
from torch import nn

from facelens.errors import ModelError
from facelens.explain import cams  # registers the CAM methods
from facelens.explain.base import METHODS
from facelens.models import FaceModel, dlib_resnet, load_model, wrap
from facelens.targets import ClassScore, CohortSimilarity, Similarity, Target, UserTarget
from facelens.weights import is_cached
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


def _bilinear_half_pixel(m: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling written out: output pixel i samples the source at (i + ½)·h/size − ½, edge-clamped."""
    h, w = m.shape
    out = np.empty((size, size))
    for i in range(size):
        for j in range(size):
            y = min(max((i + 0.5) * h / size - 0.5, 0.0), h - 1.0)
            x = min(max((j + 0.5) * w / size - 0.5, 0.0), w - 1.0)
            y0, x0 = int(y), int(x)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = ((1 - dy) * ((1 - dx) * m[y0, x0] + dx * m[y0, x1])
                         + dy * ((1 - dx) * m[y1, x0] + dx * m[y1, x1]))
    return out


def _strided_net(seed: int = 0) -> FaceModel:
    # the hooked layer (a ReLU, 16×16) is followed by a 3×3 convolution and a ReLU before the pooling,
    # so its gradient varies from cell to cell and Layer-CAM differs from Grad-CAM
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return wrap(net, task="classification", input_size=SIZE, class_names=["a", "b", "c"], align=None,
                layers={"early": "0", "mid": "1", "late": "3"})


def test_layercam_is_relu_of_the_cellwise_positive_gradient_times_activation() -> None:
    model, x = _strided_net(2), _image(seed=3)
    for cls in range(3):
        # by hand: A at the layer (6×16×16), g = ∂logit/∂A, map = ReLU(Σ_k ReLU(g_k) ⊙ A_k), then upsampled
        features = model.net.model[:2](model.net.normalize(x)).detach().requires_grad_(True)
        logit = model.net.model[2:](features)[0, cls]
        grad = torch.autograd.grad(logit, features)[0][0]
        a = features.detach()[0].double().numpy()
        g = grad.double().numpy()
        low = np.maximum((np.maximum(g, 0) * a).sum(0), 0)
        assert low.shape == (16, 16) and np.ptp(g, axis=(1, 2)).max() > 0  # a gradient that varies over the map
        method = get_method("layercam")(model, layer="mid")
        ours = method.attribute(x, ClassScore(cls))[0].numpy()
        np.testing.assert_allclose(ours, _bilinear_half_pixel(low, SIZE), rtol=1e-4, atol=1e-7)
        assert (method.extras["layer"], method.extras["layer_shape"], method.extras["layer_channels"]) == (
            "model.1", [16, 16], 6)
        # not Grad-CAM: the channel-averaged gradient gives another map here
        grad_cam = get_method("gradcam")(model, layer="mid").attribute(x, ClassScore(cls))[0].numpy()
        assert not np.allclose(ours, grad_cam, rtol=1e-2, atol=1e-6)
    assert _no_hooks(model.net)


def test_layercam_on_a_pooled_linear_head_keeps_the_positive_classifier_weights() -> None:
    # ∂logit/∂A_k(i, j) = w_k / (h·w) everywhere, so Layer-CAM = ReLU(Σ_k ReLU(w_k) A_k) / (h·w)
    model, x = _toy(), _image()
    features = model.net.model[:4](model.net.normalize(x))[0]
    weights = torch.relu(model.net.model[6].weight[2])
    hand = torch.relu(torch.einsum("k,khw->hw", weights, features)).detach() / (16 * 16)
    ours = get_method("layercam")(model).attribute(x, ClassScore(2))[0]
    torch.testing.assert_close(ours, _upsample(hand), rtol=1e-4, atol=1e-7)


def test_layercam_is_registered_as_a_pytorch_grad_cam_method() -> None:
    from facelens.explain.api import list_methods

    listed = {m["name"]: m for m in list_methods()}
    assert listed["layercam"]["library"] == "pytorch-grad-cam"
    assert listed["layercam"]["settings"] == {"layer": "cam", "all_depths": False}
    assert {k: v for k, v in listed["layercam"].items() if k != "name"} == {
        k: v for k, v in listed["gradcam"].items() if k != "name"}
    assert get_method("layercam") is cams.LayerCam


@pytest.mark.parametrize(("name", "peer"), [("gradcam", GradCAM), ("gradcam++", GradCAMPlusPlus),
                                            ("layercam", LayerCAM)])
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


@pytest.mark.parametrize("name", ["cam", "gradcam", "layercam", "scorecam"])
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


@pytest.mark.parametrize("name", ["cam", "gradcam", "gradcam++", "layercam"])
def test_a_target_with_an_exactly_zero_gradient_is_refused_not_drawn_as_an_empty_map(name: str) -> None:
    flat = UserTarget(lambda out: out[:, 0] * 0.0, label="constant score")
    with pytest.raises(ModelError, match=r"gradient of the constant score at layer 'model\.3' is exactly zero"):
        get_method(name)(_toy(), layer="late").attribute(_image(), flat)


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
    # each depth's layer and resolution, for the report's "layer, h×w" column
    assert method.extras["depth_layers"] == {"early": "model.0", "mid": "model.1", "late": "model.3"}
    assert method.extras["depth_shapes"] == {"early": [32, 32], "mid": [32, 32], "late": [16, 16]}
    assert (method.extras["layer"], method.extras["layer_shape"], method.extras["layer_channels"]) == (
        "model.3", [16, 16], 8)
    assert "resolution_warning" not in method.extras


def _zero_bias_region_model(mask: np.ndarray) -> FaceModel:
    # The fixture's last 1×1 convolution has a bias, so its ReLU is a non-zero constant outside the
    # mask; without it the late features are exactly zero there and a CAM must be too.
    model = region_only_model(mask)
    with torch.no_grad():
        model.net.conv3.bias.zero_()
    return model


@pytest.mark.parametrize("name", ["cam", "gradcam", "gradcam++", "layercam", "scorecam"])
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


def test_scorecam_agrees_with_pytorch_grad_cam() -> None:
    # speed against pytorch-grad-cam is measured in bench/, not asserted here
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


def test_scorecam_does_not_depend_on_batch_size() -> None:
    model, x = _small_scorecam_model(), _image(48, 5)
    a = get_method("scorecam")(model, batch_size=3).attribute(x, ClassScore(0))[0]
    b = get_method("scorecam")(model, batch_size=64).attribute(x, ClassScore(0))[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["cam", "gradcam", "gradcam++", "layercam", "scorecam"])
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


@pytest.mark.parametrize("zoo_name", ZOO)
def test_layercam_on_each_zoo_model_at_the_default_layer_and_every_depth(zoo_name: str) -> None:
    model = load_model(zoo_name)  # dlib-resnet: the real weights (cached)
    h, w = model.input_size
    x = _image(h, 8)
    if model.task == "classification":
        with torch.inference_mode():
            target: Target = ClassScore(int(model.net(x)[0].argmax()))
    else:
        target = _embedding_target(model, x)  # the recognizer's default target kind: a cohort z-score
    method = get_method("layercam")(model, all_depths=True)
    saliency = method.attribute(x, target)[0]
    assert saliency.shape == (h, w) and torch.isfinite(saliency).all()
    assert saliency.min() >= 0 and saliency.sum() > 0 and np.ptp(saliency.numpy()) > 0
    late, shape, _, _ = ZOO_DEFAULT_LAYERS[zoo_name]
    extras = method.extras
    assert (extras["layer"], extras["layer_shape"], extras["layer_channels"]) == (late, list(shape[1:]), shape[0])
    assert "resolution_warning" not in extras
    assert set(extras["depths"]) == {"early", "mid", "late"} and extras["depths_undefined"] == {}
    assert all(np.isfinite(m).all() and m.shape == (h, w) and m.min() >= 0 for m in extras["depths"].values())
    cam_depth = next((d for d in ("early", "mid", "late") if model.layers[d] == late), None)
    if cam_depth is not None:  # the default layer is also one of the depths (dlib-age, dlib-gender)
        np.testing.assert_array_equal(extras["depths"][cam_depth], saliency.numpy())
    assert extras["depth_layers"] == {d: model.layers[d] for d in ("early", "mid", "late")}
    assert all(len(extras["depth_shapes"][d]) == 2 for d in ("early", "mid", "late"))
    assert _no_hooks(model.net)


def test_layercam_follows_occlusion_on_a_real_face_where_gradcam_is_flat(
        shared_faces: Path, manifest_rows: list[dict[str, str]]) -> None:
    # the reason for Layer-CAM: dlib-resnet's 8×8 default layer, default (cohort) target. Measured on
    # 20 FRL London photos: Spearman with occlusion 0.71 for Layer-CAM, 0.16 for Grad-CAM
    from facelens.evaluate.agreement import spearman
    from facelens.explain.api import get_method as any_method
    from facelens.explain.api import resolve_target

    if not is_cached(dlib_resnet.WEIGHTS_KEY):
        pytest.skip("dlib-resnet weights are not cached")
    row = next(r for r in manifest_rows if r["dataset"] == "frl_london" and r["subset"] == "neutral")
    model = load_model("dlib-resnet")
    chip = model.chip(shared_faces / row["path"])
    x, target = model.to_tensor(chip), resolve_target(model, chip, None)
    layer_cam = get_method("layercam")(model)
    maps = {name: any_method(name)(model).attribute(x, target, chips=[chip])[0].numpy()
            for name in ("gradcam", "occlusion")}
    maps["layercam"] = layer_cam.attribute(x, target, chips=[chip])[0].numpy()
    assert layer_cam.extras["layer"] == "stage3.block2.relu2" and layer_cam.extras["layer_shape"] == [8, 8]
    rho = {name: spearman(maps[name], maps["occlusion"]) for name in ("layercam", "gradcam")}
    assert rho["layercam"] > 0.5 and rho["layercam"] > rho["gradcam"] + 0.3, rho


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


# -- default layers of the zoo: the deepest map of at least 8×8 -------------------------------------------
# (zoo model, its "cam" layer = default Grad-CAM layer with (channels, h, w), the next deeper candidate and
# its side). dlib-gender's pool2 (8×8) is deeper than relu4 only by a 2×2 average: same channel weights,
# a coarser map, so relu4 is its default.
ZOO_DEFAULT_LAYERS = {
    "dlib-resnet": ("stage3.block2.relu2", (128, 8, 8), "stage4.block0", 4),
    "dlib-age": ("body.block1", (64, 14, 14), "body.block2", 7),
    "dlib-gender": ("body.relu4", (64, 16, 16), None, None),
    "fer-emotion": ("body.block3", (64, 8, 8), "body.block4", 4),
}


def _hooked_shapes(model: FaceModel, names: list[str]) -> dict[str, tuple[int, ...]]:
    """The output shape ``(C, h, w)`` of each named module, from one forward at the model's input size."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [model.net.get_submodule(n).register_forward_hook(
        lambda _m, _i, out, n=n: shapes.__setitem__(n, tuple(out.shape[1:]))) for n in names]
    try:
        with torch.inference_mode():
            model.net(torch.rand(1, 3, *model.input_size))
    finally:
        for h in handles:
            h.remove()
    return shapes


@pytest.mark.parametrize("zoo_name", ZOO)
def test_default_gradcam_layer_of_each_zoo_model_is_its_deepest_map_of_at_least_8x8(zoo_name: str) -> None:
    model = load_model(zoo_name)
    late, shape, deeper, deeper_side = ZOO_DEFAULT_LAYERS[zoo_name]
    assert get_method("gradcam").defaults["layer"] == "cam" and model.layers["cam"] == late
    names = list(dict.fromkeys([model.layers[d] for d in ("early", "mid", "late")] + [late]
                               + ([deeper] if deeper else [])))
    shapes = _hooked_shapes(model, names)
    assert shapes[late] == shape and min(shape[1:]) >= cams.MIN_SIDE
    if deeper is not None:
        assert min(shapes[deeper][1:]) == deeper_side < cams.MIN_SIDE
    sides = [shapes[model.layers[d]][1] for d in ("early", "mid", "late")]
    assert sides == sorted(sides, reverse=True), f"early/mid/late are not in depth order: {sides}"
    # the method reports the same resolutions, for the report's early/mid/late table
    target = ClassScore(0) if model.task == "classification" else Similarity(torch.ones(128), "dot")
    method = get_method("gradcam")(model, all_depths=True)
    method.attribute(_image(model.input_size[0], 3), target)
    assert method.extras["layer"] == late and method.extras["layer_shape"] == list(shape[1:])
    assert method.extras["depth_layers"] == {d: model.layers[d] for d in ("early", "mid", "late")}
    assert method.extras["depth_shapes"] == {d: list(shapes[model.layers[d]][1:]) for d in ("early", "mid", "late")}


def _random_dlib_resnet() -> dlib_resnet.DlibResNet:
    torch.manual_seed(0)
    net = dlib_resnet.DlibResNet()
    with torch.no_grad():  # a scale that keeps activations alive through 29 convolutions
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.eval()


@pytest.fixture(scope="module")
def resnet_model() -> FaceModel:
    """The real dlib-resnet when its weights are cached, else the same zoo entry with seeded random weights."""
    if is_cached(dlib_resnet.WEIGHTS_KEY):
        return load_model("dlib-resnet")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dlib_resnet, "load_dlib_resnet", _random_dlib_resnet)
        return dlib_resnet.build()


def _embedding_target(model: FaceModel, x: torch.Tensor) -> Target:
    """The default recognizer target (cohort z-score) against another image's embedding."""
    with torch.inference_mode():
        ref = model.net(torch.flip(x, dims=[-1]))[0]
    return CohortSimilarity(ref, model.cohort) if model.cohort is not None else Similarity(ref, "dot")


def test_cam_on_dlib_resnet_is_the_embedding_weights_projected_on_the_target_direction(
        resnet_model: FaceModel) -> None:
    model, x = resnet_model, _image(150, 11)
    target = _embedding_target(model, x)
    method = get_method("cam")(model)
    ours = method.attribute(x, target)[0]
    # by hand: features A of the layer feeding the pooling, w = Wᵀ ∂target/∂embedding, CAM = Σ_k w_k A_k
    captured: list[torch.Tensor] = []
    handle = model.net.stage5.block0.relu2.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        embedding = model.net(x).detach().requires_grad_(True)
    finally:
        handle.remove()
    direction = torch.autograd.grad(target(embedding).sum(), embedding)[0][0]
    weights = model.net.embedding.weight.T @ direction
    hand = torch.einsum("k,khw->hw", weights, captured[0][0]).detach()
    # float32 sums in another order: equal to 1e-5 of the map's own scale (the map's zero
    # crossings make a relative tolerance meaningless there)
    expected = _upsample(hand, 150)
    print(f"\ncam vs by hand: max |Δ| {float((ours - expected).abs().max()):.2e}, "
          f"map scale {float(expected.abs().max()):.2e}")
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert ours.abs().sum() > 0 and not torch.allclose(ours, ours.mean().expand_as(ours))
    # necessarily coarse, and said so
    assert method.extras["layer"] == "stage5.block0.relu2" and method.extras["layer_shape"] == [2, 2]
    assert "too coarse" in str(method.extras["resolution_warning"])
    assert method.used_settings()["layer"] == cams.GAP
    assert _no_hooks(model.net)


def test_cam_at_a_named_dlib_resnet_layer_not_followed_by_the_pooling_is_refused(resnet_model: FaceModel) -> None:
    x = _image(150, 12)
    for layer in ("late", "stage4.block2.relu2"):
        with pytest.raises(ModelError, match=r"not followed by global average pooling.*'stage5\.block0\.relu2'"):
            get_method("cam")(resnet_model, layer=layer).attribute(x, _embedding_target(resnet_model, x))
    cam = get_method("cam")(resnet_model, layer="stage5.block0.relu2").attribute(x, _embedding_target(resnet_model, x))
    assert torch.isfinite(cam).all() and cam.abs().sum() > 0


def test_cam_and_gradcam_explain_a_real_face_on_dlib_resnet_with_the_default_target(
        shared_faces: Path, manifest_rows: list[dict[str, str]]) -> None:
    from facelens.explain.api import explain

    row = next(r for r in manifest_rows if r["dataset"] == "frl_london" and r["subset"] == "neutral")
    photo = shared_faces / row["path"]
    cam = explain("dlib-resnet", photo, method="cam")
    assert cam.extras["layer_shape"] == [2, 2] and np.isfinite(cam.chip_map).all() and np.ptp(cam.chip_map) > 0
    grad = explain("dlib-resnet", photo, method="gradcam")
    assert grad.target.startswith("cohort z-score"), grad.target  # the recognizer's default target
    assert grad.extras["layer"] == "stage3.block2.relu2" and grad.extras["layer_shape"] == [8, 8]
    # a non-zero gradient reaches the layer: the map is not empty, and varies across the chip
    assert grad.chip_map.max() > 0 and np.ptp(grad.chip_map) > 0
