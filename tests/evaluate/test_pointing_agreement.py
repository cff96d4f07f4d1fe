import numpy as np
import pytest

from facelens.evaluate.agreement import Agreement, spearman, topk_iou
from facelens.evaluate.pointing import PointingGame, RegionHit, points_mask
from facelens.faces.regions import REGION_NAMES


def test_pointing_game_hits_and_misses_with_tolerance():
    region = np.zeros((20, 20), bool)
    region[5:8, 5:8] = True
    on, near, far = (np.zeros((20, 20)) for _ in range(3))
    on[6, 6] = 1
    near[6, 10] = 1  # 3 px right of the region
    far[18, 18] = 1
    game = PointingGame(tolerance=3)
    labels = np.full((20, 20), REGION_NAMES.index("hair_background"))
    labels[5:8, 5:8] = REGION_NAMES.index("nose")
    assert game.update([on, near, far], [region] * 3, [labels] * 3) == [True, True, False]
    out = game.compute()
    assert out["hit_rate"] == pytest.approx(2 / 3)
    assert out["chance"] == pytest.approx(81 / 400)  # the 3×3 region grown by 3 px: 9×9 of 20×20
    assert out["ci"][0] < 2 / 3 < out["ci"][1]
    assert out["peak_regions"] == {"hair_background": pytest.approx(2 / 3), "nose": pytest.approx(1 / 3)}
    assert "most salient pixel" in out["how_measured"]
    assert PointingGame(tolerance=0).update([near], [region]) == [False]
    none = PointingGame()
    none.update([far] * 5, [region] * 5)
    assert none.compute()["hit_rate"] == 0.0 and none.compute()["ci"][1] > 0.3  # 0 of 5 is not "never"


def test_region_hit_shares():
    region = np.zeros((10, 10), bool)
    region[:5] = True
    m = np.zeros((10, 10))
    m[:5] = 3.0
    m[5:] = 1.0
    hit = RegionHit()
    hit.update([m], [region])
    out = hit.compute()
    assert out["mass_share_mean"] == pytest.approx(0.75) and out["area_share_mean"] == pytest.approx(0.5)


def test_points_mask_discs():
    mask = points_mask((30, 30), np.array([[10, 10], [20, 5]]), 2)
    assert mask[10, 10] and mask[5, 20] and not mask[0, 0]
    assert mask.sum() == 2 * 13  # a radius-2 disc has 13 pixels


def test_agreement_measures():
    rng = np.random.default_rng(1)
    a = rng.random((16, 16))
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert topk_iou(a, a, 0.1) == 1.0 and topk_iou(a, -a, 0.1) == 0.0
    yy, xx = np.mgrid[0:16, 0:16]
    blob = np.exp(-((yy - 5) ** 2 + (xx - 9) ** 2) / 20.0)
    assert spearman(blob, blob[::2, ::2]) > 0.9  # an 8×8 CAM compares with a 16×16 map after resampling
    agg = Agreement(k=0.25)
    agg.update([a, a], [a, -a])
    out = agg.compute()
    assert out["spearman_mean"] == pytest.approx(0.0, abs=1e-9) and out["top25pct_iou_mean"] == pytest.approx(0.5)
