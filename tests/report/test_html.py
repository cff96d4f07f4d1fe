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
    assert 'src="data:image/png;base64,' in H.figure(fig, "a line")


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
