"""The canonical form for hook-based methods: same function, no reuse, no in-place, explicit sums."""

from __future__ import annotations

import pytest
import torch
from captum.attr import DeepLift, GuidedBackprop
from torch import nn

from facelens.errors import ModelError
from facelens.explain.canonize import AddCanonizer, audit, canonical_copy, canonical_notes, hookable
from facelens.explain.gradients import DeepLiftMethod, GuidedBackpropMethod
from facelens.faces.align import AlignRecipe
from facelens.models import FaceModel, load_model
from facelens.models.layers import Add, PadAdd
from facelens.targets import ClassScore

pytestmark = pytest.mark.filterwarnings("ignore:Setting .* hooks:UserWarning")


class TwiceReLUBlock(nn.Module):
    """The hard case in miniature: one in-place ReLU called twice and an in-place residual sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        out += x
        out = self.relu(out)
        return self.head(out)


class HandWrittenCanonical(nn.Module):
    """The same network written canonically by hand: the independent reference for captum's results."""

    def __init__(self, block: TwiceReLUBlock) -> None:
        super().__init__()
        self.conv1, self.conv2, self.head = block.conv1, block.conv2, block.head
        self.relu1, self.relu2, self.add = nn.ReLU(), nn.ReLU(), Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu2(self.add(self.conv2(self.relu1(self.conv1(x))), x)))


class HiddenSum(nn.Module):
    """A residual sum behind data-dependent control flow, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(x))
        if float(y.detach().mean()) > -1.0:  # always true, but only known at run time
            y = y + x
        return self.head(y)


def _block(seed: int = 0) -> TwiceReLUBlock:
    torch.manual_seed(seed)
    return TwiceReLUBlock().eval()


def _model(net: nn.Module, size: int = 16) -> FaceModel:
    return FaceModel(name="tiny", task="classification", net=net, input_size=(size, size),
                     recipe=AlignRecipe(size=size, method="none"), class_names=["a", "b"])


def _snapshot(net: nn.Module) -> dict[str, object]:
    return {
        "state": {k: v.clone() for k, v in net.state_dict().items()},
        "modules": [(n, type(m).__name__) for n, m in net.named_modules()],
        "inplace": [getattr(m, "inplace", None) for m in net.modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in net.modules()),
    }


def _same(a: dict[str, object], b: dict[str, object]) -> bool:
    sa, sb = a["state"], b["state"]
    assert isinstance(sa, dict) and isinstance(sb, dict)
    tensors_equal = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    return tensors_equal and all(a[k] == b[k] for k in ("modules", "inplace", "hooks"))


def test_canonical_copy_computes_the_same_function_without_reuse_or_inplace() -> None:
    net = _block()
    x = torch.rand(2, 3, 16, 16)
    before = _snapshot(net)
    expected = net(x.clone()).detach()
    copy = canonical_copy(net)
    assert copy is not net
    assert torch.allclose(copy(x.clone()), expected, atol=1e-6)
    kinds = {p.kind for p in audit(net, x)}
    assert {"reuse", "sum", "inplace"} <= kinds  # the audit sees what is wrong with the original...
    assert audit(copy, x) == []  # ...and nothing in the copy
    relus = [m for m in copy.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 2 and relus[0] is not relus[1] and not any(r.inplace for r in relus)
    assert sum(isinstance(m, Add) for m in copy.modules()) == 1
    assert _same(before, _snapshot(net))  # the original is untouched


def test_captum_deeplift_and_guided_backprop_match_a_hand_written_canonical_network() -> None:
    net = _block(0)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    reference = HandWrittenCanonical(net).eval()
    with pytest.raises(RuntimeError):  # captum refuses the original network outright
        DeepLift(net).attribute(x.clone().requires_grad_(), target=0)
    gbp_reference = GuidedBackprop(reference).attribute(x.clone().requires_grad_(), target=0)
    assert gbp_reference.abs().sum() > 0

    model = _model(net)
    before = _snapshot(net)
    target = ClassScore(0)
    ours_gbp = GuidedBackpropMethod(model).attribute(x, target)[0]
    ours_dl = DeepLiftMethod(model).attribute(x, target)[0]
    ref_dl = DeepLift(reference).attribute(x.clone().requires_grad_(), baselines=torch.zeros_like(x), target=0)
    assert torch.allclose(ours_gbp, gbp_reference.abs().amax(1)[0], atol=1e-6)
    assert torch.allclose(ours_dl, ref_dl.detach().sum(1)[0], atol=1e-6)
    assert _same(before, _snapshot(net))
    assert torch.allclose(net(x.clone()), reference(x.clone()))


def test_copy_is_cached_and_follows_in_place_weight_edits() -> None:
    net = _block(2)
    x = torch.rand(1, 3, 16, 16)
    copy = canonical_copy(net)
    assert canonical_copy(net) is copy
    with torch.no_grad():
        net.conv1.weight.mul_(-2.0)  # e.g. a randomization sanity check editing weights in place
    assert canonical_copy(net) is copy
    assert torch.allclose(copy(x.clone()), net(x.clone()), atol=1e-6)
    net.conv2.weight = nn.Parameter(torch.randn_like(net.conv2.weight))  # a new tensor: rebuild
    rebuilt = canonical_copy(net)
    assert rebuilt is not copy
    assert torch.allclose(rebuilt(x.clone()), net(x.clone()), atol=1e-6)


def test_a_sum_torch_fx_cannot_reach_is_refused_with_the_method_and_reason() -> None:
    net = HiddenSum().eval()
    x = torch.rand(1, 3, 16, 16)
    assert any("<root>" in note for note in canonical_notes(net))
    with pytest.raises(ModelError, match=r"lrp: .*adds two activations"), hookable(net, x, "lrp", ("sum",)):
        pass
    # a method that does not care about sums still gets the copy
    with hookable(net, x, "guided-backprop", ("reuse", "nonlinearity", "inplace")) as copy:
        assert torch.allclose(copy(x), net(x))


def test_torchvision_resnet_blocks_are_rewritten() -> None:
    model = load_model("torchvision:resnet18", weights=None)
    x = torch.rand(1, 3, 64, 64)
    copy = canonical_copy(model.net)
    with torch.no_grad():
        assert torch.allclose(copy(x), model.net(x), atol=1e-5)
    kinds = {p.kind for p in audit(model.net, x)}
    assert {"reuse", "sum"} <= kinds
    assert audit(copy, x) == []
    block = copy.get_submodule("model.layer1.0")
    assert sum(isinstance(m, Add) for m in block.children()) == 1
    assert sum(isinstance(m, nn.ReLU) for m in block.children()) == 2


def test_add_canonizer_splits_a_padding_add_and_restores_it() -> None:
    add = PadAdd()
    a, b = torch.rand(1, 4, 3, 3), torch.rand(1, 2, 4, 4)  # dlib pads channels, rows and columns
    expected = add(a, b)
    instances = AddCanonizer().apply(nn.Sequential(add))
    assert len(instances) == 1 and hasattr(add, "canonizer_sum")
    assert torch.allclose(add(a, b), expected)
    for inst in instances:
        inst.remove()
    assert "forward" not in vars(add) and not hasattr(add, "canonizer_sum")
    assert torch.equal(add(a, b), expected)


def test_add_canonizer_refuses_an_add_that_is_not_a_sum() -> None:
    class Product(Add):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a * b

    prod = Product()
    (inst,) = AddCanonizer().apply(nn.Sequential(prod))
    try:
        with pytest.raises(ModelError, match="not a sum"):
            prod(torch.rand(2, 2) + 1, torch.rand(2, 2) + 1)
    finally:
        inst.remove()
