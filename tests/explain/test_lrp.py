"""LRP through zennit: conservation, canonizers, the output relevance, known-answer localization, zoo."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import Canonizer, SequentialMergeBatchNorm
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer, ResNetCanonizer

from facelens.errors import ModelError
from facelens.explain.api import resolve_target
from facelens.explain.canonize import ExactMergeBatchNorm, canonical_copy, foldable_batch_norms
from facelens.explain.lrp import COMPOSITES, LRP, first_layer_bounds, make_composite, output_relevance, relevance
from facelens.faces.align import AlignRecipe
from facelens.models import FaceModel, load_model
from facelens.models.layers import Add, Normalize
from facelens.targets import ClassScore, Contrastive, Similarity, Target
from tests.fixtures.synthetic import mass_inside, region_only_model

PHOTOS = ("images/demo/grace_hopper.jpg", "images/demo/astronaut_eileen_collins.png")


class BiasFree(nn.Module):
    """No bias anywhere (batch norm with zero mean and shift folds into none), so relevance must be conserved."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.normalize = Normalize((127.5, 127.5, 127.5), 64.0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.relu2 = nn.ReLU()
        self.add = Add()
        self.relu3 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8, 3, bias=False)
        with torch.no_grad():
            for m in (self.conv1, self.conv2, self.fc):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)
            self.bn1.weight.copy_(torch.rand(8, generator=g) + 0.5)
            self.bn1.running_var.copy_(torch.rand(8, generator=g) + 0.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(self.normalize(x))))
        y = self.relu3(self.add(self.relu2(self.conv2(h)), h))
        return self.fc(self.flatten(self.gap(self.pool(y))))


def _input(seed: int, size: int) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("index", [0, 1, 2])
def test_relevance_is_conserved_without_biases(composite: str, index: int) -> None:
    """Input relevance sums to the output relevance (the logit); measured gap ≤ 1.3e-5 relative, allowed 1e-4."""
    net = BiasFree()
    x = _input(0, 16)
    rel, r_out = relevance(net, x, ClassScore(index), composite)
    with torch.no_grad():
        logit = float(net(x)[0, index])
    assert float(r_out.sum()) == pytest.approx(logit, rel=1e-5)
    assert float(rel.sum()) == pytest.approx(logit, rel=1e-4)


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("task", ["classification", "embedding"])
def test_known_answer_localization(composite: str, task: str) -> None:
    """Relevance only flows through the mask, so all of it lands in the mask dilated by the receptive radius."""
    mask = np.zeros((64, 64), bool)
    mask[10:30, 20:50] = True
    model = region_only_model(mask, task)
    x = _input(0, 64)
    if task == "classification":
        target: Target = ClassScore(0)
    else:
        with torch.no_grad():
            target = Similarity(model.net(_input(1, 64))[0])
    saliency = LRP(model, composite=composite).attribute(x, target)[0].numpy()
    assert np.isfinite(saliency).all() and np.abs(saliency).sum() > 0
    assert mass_inside(saliency, mask) >= 0.99


def test_output_relevance_sums_to_the_target() -> None:
    g = torch.Generator().manual_seed(0)
    out = torch.randn(3, 16, generator=g)
    ref, non = torch.randn(16, generator=g), torch.randn(2, 16, generator=g)
    for target in (ClassScore(4), Similarity(ref), Similarity(ref, "neg_l2"), Contrastive(ref, non),
                   Contrastive(ref, non, "neg_l2")):
        assert torch.allclose(output_relevance(target, out).sum(1), target(out), atol=1e-5), target.describe()
    logit_split = output_relevance(ClassScore(4), out)
    assert torch.equal(logit_split[:, 4], out[:, 4]) and logit_split[:, :4].abs().sum() == 0


def test_self_similarity_keeps_its_relevance() -> None:
    """``out ⊙ ∇cos`` is identically zero at the reference; holding the norm fixed gives the cosine (1)."""
    out = torch.randn(1, 16, generator=torch.Generator().manual_seed(1))
    target = Similarity(out[0])
    probe = out.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(target(probe).sum(), probe)
    assert (out * grad).abs().max() < 1e-6
    split = output_relevance(target, out)
    assert float(split.sum()) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(split, out.square() / out.square().sum())


def _zennit_lrp(net: nn.Module, x: torch.Tensor, canonizers: list[Canonizer], index: int = 7) -> torch.Tensor:
    comp = make_composite("epsilon-plus-flat", net, x, canonizers=canonizers)
    with Gradient(model=net, composite=comp) as attributor:
        _, rel = attributor(x, lambda out: out * F.one_hot(torch.tensor([index]), out.shape[1]))
    return rel


