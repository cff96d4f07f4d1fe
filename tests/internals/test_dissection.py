"""Unit–region alignment finds a planted eye detector, and streams real photos through map_rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from facelens.datasets import ManifestRow, read_manifest
from facelens.errors import FaceLensError
from facelens.internals.dissection import UnitRegionIoU, dissect, dissect_manifest, layer_maps, unit_thresholds

REGIONS = ["eyes", "nose", "mouth"]


def _synthetic_faces(n: int = 16, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Dim noise images with bright eyes, a mid-grey nose and a dark mouth at jittered places, and their masks."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.2, 0.45, size=(n, 3, size, size)).astype(np.float32)
    masks = np.zeros((n, 3, size, size), bool)
    for i in range(n):
        dy, dx = rng.integers(-2, 3, size=2)
        for x0 in (6, 20):
            masks[i, 0, 9 + dy:13 + dy, x0 + dx:x0 + 6 + dx] = True
        masks[i, 1, 14 + dy:20 + dy, 14 + dx:18 + dx] = True
        masks[i, 2, 23 + dy:26 + dy, 11 + dx:21 + dx] = True
    images[:, :, :, :][np.repeat(masks[:, 0:1], 3, axis=1)] = 1.0
    images[np.repeat(masks[:, 2:3], 3, axis=1)] = 0.05
    return torch.from_numpy(images), masks


def _planted_net() -> nn.Sequential:
    """Unit 0 fires on bright pixels (the eyes); unit 1 has random weights; unit 2 is the same everywhere."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, :, 1, 1] = 1.0
        conv.bias[0] = -2.0
        conv.weight[1].normal_(0, 0.3)
        conv.bias[1] = 0.0
        conv.bias[2] = 0.5
    return nn.Sequential(conv, nn.ReLU())


def test_dissection_finds_the_planted_eye_detector():
    images, masks = _synthetic_faces()
    net = _planted_net()
    maps = layer_maps(net, {"relu": net[1]}, images)["relu"]
    assert maps.shape == (16, 3, 16, 16)
    ld = dissect(maps, masks, REGIONS, layer="relu", top=0.05, iou_threshold=0.2)
    eyes = [k for k, _ in ld.detectors("eyes")]
    assert eyes == [0]
    assert ld.iou[0, 0] > 0.4
    assert ld.iou[0, 0] > 5 * ld.shuffled_iou[0, 0]
    assert ld.detectors("nose") == [] and ld.detectors("mouth") == []
    assert ld.best_region(0)[0] == "eyes"


def test_streaming_iou_equals_one_batch():
    images, masks = _synthetic_faces(n=10, seed=1)
    net = _planted_net()
    maps = layer_maps(net, {"relu": net[1]}, images)["relu"]
    thr = unit_thresholds(maps, 0.1)
    one = UnitRegionIoU(thr, REGIONS)
    one.update(maps, masks)
    parts = UnitRegionIoU(thr, REGIONS)
    for i in range(0, 10, 3):
        parts.update(maps[i:i + 3], masks[i:i + 3])
    np.testing.assert_allclose(one.compute()[0], parts.compute()[0])
    # A hand-computed IoU for unit 0 and the eyes.
    up = torch.nn.functional.interpolate(maps, size=(32, 32), mode="bilinear", align_corners=False)
    fired = (up[:, 0] > float(thr[0])).numpy()
    manual = (fired & masks[:, 0]).sum() / (fired | masks[:, 0]).sum()
    assert one.compute()[0][0, 0] == pytest.approx(manual)


def test_bad_inputs_raise():
    with pytest.raises(FaceLensError, match="top"):
        unit_thresholds(np.zeros((1, 2, 3, 3)), 1.5)
    with pytest.raises(FaceLensError, match="masks"):
        dissect(np.zeros((2, 2, 4, 4)), np.zeros((3, 3, 8, 8), bool), REGIONS)


def test_dissect_manifest_streams_real_photos(shared_faces, tmp_path):
    rows = read_manifest(shared_faces / "manifest.csv", datasets=["utkface"])[:5]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"no image here")
    res = dissect_manifest([*rows, ManifestRow(path=bad)], "dlib-gender", layers=["early", "mid"], batch_size=4)
    assert res.rows_in == 6 and len(res.failures) == 1 and "bad.jpg" in res.failures[0]["path"]
    ld = res.layers["mid"]
    assert ld.photos == 5 and ld.iou.shape == (64, 9)
    assert ((ld.iou >= 0) & (ld.iou <= 1)).all()
    # On real faces the best-aligned unit beats every spatially shuffled unit for the eyes.
    j = ld.regions.index("eyes")
    assert ld.iou[:, j].max() > ld.baseline["eyes"]
    assert "<figure>" in res.html()
