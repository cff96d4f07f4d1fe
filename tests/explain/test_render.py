"""Rendering: overlays blend into the photo, grids show what a match was explained against."""

from __future__ import annotations

import numpy as np

from facelens.explain.render import overlay


def test_photo_overlay_fades_at_the_chip_edge_and_leaves_the_rest_untouched():
    image = np.full((200, 200, 3), 128, np.uint8)
    saliency = np.ones((200, 200), np.float32)
    saliency[0, 0] = 0.0  # a range to normalize over
    region = np.zeros((200, 200), bool)
    region[50:150, 50:150] = True
    out = overlay(image, saliency, region=region).astype(int)
    change = np.abs(out - 128).sum(-1)
    assert (change[~region] == 0).all()  # outside the chip: the photo as it was
    centre, edge = change[100, 100], change[100, 50]
    assert centre > 0 and edge < 0.6 * centre  # the square's edge fades in instead of starting at full strength


def test_low_saliency_leaves_the_photo_visible_on_the_photo_view():
    image = np.full((100, 100, 3), 128, np.uint8)
    saliency = np.zeros((100, 100), np.float32)
    saliency[40:60, 40:60] = 1.0
    region = np.ones((100, 100), bool)
    out = overlay(image, saliency, region=region).astype(int)
    assert np.abs(out[5, 5] - 128).sum() <= 3 and np.abs(out[50, 50] - 128).sum() > 50


def test_grid_with_a_reference_has_its_panel(monkeypatch):
    from facelens.explain import render

    shapes = []
    real = render.new_figure

    def spy(rows, cols, **kw):
        shapes.append((rows, cols))
        return real(rows, cols, **kw)

    monkeypatch.setattr(render, "new_figure", spy)

    class Fake:
        method, seconds, signed = "gradient", 0.01, False
        chip_map = np.random.default_rng(0).random((32, 32)).astype(np.float32)

        class chip:  # stands in for a Chip
            image = np.full((32, 32, 3), 90, np.uint8)

    without = render.figure_grid([Fake()])
    with_ref = render.figure_grid([Fake()], reference=np.zeros((32, 32, 3), np.uint8))
    assert shapes == [(1, 2), (1, 3)]
    assert with_ref.shape[1] > without.shape[1]
