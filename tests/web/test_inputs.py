"""The app's own upload checks and session clean-up, without a browser."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facelens.errors import ImageError
from facelens.web.app import SessionFiles
from facelens.web.inputs import UploadError, read_photo


def _png(path: Path, shape: tuple[int, int] = (40, 30)) -> np.ndarray:
    rgb = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def test_read_photo_decodes_like_the_api_and_names_the_original_file(tmp_path: Path) -> None:
    rgb = _png(tmp_path / "a1b2c3.png")
    payload = {"path": str(tmp_path / "a1b2c3.png"), "orig_name": "me.png"}
    np.testing.assert_array_equal(read_photo(payload, 10**6), rgb)

    (tmp_path / "x").write_bytes(b"definitely not an image")
    with pytest.raises(ImageError, match=r"^holiday\.jpg: not an image file"):
        read_photo({"path": str(tmp_path / "x"), "orig_name": "holiday.jpg"}, 10**6)


def test_read_photo_enforces_the_size_limit_in_words(tmp_path: Path) -> None:
    _png(tmp_path / "big.png", (200, 200))
    size = (tmp_path / "big.png").stat().st_size
    with pytest.raises(UploadError, match=r"big\.png is .* MB, larger than this server's upload limit"):
        read_photo({"path": str(tmp_path / "big.png"), "orig_name": "big.png"}, size - 1)
    assert read_photo({"path": str(tmp_path / "big.png")}, size).shape == (200, 200, 3)


def test_read_photo_accepts_data_urls_and_says_when_nothing_was_sent(tmp_path: Path) -> None:
    buf = io.BytesIO()
    rgb = np.full((8, 6, 3), 77, np.uint8)
    Image.fromarray(rgb).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    np.testing.assert_array_equal(read_photo({"url": url, "path": None}, 10**6), rgb)
    with pytest.raises(UploadError, match="no photo"):
        read_photo(None, 10**6)
    with pytest.raises(UploadError, match="gone"):
        read_photo({"path": str(tmp_path / "deleted.png"), "orig_name": "deleted.png"}, 10**6)


def test_session_files_delete_only_inside_the_upload_dir(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    (root / "hash1").mkdir(parents=True)
    inside = root / "hash1" / "face.jpg"
    inside.write_bytes(b"x")
    outside = tmp_path / "mine.jpg"
    outside.write_bytes(b"y")
    files = SessionFiles(root)
    files.add([{"path": str(inside)}, str(outside), None])
    files.delete()
    assert not inside.exists() and not (root / "hash1").exists()
    assert outside.exists()

    kept = root / "k.jpg"
    kept.write_bytes(b"z")
    keeper = SessionFiles(root, keep=True)
    keeper.add([str(kept)])
    keeper.delete()
    assert kept.exists()
