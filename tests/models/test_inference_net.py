"""The channels_last inference copy: same outputs, used only where safe, rebuilt when weights change."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from facelens.explain.engine import PerturbationEngine
from facelens.models import load_model
from facelens.models.fuse import ChannelsLastNet, FastNet, inference_net, passive, watched
from facelens.targets import ClassScore


@pytest.fixture(scope="module")
def fer():
    return load_model("fer-emotion", fresh=True)


def _inputs(model, n: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    coarse = nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=model.input_size, mode="bilinear")
    return (coarse + 0.1 * torch.rand(n, 3, *model.input_size, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("name", ["fer-emotion", "dlib-age", "dlib-gender"])
def test_copy_gives_the_networks_outputs(name):
    model = load_model(name, fresh=True)
    x = _inputs(model)
    fast = inference_net(model.net, x)
    assert isinstance(fast, ChannelsLastNet)
    conv = next(m for m in fast.impl.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want, got = model.net(x), fast(x)
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert inference_net(model.net, x[:1]) is fast  # cached: one copy per weights


def test_dlib_resnet_gets_its_fused_graph():
    model = load_model("dlib-resnet")
    assert isinstance(inference_net(model.net, torch.rand(2, 3, 150, 150)), FastNet)
    assert inference_net(model.net, torch.rand(2, 3, 120, 120)) is model.net  # traced for 150×150 only


def test_a_watched_or_training_network_runs_as_it_is(fer):
    x = _inputs(fer, 2)
    handle = fer.layer("late").register_forward_hook(lambda *_: None)
    try:
        assert watched(fer.net)
        assert inference_net(fer.net, x) is fer.net
    finally:
        handle.remove()
    handle = fer.net.register_forward_pre_hook(passive(lambda *_: None))
    try:
        assert not watched(fer.net)  # a passive counter does not block the copy
        assert inference_net(fer.net, x) is not fer.net
    finally:
        handle.remove()
    fer.net.train()
    try:
        assert inference_net(fer.net, x) is fer.net
    finally:
        fer.net.eval()


def test_copy_is_rebuilt_when_weights_change():
    model = load_model("dlib-gender", fresh=True)
    x = _inputs(model, 3)
    first = inference_net(model.net, x)
    conv = next(m for m in model.net.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        conv.weight.mul_(-1.0)  # what a randomization sanity check does in place
    second = inference_net(model.net, x)
    assert second is not first
    with torch.inference_mode():
        torch.testing.assert_close(second(x), model.net(x), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(first(x), model.net(x), atol=1e-3)


class _ViewsItsInput(nn.Module):
    """A user layer that assumes NCHW memory: ``view`` fails on a channels_last tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).view(x.shape[0], -1))


class _Broken(nn.Module):
    """Gives other numbers when its input is channels_last: the check must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        flat = y.permute(0, 2, 3, 1).reshape(-1) if y.is_contiguous() else y.reshape(-1)
        return flat.view(x.shape[0], -1)[:, :4]


@pytest.mark.parametrize("net", [_ViewsItsInput(), _Broken()], ids=["fails-on-nhwc", "differs-on-nhwc"])
def test_a_network_the_copy_would_break_runs_as_it_is(net):
    x = torch.rand(3, 3, 8, 8)
    assert inference_net(net.eval(), x) is net
    engine = PerturbationEngine(net, lambda out: out[:, 0], batch_size=2)
    with torch.inference_mode():
        torch.testing.assert_close(engine.score(x), net(x)[:, 0])


def test_large_networks_are_not_copied(monkeypatch):
    from facelens.models import fuse

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    monkeypatch.setattr(fuse, "CHANNELS_LAST_MAX_PARAMS", 10)
    assert inference_net(net, torch.rand(1, 3, 8, 8)) is net


def test_engine_scores_on_the_copy_and_agrees_with_the_network(fer):
    x = _inputs(fer, 6)
    ran: list[int] = []
    fast = inference_net(fer.net, x)
    handle = fast.register_forward_pre_hook(lambda _m, a: ran.append(a[0].shape[0]))
    try:
        target = ClassScore(3)
        fast_scores = PerturbationEngine(fer.net, target, batch_size=4).score(x)
        plain_scores = PerturbationEngine(fer.net, target, batch_size=4, fast=False).score(x)
    finally:
        handle.remove()
    assert ran == [4, 2]  # the fast engine ran on the copy, the plain one did not
    np.testing.assert_allclose(fast_scores.numpy(), plain_scores.numpy(), atol=1e-4, rtol=1e-4)


def test_copy_first_built_in_inference_mode_still_gives_input_gradients():
    model = load_model("dlib-gender", fresh=True)
    x = _inputs(model, 2)
    with torch.inference_mode():
        inference_net(model.net, x)  # the engine builds it like this
    inp = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(inference_net(model.net, x, grad=True)(inp)[:, 1].sum(), inp)
    ref = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(model.net(ref)[:, 1].sum(), ref)
    torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-4)


def test_caches_do_not_keep_a_network_alive():
    import gc
    import weakref

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    x = torch.rand(2, 3, 8, 8)
    assert inference_net(net, x) is not net
    PerturbationEngine(net, lambda out: out[:, 0]).score(x)
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None


def test_dlib_resnet_gradient_copy_is_folded_and_gives_the_same_gradients():
    from facelens.models.layers import Affine

    model = load_model("dlib-resnet")
    x = _inputs(model, 2)
    copy_ = inference_net(model.net, x, grad=True)
    assert isinstance(copy_, ChannelsLastNet)
    assert not any(isinstance(m, Affine) for m in copy_.impl.modules())  # folded into the convolutions
    direction = torch.randn(128, generator=torch.Generator().manual_seed(2))
    grads = []
    for net in (copy_, model.net):
        inp = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((net(inp) @ direction).sum(), inp)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5 * float(grads[1].abs().max()), rtol=1e-3)
