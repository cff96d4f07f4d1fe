import numpy as np
import pytest
import torch
from torch import nn

from facelens.evaluate.deletion import DeletionInsertion, auc, normalized_curve, pixel_ranks
from facelens.targets import ClassScore, UserTarget


class RedSum(nn.Module):
    """Output = sum of the red channel: every pixel's contribution is known exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0].sum(dim=(1, 2)).unsqueeze(1)


def _tiny() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0] = torch.tensor([[4.0, 3.0], [2.0, 1.0]])
    return x, x[:, 0].clone()


def test_pixel_ranks_are_stable_and_descending():
    r = pixel_ranks(torch.tensor([[[0.5, 2.0], [0.5, -1.0]]]))
    assert r.tolist() == [[1, 0, 2, 3]]


def test_deletion_and_insertion_match_hand_computed_curves():
    x, saliency = _tiny()
    dele = DeletionInsertion(RedSum(), mode="deletion", baseline="zero", steps=4, batch_size=3)
    curve = dele.update(x, saliency, ClassScore(0))[0]
    assert curve.tolist() == [10.0, 6.0, 3.0, 1.0, 0.0]
    assert dele.compute()["auc_mean"] == pytest.approx(0.25 * (5 + 6 + 3 + 1 + 0))
    ins = DeletionInsertion(RedSum(), mode="insertion", baseline="zero", steps=4)
    assert ins.update(x, saliency, ClassScore(0))[0].tolist() == [0.0, 4.0, 7.0, 9.0, 10.0]
    assert ins.compute()["auc_mean"] == pytest.approx(0.25 * (0 + 4 + 7 + 9 + 5))


def test_inverted_map_deletes_worse_and_batch_and_per_image_targets_agree():
    x, saliency = _tiny()
    good = DeletionInsertion(RedSum(), baseline="zero", steps=4)
    bad = DeletionInsertion(RedSum(), baseline="zero", steps=4)
    good.update(x, saliency, ClassScore(0))
    bad.update(x, -saliency, ClassScore(0))
    assert good.compute()["auc_mean"] < bad.compute()["auc_mean"]
    # two images, one target each, through one engine pass
    both = DeletionInsertion(RedSum(), baseline="zero", steps=4, batch_size=4)
    t = [ClassScore(0), UserTarget(lambda o: 2 * o[:, 0])]
    curves = both.update(torch.cat([x, x]), torch.cat([saliency, saliency]), t)
    assert np.allclose(curves[1], 2 * curves[0])
    assert both.compute()["n"] == 2


def test_streaming_equals_one_batch():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 6, 6)
    maps = torch.rand(4, 6, 6)
    one = DeletionInsertion(RedSum(), steps=6, baseline="mean")
    one.update(x, maps, ClassScore(0))
    stream = DeletionInsertion(RedSum(), steps=6, baseline="mean")
    for i in range(0, 4, 2):
        stream.update(x[i:i + 2], maps[i:i + 2], ClassScore(0))
    assert one.compute()["auc_mean"] == pytest.approx(stream.compute()["auc_mean"])
    stream.reset()
    assert stream.compute()["n"] == 0


def test_auc_of_constant():
    assert auc(np.ones(11)) == pytest.approx(1.0)


def test_normalized_auc_runs_from_floor_to_intact_and_says_when_it_cannot():
    x, saliency = _tiny()
    dele = DeletionInsertion(RedSum(), mode="deletion", baseline="zero", steps=4)
    dele.update(x, saliency, ClassScore(0))
    out = dele.compute()
    # floor 0, intact 10: the normalized curve is the curve / 10
    assert out["auc_normalized_mean"] == pytest.approx(out["auc_mean"] / 10)
    assert out["intact_mean"] == 10.0 and out["floor_mean"] == 0.0
    assert out["curves_outside_range"] == 0 and out["narrow_range"] == 0
    assert normalized_curve(np.array([5.0, 5.0, 4.99]), "deletion") is None  # nothing to divide by
    overshoot = normalized_curve(np.array([0.0, 3.0, 2.0]), "insertion")  # a partial face beats the whole
    assert overshoot is not None and overshoot.max() == pytest.approx(1.5)


def test_headline_auc_has_an_interval_over_photos_and_people():
    torch.manual_seed(1)
    x = torch.rand(10, 3, 6, 6)
    maps = torch.rand(10, 6, 6)
    metric = DeletionInsertion(RedSum(), steps=6, baseline="mean")
    metric.update(x, maps, ClassScore(0), clusters=[f"p{i // 2}" for i in range(10)])
    out = metric.compute()
    lo, hi = out["ci"]
    assert lo < out["auc_mean"] < hi and out["n"] == 10 and out["n_units"] == 5
    assert "bootstrap" in out["interval"]
