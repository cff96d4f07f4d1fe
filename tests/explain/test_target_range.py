"""The target's range: known answers on a network whose output is a pixel sum."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

from facelens.explain import target_range
from facelens.explain.target_range import TargetRange, mean_range, measure_range
from facelens.targets import ClassScore


class RedSum(nn.Module):
    """Output = sum of the red channel: blurring or mean-filling keeps the sum (up to the blur's edges)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0].sum(dim=(1, 2)).unsqueeze(1)


class RedPeak(nn.Module):
    """Output = the brightest red pixel: removing detail lowers it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0].flatten(1).max(1).values.unsqueeze(1)


def test_doctest() -> None:
    assert doctest.testmod(target_range).failed == 0


def test_levels_are_the_score_on_the_intact_blurred_and_mean_filled_input() -> None:
    x = torch.zeros(2, 3, 32, 32)
    x[0, 0, 10:20, 10:20] = 1.0
    x[1, 0, 5, 5] = 1.0
    sums = measure_range(RedSum(), x, ClassScore(0))
    assert [r.intact for r in sums] == [100.0, 1.0]
    assert [r.deleted_mean for r in sums] == pytest.approx([100.0, 1.0], rel=1e-5)  # the mean keeps the sum
    peaks = measure_range(RedPeak(), x, ClassScore(0))
    assert all(r.intact == 1.0 and r.deleted_blur < 0.7 and r.deleted_mean < 0.1 for r in peaks)
    assert peaks[1].deleted_blur < peaks[0].deleted_blur  # one bright pixel is blurred away more than a square
    assert peaks[0].unit == "logit" and peaks[0].impostor is None and peaks[0].removes_identity is None
    summary = mean_range(peaks)
    assert summary["n"] == 2 and summary["intact"] == 1.0 and summary["impostor_median"] is None


def test_a_matcher_range_says_whether_removing_the_face_removes_the_match() -> None:
    keeps = TargetRange("t", "cohort", "z", intact=5.0, deleted_blur=2.9, deleted_mean=0.1, impostor=-0.1)
    removes = TargetRange("t", "cohort", "z", intact=5.0, deleted_blur=-0.3, deleted_mean=-0.2, impostor=0.0)
    assert keeps.removes_identity is False and removes.removes_identity is True
    assert keeps.deleted == 2.9 and keeps.span == pytest.approx(2.1)
    assert "impostor median -0.1" in keeps.text()
