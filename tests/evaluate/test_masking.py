import numpy as np
import pytest
import torch

from facelens.evaluate.masking import MaskedConfidence, equal_mass
from facelens.targets import ClassScore
from tests.evaluate.test_deletion import RedSum


def test_equal_mass_gives_every_map_the_same_total():
    rng = np.random.default_rng(0)
    for m in (rng.random((20, 20)), rng.random((20, 20)) ** 8, np.arange(400.0).reshape(20, 20)):
        e = equal_mass(m, 0.1)
        assert e.min() >= 0 and e.max() <= 1
        assert e.mean() == pytest.approx(0.1, abs=1e-3)
    # a map whose support is smaller than the mass can only fill its support
    assert equal_mass(np.eye(20), 0.1).mean() == pytest.approx(20 / 400)


def test_average_drop_increase_and_win_by_hand():
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0] = torch.tensor([[4.0, 3.0], [2.0, 1.0]])  # score 10
    focused = np.array([[1.0, 0.0], [0.0, 0.0]])  # all mass on the 4
    wrong = np.array([[0.0, 0.0], [0.0, 1.0]])  # all mass on the 1
    metric = MaskedConfidence(RedSum(), mass=0.25)
    metric.update(x, {"focused": focused[None], "wrong": wrong[None]}, ClassScore(0))
    out = metric.compute()["methods"]
    assert out["focused"]["average_drop_pct"] == pytest.approx(40.0, abs=0.1)  # 10 → 6
    assert out["wrong"]["average_drop_pct"] == pytest.approx(10.0, abs=0.1)  # 10 → 9
    assert out["focused"]["win_pct"] == 100.0 and out["wrong"]["win_pct"] == 0.0
    assert out["focused"]["increase_in_confidence_pct"] == 0.0
