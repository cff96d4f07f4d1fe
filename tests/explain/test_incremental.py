"""Incremental occlusion: exact against full recompute, fallbacks, the approximate mode."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from facelens.errors import ModelError
from facelens.explain import incremental as I
from facelens.explain.perturbation import Occlusion, fill_image, occlusion_windows
from facelens.models import FaceModel, load_model, wrap
from facelens.models.fer_emotion import SamePad
from facelens.models.layers import Add, Normalize, PadAdd
from facelens.targets import ClassScore, Similarity, Target


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(1, 3, 7, 7, generator=g), size=(h, w), mode="bilinear")
    return (coarse + 0.1 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)


class EdgeNet(nn.Module):
    """Every geometry the planner must get right: unpadded strided convolution, padded max-pool,
    dilation, replicate and reflect padding, TensorFlow 'same' padding, a depthwise convolution,
    a spatial constant, an identity residual and a dlib-style residual whose branches differ in
    size and channels, batch norms with real statistics (folded into the convolutions)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.normalize = Normalize((120.0, 110.0, 100.0), 60.0)
        self.conv1 = nn.Conv2d(3, 8, 5, stride=2)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.register_buffer("gain", 0.5 + torch.rand(1, 1, 9, 10, generator=g))
        self.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, padding_mode="replicate")
        self.add = Add()
        self.down = nn.Conv2d(8, 16, 3, stride=2)
        self.shortcut = nn.AvgPool2d(2, stride=2)
        self.pad_add = PadAdd()
        self.reflect = nn.ReflectionPad2d((1, 0, 2, 1))
        self.depthwise = nn.Conv2d(16, 16, 3, groups=16)
        self.bn2 = nn.BatchNorm2d(16)
        self.same = SamePad(3, 2, mode="replicate")
        self.pool2 = nn.MaxPool2d(3, 2)
        self.head = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, 3)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.2)
                bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=g))
                bn.weight.copy_(0.5 + torch.rand(bn.num_features, generator=g))
                bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            self.fc.weight.mul_(10.0)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool1(self.relu1(self.bn1(self.conv1(self.normalize(x)))))  # 37×41 → 17×19 → 9×10
        y = y * self.gain
        z = self.conv3(torch.relu(self.conv2(y)))
        y = self.add(y, z) * 0.5 + 1.0
        y = self.pad_add(self.down(y), self.shortcut(y))  # 4×4 (16 ch) + 4×5 (8 ch) → 4×5 × 16
        y = self.bn2(self.depthwise(self.reflect(y)))  # 7×6 → 5×4
        y = self.pool2(self.same(y))
        return self.fc(self.flatten(self.head(y)))


def _wrap(net: nn.Module, h: int, w: int) -> FaceModel:
    return wrap(net, task="classification", input_size=(h, w), class_names=["a", "b", "c"], align=None)


def _full_map(model: FaceModel, x: torch.Tensor, target: Target, window: int, stride: int,
              fill: str = "zero") -> torch.Tensor:
    return Occlusion(model, window=window, stride=stride, fill=fill, incremental=None).attribute(x, target)[0]


