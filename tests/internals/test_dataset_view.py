"""Dataset view: receptive fields with known geometry, exact patch cutting, and correctly ordered patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from facelens import wrap
from facelens.datasets import read_manifest
from facelens.internals.activation_max import layer_outputs
from facelens.internals.dataset_view import dataset_view, patch_from_photo, sample_rows
from facelens.internals.receptive_field import receptive_fields
from facelens.models import load_model


def conv_net(pool: bool):
    """conv 3×3 (pad 1) → ReLU → [max-pool 2] → conv 3×3 stride 2 (pad 1) → ReLU."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(4, 2)]
    last = "model.3" if not pool else "model.4"
    return wrap(nn.Sequential(*layers), task="classification", input_size=(32, 32), class_names=["a", "b"],
                align=None, layers={"late": last})


@pytest.mark.parametrize("pool", [False, True])
def test_receptive_fields_match_layer_arithmetic(pool: bool) -> None:
    model = conv_net(pool)
    positions = [(0, 0), (3, 4), (7, 2)]
    boxes = receptive_fields(model, "late", positions)

    def span(i: int) -> tuple[int, int]:
        # conv2 (stride 2, pad 1) reads rows 2i−1 … 2i+1 of its input
        lo, hi = 2 * i - 1, 2 * i + 1
        if pool:  # each max-pool output row r covers input rows 2r … 2r+1
            lo, hi = 2 * lo, 2 * hi + 1
        lo, hi = lo - 1, hi + 1  # conv1 (3×3, pad 1)
        return max(0, lo), min(32, hi + 1)

    for r, c in positions:
        (x0, x1), (y0, y1) = span(c), span(r)
        assert boxes[(r, c)] == (x0, y0, x1, y1), (pool, r, c)


def test_patch_is_cut_exactly_from_the_photo() -> None:
    photo = np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    shift = np.array([[1.0, 0.0, -20.0], [0.0, 1.0, -30.0]])  # chip pixel (x, y) = photo (x + 20, y + 30)
    patch, quad, box = patch_from_photo(photo, shift, (5, 6, 15, 20))
    assert np.array_equal(patch, photo[36:50, 25:35])
    assert box == (25, 36, 35, 50)
    assert np.allclose(quad[0], [24.5, 35.5]) and np.allclose(quad[2], [34.5, 49.5])
    # chip at half the photo's resolution, pixel centres as cv2.resize places them: chip = 0.5·photo − 0.25
    half = np.array([[0.5, 0.0, -0.25], [0.0, 0.5, -0.25]])
    patch, _, box = patch_from_photo(photo, half, (10, 10, 20, 30))
    assert patch.shape == (40, 20, 3)  # cut at the photo's own resolution
    assert box == (20, 20, 40, 60)


@pytest.fixture(scope="module")
def small_manifest(shared_faces, tmp_path_factory):
    rows = [r for r in read_manifest(shared_faces / "manifest.csv") if r.dataset in ("orl", "utkface")]
    rows = sample_rows(rows, 6, seed=3)
    folder = tmp_path_factory.mktemp("dv")
    bad = folder / "broken.jpg"
    bad.write_bytes(b"not an image")
    csv = folder / "manifest.csv"
    csv.write_text("path\n" + "".join(f"{r.path}\n" for r in rows) + f"{bad}\n")
    return csv


def test_top_patches_are_in_activation_order(small_manifest) -> None:
    model = load_model("dlib-gender")
    view = dataset_view(model, "mid", [3, 10], rows=small_manifest, k=3, batch_size=4)
    assert view.rows_in == 7 and view.rows_used == 6
    assert len(view.failures) == 1 and "broken.jpg" in view.failures[0]["path"]
    all_peaks = {}
    for path in {str(r.path) for r in read_manifest(small_manifest)[:6]}:
        chip = model.chip(path)
        with torch.no_grad():
            act = layer_outputs(model, ["mid"], model.to_tensor(chip))["mid"][0]
        all_peaks[path] = act
    for channel, patches in view.patches.items():
        acts = [p.activation for p in patches]
        assert acts == sorted(acts, reverse=True) and len(patches) == 3
        assert acts[0] == pytest.approx(max(float(a[channel].max()) for a in all_peaks.values()), rel=1e-5)
        for p in patches:
            a = all_peaks[p.path][channel]
            assert p.activation == pytest.approx(float(a.max()), rel=1e-5)
            assert float(a[p.position]) == pytest.approx(p.activation, rel=1e-5)
            x0, y0, x1, y1 = p.chip_box
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
            assert p.image.ndim == 3 and p.image.shape[2] == 3 and min(p.image.shape[:2]) > 0
    rgb = view.figure()
    assert rgb.ndim == 3 and rgb.dtype == np.uint8