def test_resnet_canonization_matters_and_matches_zennits_resnet_canonizer() -> None:
    model = load_model("torchvision:resnet18", weights=None)
    reference = load_model("torchvision:resnet18", weights=None, fresh=True)  # private: zennit hooks it
    x = _input(0, 96)
    with torch.no_grad():  # the top class: a fixed class of a random network can score near 0, where the
        target = ClassScore(int(model.net(x).argmax()))  # bias's share of the relevance is no longer small
    ours, r_out = relevance(model.net, x, target)
    raw, _ = relevance(reference.net, x, target, canonize=False)
    # zennit's ResNetCanonizer, block by block, with our exact batch-norm merge: the same computation
    blocks = [ExactMergeBatchNorm(), ResNetBasicBlockCanonizer(), ResNetBottleneckCanonizer()]
    zennit_exact = _zennit_lrp(reference.net, x, blocks, target.index)
    assert torch.allclose(ours, zennit_exact, rtol=1e-4, atol=1e-6 * float(zennit_exact.abs().max()))
    # zennit's own merge leaves √(1 + 1e-5) in each folded batch norm (see ExactMergeBatchNorm)
    zennit_own = _zennit_lrp(reference.net, x, [ResNetCanonizer()], target.index)
    assert float((ours - zennit_own).norm() / zennit_own.norm()) < 0.01
    assert not torch.allclose(ours, raw, rtol=0.1)
    total = float(r_out.sum())
    gap_canonized = abs(float(ours.sum()) - total)
    gap_raw = abs(float(raw.sum()) - total)
    assert gap_canonized < 0.1 * abs(total)  # only the classifier's bias absorbs some
    assert gap_raw > 10 * gap_canonized  # uncanonized, every residual sum counts its relevance twice


class FlippedNorm(nn.Module):
    """A batch norm registered right after a convolution but fed its channels reversed."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        with torch.no_grad():
            self.norm.running_mean.copy_(torch.randn(4, generator=g))
            self.norm.running_var.copy_(torch.rand(4, generator=g) + 0.1)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.norm(torch.flip(self.conv(x), dims=[1]))))


def test_batch_norms_are_folded_only_where_that_keeps_the_function() -> None:
    net = FlippedNorm()
    x = _input(0, 16)
    with torch.no_grad():
        expected = net(x)
    (merge,) = SequentialMergeBatchNorm().apply(net)  # zennit pairs by registration order...
    with torch.no_grad():
        assert not torch.allclose(net(x), expected, atol=1e-3)  # ...and changes the network
    merge.remove()
    assert foldable_batch_norms(net, x) == frozenset()
    rel, r_out = relevance(net, x, ClassScore(1))
    assert float(r_out.sum()) == pytest.approx(float(expected[0, 1]), rel=1e-5)
    assert torch.isfinite(rel).all()
    model = load_model("dlib-resnet")  # every conv → affine pair of the dlib port is foldable
    n_affine = sum(isinstance(m, nn.BatchNorm2d) for m in model.net.modules())
    assert n_affine > 0 and len(foldable_batch_norms(canonical_copy(model.net), torch.rand(1, 3, 150, 150))) == n_affine


def test_box_bounds_are_black_and_white_after_the_network_normalization() -> None:
    model = load_model("dlib-resnet")
    low, high = first_layer_bounds(model.net, torch.rand(1, 3, 150, 150))
    norm = model.net.normalize
    assert torch.allclose(low[0, :, 0, 0], (0.0 - norm.mean.flatten()) / norm.scale.flatten())
    assert torch.allclose(high[0, :, 0, 0], (255.0 - norm.mean.flatten()) / norm.scale.flatten())


def test_bad_settings_are_refused() -> None:
    model = FaceModel(name="tiny", task="classification", net=BiasFree(), input_size=(16, 16),
                      recipe=AlignRecipe(size=16, method="none"), class_names=["a", "b", "c"])
    with pytest.raises(ModelError, match="composite"):
        LRP(model, composite="alpha1-beta0")
    with pytest.raises(ModelError, match="epsilon"):
        LRP(model, epsilon=0)


@functools.cache
def _zoo_case(name: str, photos: Path) -> tuple[FaceModel, torch.Tensor, torch.Tensor]:
    model = load_model(name)
    x = model.to_tensor([model.chip(photos / p) for p in PHOTOS])
    return model, x[:1], x[1:]


@pytest.mark.parametrize("model_name", ["dlib-resnet", "dlib-age", "dlib-gender", "fer-emotion"])
def test_finite_maps_on_the_zoo_and_the_model_is_left_alone(shared_faces: Path, model_name: str) -> None:
    model, x, other = _zoo_case(model_name, shared_faces)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    with torch.no_grad():
        out, ref = model.net(x)[0], model.net(other)[0]
    if model.task == "classification":
        targets: list[Target] = [ClassScore(int(out.argmax()))]
    else:
        targets = [Similarity(ref), resolve_target(model, model.chip(shared_faces / PHOTOS[0]))]
    for target in targets:
        method = LRP(model)
        saliency = method.attribute(x, target)
        assert saliency.shape == (1, *model.input_size) and torch.isfinite(saliency).all()
        assert float(saliency.abs().sum()) > 0
        assert method.extras["output_relevance"] == pytest.approx(float(target(out)), rel=1e-4)
    after = model.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) for m in model.net.modules())
