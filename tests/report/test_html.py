"""HTML fragments: self-contained, escaped, and numbers formatted for people."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from facelens.report import html as H

URL = re.compile(r"""(?:src|href)\s*=\s*["']?(?!data:|#)[a-z]+:""", re.I)


def test_figure_embeds_the_png_and_needs_no_other_file():
    rgb = np.zeros((8, 12, 3), np.uint8)
    rgb[2:5, 3:9] = (255, 0, 0)
    frag = H.figure(rgb, "a red box <b>")
    src = re.search(r'src="data:image/png;base64,([^"]+)"', frag).group(1)
    back = np.asarray(Image.open(io.BytesIO(base64.b64decode(src))).convert("RGB"))
    assert np.array_equal(back, rgb)
    assert "&lt;b&gt;" in frag and "<b>" not in frag


def test_figure_accepts_a_matplotlib_figure():
    from facelens.explain.render import new_figure

    fig, ax = new_figure(figsize=(2, 1))
    ax.plot([0, 1], [0, 1])
    assert 'src="data:image/png;base64,' in H.figure(fig, "a line")  # line art stays lossless


def test_photo_like_images_are_webp_and_look_the_same():
    rng = np.random.default_rng(0)
    smooth = (np.stack(np.meshgrid(np.linspace(0, 255, 200), np.linspace(0, 255, 150)), -1).sum(-1) / 2)
    tint = np.array([1.0, 0.8, 0.6])  # a colour gradient with grain, as a photo has (grain shared by the channels)
    photo = np.clip(smooth[..., None] * tint + rng.normal(0, 8, (150, 200, 1)), 0, 255).astype(np.uint8)
    mime, data = H.image_bytes(photo)
    assert mime == "image/webp" and len(data) < 0.6 * len(H.png_bytes(photo))
    back = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(float)
    assert np.abs(back - photo).mean() < 4  # lossy, yet well within the grain the photo already has
    assert H.img_src(photo).startswith("data:image/webp;base64,")


def test_table_formats_numbers_and_escapes_text():
    frag = H.table([{"name": "<x>", "rate": 0.12345, "n": 1200, "bad": float("nan"), "ok": True, "none": None}],
                   caption="c")
    assert "&lt;x&gt;" in frag and "0.123" in frag and "1,200" in frag and "n/a" in frag and "yes" in frag
    assert H.table([], caption="empty") .startswith('<p class="note">')


def test_page_has_no_external_reference():
    page = H.page("t", [H.section("s", H.figure(np.zeros((4, 4, 3), np.uint8), "black"), how="by eye")])
    assert page.startswith("<!DOCTYPE html>") and "How this was measured: by eye" in page
    assert not URL.search(page)


def test_png_bytes_refuses_float_pixels():
    with pytest.raises(ValueError, match="uint8"):
        H.png_bytes(np.zeros((2, 2, 3), np.float32))
