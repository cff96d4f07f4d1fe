"""Control maps: seeded per photo, model-free, the same whatever the batching."""

from __future__ import annotations

import doctest

import numpy as np

from facelens.evaluate import controls


def test_doctest() -> None:
    assert doctest.testmod(controls).failed == 0


def test_random_map_is_seeded_by_photo_and_smooth() -> None:
    a = controls.random_map((150, 150), 0, "a.jpg")
    assert np.array_equal(a, controls.random_map((150, 150), 0, "a.jpg"))  # same photo, same map
    assert not np.array_equal(a, controls.random_map((150, 150), 0, "b.jpg"))
    assert not np.array_equal(a, controls.random_map((150, 150), 1, "a.jpg"))
    # a 7×7 grid upsampled: neighbouring pixels differ by far less than independent noise would
    assert np.abs(np.diff(a, axis=1)).mean() < 0.02 and a.min() >= 0.0 and a.max() <= 1.0


def test_edges_sit_on_edges_and_centre_on_the_centre() -> None:
    chip = np.zeros((40, 40, 3), np.uint8)
    chip[:, 20:] = 255  # one vertical edge at x = 20
    m = controls.control_maps(chip, "x", seed=0)
    assert abs(int(np.argmax(m["edges"].mean(0))) - 19.5) <= 1.5
    assert np.unravel_index(int(np.argmax(m["centre"])), (40, 40)) in {(19, 19), (19, 20), (20, 19), (20, 20)}
    assert all(v.shape == (40, 40) and v.dtype == np.float32 for v in m.values())
