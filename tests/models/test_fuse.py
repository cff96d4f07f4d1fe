"""The fused dlib-resnet copy gives the plain port's embeddings, and FaceModel uses it only where safe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from facelens.models import load_model
from facelens.models.base import FUSED_MIN_CHIPS
from facelens.models.fuse import FastNet, fast_net, fold, fold_conv_affine, fold_normalize
from facelens.models.layers import Affine, Normalize


@pytest.fixture(scope="module")
def model():
    return load_model("dlib-resnet", fresh=True)


@pytest.fixture(scope="module")
def faces_batch(model) -> torch.Tensor:
    """Textured inputs in [0, 1]: smooth blobs plus noise, so every channel and the padding matter."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.nn.functional.interpolate(torch.rand(6, 3, 10, 10, generator=g), size=model.input_size,
                                             mode="bilinear")
    return (coarse + 0.1 * torch.rand(6, 3, *model.input_size, generator=g)).clamp(0, 1)


def test_fold_conv_affine_matches_conv_then_affine():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3, padding=1), Affine(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    expected = bn(conv(x))
    fold_conv_affine(conv, bn)
    torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)


def test_fold_normalize_matches_and_refuses_padded_convolutions():
    torch.manual_seed(0)
    norm = Normalize(mean=(120.0, 110.0, 100.0), scale=(50.0, 60.0, 70.0))
    conv = nn.Conv2d(3, 4, 5, stride=2)
    x = torch.rand(2, 3, 20, 20)
    expected = conv(norm(x))
    fold_normalize(norm, conv)
    torch.testing.assert_close(conv(x), expected, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="without padding"):
        fold_normalize(norm, nn.Conv2d(3, 4, 3, padding=1))


def test_fold_removes_every_affine_and_keeps_the_original(model, faces_batch):
    folded = fold(model.net)
    assert not any(isinstance(m, (Affine, Normalize)) for m in folded.modules())
    assert sum(isinstance(m, Affine) for m in model.net.modules()) == 29  # the original is untouched
    with torch.inference_mode():
        ref, out = model.net(faces_batch), folded(faces_batch)
    assert (out - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("mode", ["eager", "channels_last", "jit"])
def test_fast_net_gives_the_same_embeddings(model, faces_batch, mode):
    fast = FastNet(model.net, mode)
    with torch.inference_mode():
        ref = model.net(faces_batch)
        out = fast(faces_batch)
        one = fast(faces_batch[:1])  # traced at batch 8: other batch sizes must work too
    assert out.shape == ref.shape == (6, 128)
    assert (out - ref).abs().max().item() <= 1e-4
    assert (one - ref[:1]).abs().max().item() <= 1e-4


def test_fast_net_cache_follows_weight_changes(model, faces_batch):
    net = load_model("dlib-resnet", fresh=True).net
    first = fast_net(net)
    assert first is fast_net(net)
    with torch.no_grad():
        net.stem.conv.weight.mul_(0.5)  # an in-place change, as a randomization test makes
    second = fast_net(net)
    assert second is not first
    with torch.inference_mode():
        torch.testing.assert_close(second(faces_batch), net(faces_batch), atol=1e-4, rtol=0)
    assert fast_net(nn.Sequential(nn.Conv2d(3, 3, 1))) is None


def test_forward_chips_uses_the_fast_copy_only_when_safe(model, faces_batch):
    chips = (faces_batch.permute(0, 2, 3, 1) * 255).round().byte().numpy()
    many = np.concatenate([chips] * -(-FUSED_MIN_CHIPS // len(chips)))[:FUSED_MIN_CHIPS]
    calls: list[int] = []
    handle = model.net.register_forward_pre_hook(lambda _m, a: calls.append(a[0].shape[0]))
    try:
        hooked = model.forward_chips(many)  # a hook watches the net: the plain net must run
        assert calls == [FUSED_MIN_CHIPS]
    finally:
        handle.remove()
    assert model.fast_net() is not None
    calls.clear()
    handle = model.fast_net().register_forward_pre_hook(lambda _m, a: calls.append(a[0].shape[0]))
    try:
        fused = model.forward_chips(many)
        small = model.forward_chips(many[:2])  # below FUSED_MIN_CHIPS: the plain net
        forced = model.forward_chips(many[:2], fused=True)
    finally:
        handle.remove()
    assert calls == [FUSED_MIN_CHIPS, 2]
    assert np.abs(fused - hooked).max() <= 1e-4
    assert np.abs(forced - small).max() <= 1e-4
    np.testing.assert_array_equal(small, model.forward_chips(many[:2], fused=False))