def _patched(x: torch.Tensor, fill: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
    out = x.repeat(len(boxes), 1, 1, 1)
    for i, (r0, r1, c0, c1) in enumerate(boxes):
        out[i, :, r0:r1, c0:c1] = fill[0, :, r0:r1, c0:c1]
    return out


# -- exact --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_exact_equals_full_recompute_on_every_edge_case(fill: str) -> None:
    # 37×41 with window 5, stride 3: the last windows are cropped at the bottom and right borders
    model, x, target = _wrap(EdgeNet(), 37, 41), _image(37, 41, seed=1), ClassScore(2)
    full = _full_map(model, x, target, 5, 3, fill)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer of EdgeNet is supported: no fallback warning
        result = I.incremental_occlusion(model.net, x, target, window=5, stride=3, fill=fill, batch_size=17)
    assert float(full.abs().max()) > 1e-2
    assert float((result.map - full).abs().max()) <= 1e-4
    assert not result.fell_back and result.mode == "exact"
    assert result.evaluations == len(occlusion_windows(37, 5, 3)) * len(occlusion_windows(41, 5, 3))
    assert 0 < result.work_fraction < 1


def test_exact_scores_of_corner_and_border_patches_match_the_network() -> None:
    net, x = EdgeNet(), _image(37, 41, seed=2)
    fill = fill_image(x, "mean")
    # corners, edges, single pixels, and a patch the unpadded strided convolution never reads (row 36)
    boxes = np.array([[0, 6, 0, 6], [31, 37, 35, 41], [0, 6, 35, 41], [31, 37, 0, 6], [0, 1, 0, 1],
                      [36, 37, 40, 41], [36, 37, 10, 20], [15, 22, 0, 41], [10, 30, 12, 13]])
    target = ClassScore(0)
    result = I.incremental_net(net).scores(x, fill, boxes, target, batch_size=4)
    with torch.inference_mode():
        expected = target(net(_patched(x, fill, boxes)))
        intact = float(target(net(x))[0])
    torch.testing.assert_close(result.scores, expected, rtol=0, atol=1e-5)
    assert result.intact == pytest.approx(intact, abs=1e-6)


def test_maps_do_not_depend_on_the_batch_size() -> None:
    net, x = EdgeNet(), _image(37, 41, seed=4)
    a = I.incremental_occlusion(net, x, ClassScore(1), window=6, stride=4, batch_size=5).map
    b = I.incremental_occlusion(net, x, ClassScore(1), window=6, stride=4, batch_size=64).map
    assert torch.equal(a, b)


def test_plan_geometry_is_reused_across_images_but_weights_are_read_each_call() -> None:
    edge = EdgeNet()
    model, target = _wrap(edge, 37, 41), ClassScore(2)
    inet = I.incremental_net(model.net)
    first = I.incremental_occlusion(model.net, _image(37, 41, seed=11), target, window=5, stride=3)
    codes = next(iter(inet._geometries.values())).codes
    assert codes  # read indices were worked out once ...
    x = _image(37, 41, seed=12)
    second = I.incremental_occlusion(model.net, x, target, window=5, stride=3)
    assert len(inet._geometries) == 1 and next(iter(inet._geometries.values())).codes is codes  # ... and reused
    assert float((second.map - _full_map(model, x, target, 5, 3)).abs().max()) <= 1e-4
    assert not torch.equal(first.map, second.map)
    # weights changed in place (a sanity check's randomization): the cached geometry must not keep old ones
    with torch.no_grad():
        edge.conv2.weight.mul_(-1.5)
        edge.bn1.running_mean.add_(0.3)
    third = I.incremental_occlusion(model.net, x, target, window=5, stride=3)
    full = _full_map(model, x, target, 5, 3)
    assert float((third.map - second.map).abs().max()) > 1e-2
    assert float((third.map - full).abs().max()) <= 1e-4
    # a batch norm put in training mode is no longer folded: a new geometry, still exact
    edge.bn2.train()
    edge.bn2.momentum = 0.0  # batch statistics without changing the running ones
    with torch.inference_mode():
        changed = I.incremental_occlusion(model.net, x, target, window=5, stride=3)
    assert len(inet._geometries) == 2
    assert changed.map.shape == x.shape[-2:]


def test_batches_hold_no_more_activations_than_batch_size_images() -> None:
    net, x = EdgeNet(), _image(37, 41, seed=4)
    inet = I.incremental_net(net)
    boxes = np.array([[r, r + 5, c, c + 5] for r in range(0, 33, 3) for c in range(0, 37, 3)])
    plan = inet.plan(x, boxes)
    image = max(v[0].numel() for v in plan.base.values() if isinstance(v, torch.Tensor) and v.dim() == 4)
    carried = [(plan.base[n], p) for n, p in plan.plans.items()
               if p.state in ("delta", "full") and isinstance(plan.base[n], torch.Tensor)]
    per_patch = max(int(v.shape[1]) * p.size[0] * p.size[1] if p.state == "delta" else v[0].numel() for v, p in carried)
    for batch_size in (1, 3, 16):
        step = plan.patches_per_batch(batch_size)
        assert batch_size <= step <= I.BATCH_GROWTH * batch_size
        assert step * per_patch <= max(batch_size * image, batch_size * per_patch)
    assert plan.patches_per_batch(16) > 16  # EdgeNet's patches are small: batches do grow


@functools.cache
def _zoo(name: str) -> tuple[FaceModel, torch.Tensor, Target]:
    model = load_model(name)
    x = _image(*model.input_size, seed=5)
    with torch.inference_mode():
        out = model.net(x)[0]
    target: Target = ClassScore(int(out.argmax())) if model.task == "classification" else Similarity(out)
    return model, x, target


@pytest.mark.parametrize("name", ["dlib-resnet", "fer-emotion"])
def test_exact_equals_full_recompute_on_zoo_models(name: str) -> None:
    model, x, target = _zoo(name)
    h, w = x.shape[-2:]
    window, stride = Occlusion(model)._geometry(h, w)  # 16/8 on dlib's 150 px chip
    rows, cols = occlusion_windows(h, window, stride), occlusion_windows(w, window, stride)
    starts_r, starts_c = np.arange(len(rows)) * stride, np.arange(len(cols)) * stride
    boxes = np.stack([np.repeat(starts_r, len(cols)), np.minimum(np.repeat(starts_r, len(cols)) + window, h),
                      np.tile(starts_c, len(rows)), np.minimum(np.tile(starts_c, len(rows)) + window, w)], 1)
    fill = fill_image(x, "zero")
    inet = I.incremental_net(model.net)
    assert inet.unsupported(tuple(x.shape)) == ()
    plan = inet.plan(x, boxes)
    # the plan covers the whole grid; score the corners, the borders and the middle against the network
    n_r, n_c = len(rows), len(cols)
    picks = sorted({0, n_c - 1, (n_r - 1) * n_c, n_r * n_c - 1, n_c // 2, (n_r // 2) * n_c,
                    (n_r // 2) * n_c + n_c - 1, (n_r - 1) * n_c + n_c // 2, (n_r // 2) * n_c + n_c // 2,
                    (n_r // 3) * n_c + 2 * n_c // 3})
    result = plan.scores(x, fill, target, batch_size=4, subset=np.array(picks))
    with torch.inference_mode():
        expected = target(model.net(_patched(x, fill, boxes[picks])))
    assert float((result.scores - expected).abs().max()) <= 1e-4
    assert float((expected - result.intact).abs().max()) > 1e-5  # the patches do change the score
    assert result.work_fraction < 0.7 and not result.fell_back


# -- fallbacks ----------------------------------------------------------------------------------------------
class Upsampling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        with torch.no_grad():
            self.head[2].weight.mul_(200.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(self.up(torch.relu(self.conv1(x))))))


class Untraceable(Upsampling):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.mean()) > 2.0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 0
        return super().forward(x)


def test_unsupported_layer_falls_back_to_full_recompute_and_says_so() -> None:
    model, x, target = _wrap(Upsampling(), 24, 24), _image(24, 24, seed=6), ClassScore(1)
    full = _full_map(model, x, target, 6, 3)
    with pytest.warns(RuntimeWarning, match="Upsample"):
        result = I.incremental_occlusion(model.net, x, target, window=6, stride=3)
    assert result.fell_back and "Upsample" in result.fallback_ops[0]
    assert float(full.abs().max()) > 1e-2
    assert float((result.map - full).abs().max()) <= 1e-4
    # the method's default does not pick incremental inference for it, and records that
    method = Occlusion(model, window=6, stride=3)
    torch.testing.assert_close(method.attribute(x, target)[0], full, rtol=0, atol=0)
    assert method.extras["incremental"]["mode"] is None


def test_untraceable_network_is_scored_in_full() -> None:
    model, x, target = _wrap(Untraceable(), 24, 24), _image(24, 24, seed=7), ClassScore(0)
    assert not I.incremental_net(model.net).traced
    with pytest.warns(RuntimeWarning, match="cannot trace"):
        result = I.incremental_occlusion(model.net, x, target, window=6, stride=3)
    assert result.fell_back and result.mode == "full"
    assert float((result.map - _full_map(model, x, target, 6, 3)).abs().max()) <= 1e-5


def test_occlusion_method_uses_incremental_inference_when_supported() -> None:
    model, x, target = _wrap(EdgeNet(), 37, 41), _image(37, 41, seed=8), ClassScore(0)
    method = Occlusion(model, window=5, stride=3)
    auto = method.attribute(x, target)[0]
    assert method.extras["incremental"]["mode"] == "exact"
    assert method.used_settings()["incremental"] == "exact"
    assert float((auto - _full_map(model, x, target, 5, 3)).abs().max()) <= 1e-4
    with pytest.raises(ModelError, match="incremental"):
        Occlusion(model, incremental="fast").attribute(x, target)


# -- approximate --------------------------------------------------------------------------------------------
def test_approx_without_threshold_or_drill_down_is_exact() -> None:
    net, x = EdgeNet(), _image(37, 41, seed=9)
    exact = I.incremental_occlusion(net, x, ClassScore(2), window=5, stride=3)
    same = I.incremental_occlusion(net, x, ClassScore(2), window=5, stride=3, mode="approx", tau=1.0,
                                   drill_factor=1, precision="float32")
    torch.testing.assert_close(same.map, exact.map, rtol=0, atol=1e-6)
    assert I.map_ssim(exact.map, same.map) == pytest.approx(1.0, abs=1e-6)
    assert exact.precision == same.precision == "float32"


def test_bfloat16_changes_only_the_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 (approximate mode only) gives the float32 map up to its ~3 significant digits; its
    drops are taken against an unpatched copy rounded the same way, so no offset creeps in."""
    net, x = EdgeNet(), _image(37, 41, seed=9)
    exact = I.incremental_occlusion(net, x, ClassScore(2), window=5, stride=3)
    # EdgeNet's convolutions are all narrow (≤ 75 multiply-adds per output): left in float32 ...
    narrow = I.incremental_occlusion(net, x, ClassScore(2), window=5, stride=3, mode="approx", tau=1.0,
                                     drill_factor=1, precision="bfloat16")
    torch.testing.assert_close(narrow.map, exact.map, rtol=0, atol=1e-5)
    # ... unless the threshold lets them all through
    monkeypatch.setattr(I, "BFLOAT16_MIN_FAN_IN", 1)
    low = I.incremental_occlusion(net, x, ClassScore(2), window=5, stride=3, mode="approx", tau=1.0,
                                  drill_factor=1, precision="bfloat16")
    assert low.precision == "bfloat16" and low.record()["precision"] == "bfloat16"
    with torch.inference_mode():
        scale = float(net(x).abs().max())  # bfloat16 keeps ~3 significant digits of the logits
    error = float((low.map - exact.map).abs().max())
    assert 0 < error < 0.03 * scale  # rounded, not equal; but close
    assert I.map_ssim(exact.map, low.map) > 0.9
    assert abs(float(low.map.mean() - exact.map.mean())) < 0.005 * scale
    with pytest.raises(ModelError, match="float32"):
        I.incremental_occlusion(net, x, ClassScore(2), window=5, stride=3, precision="bfloat16")
    with pytest.raises(ModelError, match="precision"):
        I.incremental_occlusion(net, x, ClassScore(2), window=5, stride=3, mode="approx", precision="half")  # type: ignore[arg-type]


def test_approx_mode_is_cheaper_and_close_to_exact_on_fer() -> None:
    model, x, target = _zoo("fer-emotion")
    h, w = x.shape[-2:]
    window, stride = Occlusion(model)._geometry(h, w)
    exact = I.incremental_occlusion(model.net, x, target, window=window, stride=stride)
    approx = I.incremental_occlusion(model.net, x, target, window=window, stride=stride, mode="approx", tau=0.5)
    assert approx.evaluations < exact.evaluations and approx.work_fraction < exact.work_fraction
    assert bool(approx.computed.any()) and not bool(approx.computed.all())
    ssim = I.map_ssim(exact.map, approx.map)
    shuffled = exact.map.flatten()[torch.randperm(h * w, generator=torch.Generator().manual_seed(0))].view(h, w)
    assert ssim >= 0.7 > I.map_ssim(exact.map, shuffled)
    # scored positions carry their (truncated-field) drops; the strongest window is found by both
    assert np.unravel_index(int(approx.drops.abs().argmax()), approx.drops.shape) == np.unravel_index(
        int(exact.drops.abs().argmax()), exact.drops.shape)


def test_bad_settings_are_refused() -> None:
    net, x = EdgeNet(), _image(37, 41)
    with pytest.raises(ModelError, match="mode"):
        I.incremental_occlusion(net, x, ClassScore(0), window=5, stride=3, mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="tau"):
        I.incremental_occlusion(net, x, ClassScore(0), window=5, stride=3, mode="approx", tau=0.0)
    with pytest.raises(ModelError, match="one image"):
        I.incremental_occlusion(net, x.repeat(2, 1, 1, 1), ClassScore(0), window=5, stride=3)
    with pytest.raises(ModelError, match="SSIM"):
        I.map_ssim(torch.zeros(4, 4), torch.zeros(4, 5))
