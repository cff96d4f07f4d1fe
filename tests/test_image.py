"""load_image: every odd input is built here in tmp_path; expected pixels come from first principles."""

from __future__ import annotations

import colorsys
import io
import os
import struct
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from facelens.errors import FaceLensError, ImageError
from facelens.image import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, load_image, max_pixels_limit, source_name

RNG_SEED = 20240611


def _rng(salt: int = 0) -> np.random.Generator:
    return np.random.default_rng(RNG_SEED + salt)


def _assert_rgb(out: np.ndarray, height: int, width: int) -> None:
    assert out.dtype == np.uint8
    assert out.shape == (height, width, 3)
    assert out.flags.c_contiguous
    assert out.flags.writeable


def _gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def _over_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Reference compositing in floating point, rounded half up."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.floor(color.astype(np.float64) * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


def _reason(excinfo: pytest.ExceptionInfo[ImageError]) -> str:
    return excinfo.value.reason


# ---------------------------------------------------------------------------------------------------
# arrays


def test_uint8_rgb_array_is_copied_not_aliased() -> None:
    src = _rng().integers(0, 256, (7, 5, 3), dtype=np.uint8)
    out = load_image(src)
    _assert_rgb(out, 7, 5)
    np.testing.assert_array_equal(out, src)
    out[0, 0] = src[0, 0] ^ 0xFF
    assert not np.array_equal(out[0, 0], src[0, 0]), "output must not be a view of the caller's array"


def test_non_contiguous_array_view() -> None:
    src = _rng(1).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    view = src[::2, ::-1]
    out = load_image(view)
    _assert_rgb(out, 3, 8)
    np.testing.assert_array_equal(out, view)


@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 1)])
def test_gray_array_is_replicated(shape: tuple[int, ...]) -> None:
    src = _rng(2).integers(0, 256, shape, dtype=np.uint8)
    out = load_image(src)
    _assert_rgb(out, 6, 4)
    np.testing.assert_array_equal(out, _gray3(src.reshape(6, 4)))


def test_bool_array_is_black_and_white() -> None:
    src = _rng(3).random((5, 5)) > 0.5
    out = load_image(src)
    np.testing.assert_array_equal(out, _gray3(np.where(src, 255, 0).astype(np.uint8)))


def test_uint16_array_keeps_top_byte() -> None:
    src = _rng(4).integers(0, 65536, (4, 6, 3), dtype=np.uint16)
    out = load_image(src)
    np.testing.assert_array_equal(out, (src // 256).astype(np.uint8))


def test_float_arrays_in_unit_and_byte_range() -> None:
    unit = _rng(5).random((4, 4, 3))
    np.testing.assert_array_equal(load_image(unit), np.floor(unit * 255 + 0.5).astype(np.uint8))
    byte_range = unit * 200 + 10  # max > 1: taken as 0..255
    np.testing.assert_array_equal(
        load_image(byte_range.astype(np.float32)), np.rint(byte_range).astype(np.uint8)
    )


def test_small_integer_dtypes_within_byte_range() -> None:
    src = _rng(6).integers(0, 256, (3, 3, 3)).astype(np.int64)
    np.testing.assert_array_equal(load_image(src), src.astype(np.uint8))


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.full((3, 3), 300, dtype=np.int32), "0..255"),
        (np.full((3, 3), -1, dtype=np.int16), "0..255"),
        (np.full((3, 3, 3), 256.0), "expected 0..1 or 0..255"),
        (np.full((3, 3, 3), -0.5), "expected 0..1 or 0..255"),
        (np.array([[0.2, np.nan], [0.1, 0.3]]), "NaN"),
        (np.array([[0.2, np.inf], [0.1, 0.3]]), "NaN or infinite"),
        (np.zeros((3, 3), dtype=np.complex64), "dtype"),
        (np.zeros((3, 32, 32), dtype=np.uint8), "channel-first"),
        (np.zeros((8, 8, 5), dtype=np.uint8), "shape"),
        (np.zeros(12, dtype=np.uint8), "shape"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), "shape"),
        (np.zeros((0, 5, 3), dtype=np.uint8), "5×0 pixels"),
        (np.zeros((4, 0), dtype=np.uint8), "0×4 pixels"),
    ],
)
def test_bad_arrays_raise_image_error(array: np.ndarray, words: str) -> None:
    with pytest.raises(ImageError) as excinfo:
        load_image(array)
    assert words in _reason(excinfo)
    assert excinfo.value.source.startswith("<array")


def test_rgba_and_gray_alpha_arrays_composite_on_white() -> None:
    rgba = _rng(7).integers(0, 256, (6, 6, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    out = load_image(rgba)
    np.testing.assert_array_equal(out, _over_white(rgba[..., :3], rgba[..., 3]))
    assert out[0, 0].tolist() == [255, 255, 255]
    np.testing.assert_array_equal(out[0, 1], rgba[0, 1, :3])
    gray_alpha = rgba[..., [0, 3]]
    np.testing.assert_array_equal(
        load_image(gray_alpha), _gray3(_over_white(rgba[..., :1], rgba[..., 3])[..., 0])
    )


# ---------------------------------------------------------------------------------------------------
# PIL modes saved to files that keep the mode


def _palette_image(indices: np.ndarray, palette: np.ndarray) -> Image.Image:
    img = Image.frombytes("P", (indices.shape[1], indices.shape[0]), indices.astype(np.uint8).tobytes())
    img.putpalette(palette.astype(np.uint8).reshape(-1).tolist())
    return img


def _write(tmp_path: Path, img: Image.Image, fmt: str, name: str, **params: object) -> Path:
    path = tmp_path / f"{name}.{fmt.lower()}"
    img.save(path, format=fmt, **params)
    with Image.open(path) as reopened:
        assert reopened.mode == img.mode, f"{fmt} did not keep mode {img.mode}; the test would not test it"
    return path


H, W = 9, 7


def _case_1(tmp_path: Path) -> tuple[Path, np.ndarray]:
    bits = _rng(10).random((H, W)) > 0.5
    img = Image.fromarray(bits)
    assert img.mode == "1"
    return _write(tmp_path, img, "PNG", "mode1"), _gray3(np.where(bits, 255, 0).astype(np.uint8))


def _case_l(tmp_path: Path) -> tuple[Path, np.ndarray]:
    gray = _rng(11).integers(0, 256, (H, W), dtype=np.uint8)
    return _write(tmp_path, Image.fromarray(gray, "L"), "PNG", "modeL"), _gray3(gray)


def _case_la(tmp_path: Path) -> tuple[Path, np.ndarray]:
    la = _rng(12).integers(0, 256, (H, W, 2), dtype=np.uint8)
    path = _write(tmp_path, Image.fromarray(la, "LA"), "PNG", "modeLA")
    return path, _gray3(_over_white(la[..., :1], la[..., 1])[..., 0])


def _case_p(tmp_path: Path) -> tuple[Path, np.ndarray]:
    palette = _rng(13).integers(0, 256, (256, 3))
    indices = _rng(14).integers(0, 256, (H, W))
    path = _write(tmp_path, _palette_image(indices, palette), "PNG", "modeP")
    return path, palette[indices].astype(np.uint8)


def _case_p_transparent(tmp_path: Path) -> tuple[Path, np.ndarray]:
    palette = _rng(15).integers(0, 256, (256, 3))
    indices = _rng(16).integers(0, 4, (H, W))
    indices[0, 0] = 0
    path = _write(tmp_path, _palette_image(indices, palette), "PNG", "modeP_trns", transparency=0)
    expected = palette[indices].astype(np.uint8)
    expected[indices == 0] = 255  # the transparent colour shows the white background, not its palette colour
    return path, expected


def _case_pa(tmp_path: Path) -> tuple[Path, np.ndarray]:
    palette = _rng(17).integers(0, 256, (256, 3))
    indices = _rng(18).integers(0, 256, (H, W))
    alpha = _rng(19).integers(0, 256, (H, W))
    img = _palette_image(indices, palette).convert("PA")
    img.putalpha(Image.fromarray(alpha.astype(np.uint8), "L"))
    path = _write(tmp_path, img, "TIFF", "modePA")
    return path, _over_white(palette[indices], alpha)


def _case_rgb(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rgb = _rng(20).integers(0, 256, (H, W, 3), dtype=np.uint8)
    return _write(tmp_path, Image.fromarray(rgb, "RGB"), "PNG", "modeRGB"), rgb


def _case_rgba(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rgba = _rng(21).integers(0, 256, (H, W, 4), dtype=np.uint8)
    path = _write(tmp_path, Image.fromarray(rgba, "RGBA"), "PNG", "modeRGBA")
    return path, _over_white(rgba[..., :3], rgba[..., 3])


def _case_rgb_transparent_colour(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rgb = _rng(22).integers(0, 256, (H, W, 3), dtype=np.uint8)
    rgb[2, 3] = (1, 2, 3)
    path = _write(tmp_path, Image.fromarray(rgb, "RGB"), "PNG", "modeRGB_trns", transparency=(1, 2, 3))
    expected = rgb.copy()
    expected[np.all(rgb == (1, 2, 3), axis=-1)] = 255
    return path, expected


def _case_cmyk(tmp_path: Path) -> tuple[Path, np.ndarray]:
    cmyk = _rng(23).integers(0, 256, (H, W, 4), dtype=np.uint8).astype(np.float64)
    path = _write(tmp_path, Image.fromarray(cmyk.astype(np.uint8), "CMYK"), "TIFF", "modeCMYK")
    expected = np.rint((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255)  # naive CMYK, no ICC profile
    return path, expected.astype(np.uint8)


def _case_ycbcr(tmp_path: Path) -> tuple[Image.Image, np.ndarray]:
    """Pillow 12.3 reopens YCbCr TIFFs (and JPEGs) as RGB, so no file keeps the mode: the image is given as is."""
    ycc = _rng(24).integers(0, 256, (H, W, 3), dtype=np.uint8)
    path = Image.fromarray(ycc, "YCbCr")
    assert path.mode == "YCbCr"
    y, cb, cr = (ycc[..., i].astype(np.float64) - (0, 128, 128)[i] for i in range(3))
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)  # JFIF
    return path, np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _case_i16(tmp_path: Path) -> tuple[Path, np.ndarray]:
    values = _rng(25).integers(0, 65536, (H, W), dtype=np.uint16)
    values[0, 0], values[0, 1] = 0, 65535
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    return _write(tmp_path, img, "PNG", "modeI16"), _gray3((values // 256).astype(np.uint8))


def _case_i16b(tmp_path: Path) -> tuple[Path, np.ndarray]:
    values = _rng(26).integers(0, 65536, (H, W), dtype=np.uint16)
    img = Image.frombytes("I;16B", (W, H), values.astype(">u2").tobytes())
    return _write(tmp_path, img, "TIFF", "modeI16B"), _gray3((values // 256).astype(np.uint8))


CASES: dict[str, Callable[[Path], tuple[Path, np.ndarray]]] = {
    "1": _case_1,
    "L": _case_l,
    "LA": _case_la,
    "P": _case_p,
    "P+transparency": _case_p_transparent,
    "PA": _case_pa,
    "RGB": _case_rgb,
    "RGB+transparency": _case_rgb_transparent_colour,
    "RGBA": _case_rgba,
    "CMYK": _case_cmyk,
    "YCbCr": _case_ycbcr,
    "I;16": _case_i16,
    "I;16B": _case_i16b,
}
TOLERANCE = {"YCbCr": 1}  # PIL's fixed-point YCbCr conversion vs the exact JFIF formula


@pytest.mark.parametrize("case", list(CASES))
def test_pil_mode_files_convert_to_rgb(tmp_path: Path, case: str) -> None:
    path, expected = CASES[case](tmp_path)
    out = load_image(path)
    _assert_rgb(out, H, W)
    diff = np.abs(out.astype(int) - expected.astype(int)).max()
    assert diff <= TOLERANCE.get(case, 0), f"{case}: max difference {diff}"


def test_lab_neutral_greys_follow_cie_lightness(tmp_path: Path) -> None:
    lightness = np.array([0.0, 25.0, 50.0, 75.0, 100.0])
    lab = np.zeros((1, lightness.size, 3), dtype=np.uint8)
    lab[0, :, 0] = np.rint(lightness * 255 / 100)  # a* = b* = 0: neutral grey
    path = _write(tmp_path, Image.fromarray(lab, "LAB"), "TIFF", "modeLAB")
    out = load_image(path)[0].astype(np.float64)
    assert np.all(np.abs(out - out[:, :1]) <= 2), "neutral LAB must stay grey"
    # CIE L* -> relative luminance Y -> sRGB transfer curve, written out from the definitions
    stored = lab[0, :, 0].astype(np.float64) * 100 / 255
    luminance = np.where(stored > 8, ((stored + 16) / 116) ** 3, stored / 903.3)
    srgb = np.where(luminance <= 0.0031308, 12.92 * luminance, 1.055 * luminance ** (1 / 2.4) - 0.055) * 255
    np.testing.assert_allclose(out[:, 0], srgb, atol=3)


def test_hsv_pil_image(tmp_path: Path) -> None:
    hsv = _rng(27).integers(0, 256, (H, W, 3), dtype=np.uint8)
    out = load_image(Image.fromarray(hsv, "HSV"))
    expected = np.array(
        [[colorsys.hsv_to_rgb(*(hsv[y, x] / 255.0)) for x in range(W)] for y in range(H)], dtype=np.float64
    )
    assert np.abs(out.astype(float) - expected * 255).max() <= 1.5


@pytest.mark.parametrize(("straight", "premultiplied"), [("RGBA", "RGBa"), ("LA", "La")])
def test_premultiplied_alpha_matches_straight_alpha(straight: str, premultiplied: str) -> None:
    channels = len(straight)
    values = _rng(28).integers(0, 256, (H, W, channels), dtype=np.uint8)
    values[..., -1] = np.maximum(values[..., -1], 40)  # premultiplying very low alpha loses the colour
    img = Image.fromarray(values, straight)
    converted = img.convert(premultiplied)
    assert converted.mode == premultiplied
    diff = np.abs(load_image(converted).astype(int) - load_image(img).astype(int)).max()
    assert diff <= 2


def test_int32_mode_i_rules(tmp_path: Path) -> None:
    byte_values = _rng(29).integers(0, 256, (H, W)).astype(np.int32)
    sixteen_bit = _rng(30).integers(256, 65536, (H, W)).astype(np.int32)
    wide = _rng(31).integers(-70000, 70000, (H, W)).astype(np.int32)
    wide[0, 0], wide[0, 1] = -70000, 70000
    results = []
    for name, values in [("byte", byte_values), ("16bit", sixteen_bit), ("wide", wide)]:
        img = Image.fromarray(values, "I")
        results.append(load_image(_write(tmp_path, img, "TIFF", f"modeI_{name}"))[..., 0])
    np.testing.assert_array_equal(results[0], byte_values)
    np.testing.assert_array_equal(results[1], sixteen_bit >> 8)
    stretched = np.floor((wide + 70000) * 255 / 140000 + 0.5)
    assert np.abs(results[2] - stretched).max() <= 1
    assert results[2][0, 0] == 0 and results[2][0, 1] == 255


def test_float_mode_f_rules(tmp_path: Path) -> None:
    unit = _rng(32).random((H, W)).astype(np.float32)
    byte_range = (unit * 250 + 2).astype(np.float32)
    wide = (unit * 1000 - 500).astype(np.float32)
    outs = [
        load_image(_write(tmp_path, Image.fromarray(values, "F"), "TIFF", f"modeF_{i}"))[..., 0]
        for i, values in enumerate([unit, byte_range, wide])
    ]
    assert np.abs(outs[0] - unit.astype(np.float64) * 255).max() <= 0.5 + 1e-4
    assert np.abs(outs[1] - byte_range.astype(np.float64)).max() <= 0.5 + 1e-4
    lo, hi = float(wide.min()), float(wide.max())
    assert np.abs(outs[2] - (wide.astype(np.float64) - lo) * 255 / (hi - lo)).max() <= 0.5 + 1e-3


def test_float_mode_f_with_nan_is_refused(tmp_path: Path) -> None:
    values = np.full((H, W), 0.5, dtype=np.float32)
    values[3, 3] = np.nan
    path = _write(tmp_path, Image.fromarray(values, "F"), "TIFF", "modeF_nan")
    with pytest.raises(ImageError, match="NaN"):
        load_image(path)


def test_transparent_16bit_grey(tmp_path: Path) -> None:
    values = _rng(33).integers(0, 65536, (H, W), dtype=np.uint16)
    values[1, 1] = 4660
    path = _write(tmp_path, Image.fromarray(values), "PNG", "modeI16_trns", transparency=4660)
    out = load_image(path)
    expected = _gray3((values // 256).astype(np.uint8))
    expected[values == 4660] = 255
    np.testing.assert_array_equal(out, expected)


# ---------------------------------------------------------------------------------------------------
# orientation, animation, CMYK JPEG


def _orientation_reference(stored: np.ndarray, orientation: int) -> np.ndarray:
    """What a viewer shows for each EXIF Orientation value (EXIF 2.3, tag 0x0112)."""
    return {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],  # mirrored left-right
        3: lambda a: a[::-1, ::-1],  # upside down
        4: lambda a: a[::-1, :],  # mirrored top-bottom
        5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
        6: lambda a: np.rot90(a, k=-1),  # needs 90° clockwise
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the anti-diagonal
        8: lambda a: np.rot90(a, k=1),  # needs 90° counter-clockwise
    }[orientation](stored)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    rgb = np.zeros((40, 64, 3), dtype=np.uint8)  # wide, so a rotation shows in the shape
    rgb[:20, :32] = (255, 0, 0)
    rgb[20:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"exif{orientation}.jpg"
    Image.fromarray(rgb).save(path, exif=exif, quality=95)
    with Image.open(path) as raw:
        assert raw.getexif()[0x0112] == orientation
        stored = np.asarray(raw.convert("RGB"))
    out = load_image(path)
    expected = _orientation_reference(stored, orientation)
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)
    if orientation == 6:  # the stored top-left (red) block ends up top-right
        assert out.shape == (64, 40, 3)
        assert out[5, 35, 0] > 200 and out[5, 35, 2] < 60


def test_broken_exif_still_gives_the_pixels(tmp_path: Path) -> None:
    rgb = np.full((8, 8, 3), 120, dtype=np.uint8)
    path = tmp_path / "bad_exif.jpg"
    Image.fromarray(rgb).save(path, exif=b"Exif\x00\x00MM\x00*garbage-garbage-garbage", quality=95)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns about the corrupt EXIF block itself
        out = load_image(path)
    _assert_rgb(out, 8, 8)
    assert np.abs(out.astype(int) - 120).max() <= 2


FRAME_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


@pytest.mark.parametrize(
    ("fmt", "suffix"), [("GIF", "gif"), ("PNG", "png"), ("TIFF", "tif"), ("WEBP", "webp")]
)
def test_first_frame_of_animation_or_multipage(tmp_path: Path, fmt: str, suffix: str) -> None:
    frames = [Image.new("RGB", (10, 6), colour) for colour in FRAME_COLOURS]
    path = tmp_path / f"anim.{suffix}"
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == len(FRAME_COLOURS), "the file must really hold several frames"
    out = load_image(path)
    _assert_rgb(out, 6, 10)
    assert np.all(out == FRAME_COLOURS[0])


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = np.zeros((16, 16, 4), dtype=np.uint8)
    cmyk[..., 1:3] = 255  # magenta + yellow = red
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(cmyk, "CMYK").save(path, quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    out = load_image(path)
    assert np.abs(out.astype(int) - (255, 0, 0)).max() <= 3


def test_sixteen_bit_rgb_png_from_raw_chunks(tmp_path: Path) -> None:
    """A 16-bit RGB PNG written by hand (PIL cannot write one), so the expected bytes are known exactly."""
    values = _rng(34).integers(0, 65536, (5, 4, 3), dtype=np.uint16)
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png(4, 5, bit_depth=16, colour_type=2, idat=zlib.compress(raw)))
    np.testing.assert_array_equal(load_image(path), (values >> 8).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------
# inputs that must fail with a clear reason


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width: int, height: int, *, bit_depth: int = 8, colour_type: int = 0, idat: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _encoded(fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    noise = _rng(35).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "TIFF", "BMP"])
@pytest.mark.parametrize("keep", [0.3, 0.8])
def test_truncated_files_are_errors_not_padded(tmp_path: Path, fmt: str, keep: float) -> None:
    data = _encoded(fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageError) as excinfo:
        load_image(path)
    assert excinfo.value.source == str(path)
    assert _reason(excinfo) == "truncated image data"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_jpeg_missing_only_its_end_marker_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "no_eoi.jpg"
    path.write_bytes(_encoded("JPEG")[:-2])
    with pytest.raises(ImageError, match="truncated image data"):
        load_image(path)


def test_corrupt_image_body(tmp_path: Path) -> None:
    data = bytearray(_encoded("PNG"))
    data[60:400] = bytes(_rng(36).integers(0, 256, 340, dtype=np.uint8))  # header intact, pixels garbage
    path = tmp_path / "garbled.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError) as excinfo:
        load_image(path)
    assert excinfo.value.source == str(path)
    assert "corrupt" in _reason(excinfo) or "truncated" in _reason(excinfo)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.jpg", b"", "empty file (0 bytes)"),
        ("notes.txt", b"this is not a picture\n" * 20, "not an image file (PIL cannot identify it)"),
        ("noise.png", bytes(range(256)) * 8, "not an image file (PIL cannot identify it)"),
        ("zero.png", _png(0, 0), "not an image file (PIL cannot identify it)"),
    ],
)
def test_non_images(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError) as excinfo:
        load_image(path)
    assert excinfo.value.source == str(path)
    assert _reason(excinfo) == reason
    assert str(excinfo.value) == f"{path}: {reason}"


def test_postscript_is_not_run(tmp_path: Path) -> None:
    path = tmp_path / "face.eps"
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with Image.open(path) as img:
        assert img.format == "EPS", "PIL itself would accept this file and hand it to Ghostscript"
    with pytest.raises(ImageError) as excinfo:
        load_image(path)
    assert _reason(excinfo) == "EPS is a vector format and is not read (it needs an outside renderer)"


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as missing:
        load_image(tmp_path / "nope.jpg")
    assert (missing.value.source, missing.value.reason) == (str(tmp_path / "nope.jpg"), "file not found")
    with pytest.raises(ImageError) as directory:
        load_image(tmp_path)
    assert directory.value.reason == "is a directory, not an image file"


def test_zero_size_pil_image() -> None:
    with pytest.raises(ImageError) as excinfo:
        load_image(Image.new("RGB", (0, 0)))
    assert _reason(excinfo) == "image has 0×0 pixels"
    assert excinfo.value.source == "<PIL image>"


def test_unsupported_source_type() -> None:
    with pytest.raises(ImageError) as excinfo:
        load_image(12345)  # type: ignore[arg-type]
    assert excinfo.value.source == "<int>"


# ---------------------------------------------------------------------------------------------------
# decompression bombs


@pytest.fixture
def decode_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every pixel decode PIL starts, to prove a refusal came before decoding."""
    calls: list[str] = []
    original = ImageFile.ImageFile.load

    def spying_load(self: ImageFile.ImageFile) -> object:
        calls.append(self.format or "?")
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spying_load)
    return calls


def test_declared_size_bomb_is_refused_before_decoding(tmp_path: Path, decode_spy: list[str]) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(4000, 30000, idat=zlib.compress(b"\x00" * 4001)))  # claims 120 MP in 100 bytes
    assert path.stat().st_size < 200
    with pytest.raises(ImageError) as excinfo:
        load_image(path)
    assert _reason(excinfo) == (
        "4000×30000 = 120 megapixels exceeds the limit of 50 (set FACELENS_MAX_PIXELS to raise it)"
    )
    assert decode_spy == []


def test_compressible_bomb_is_refused_fast_and_before_decoding(tmp_path: Path, decode_spy: list[str]) -> None:
    path = tmp_path / "black.png"
    Image.new("1", (8000, 8000)).save(path)  # 64 MP, about 8 kB on disk, 192 MB once decoded to RGB
    assert path.stat().st_size < 100_000
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"8000×8000 = 64 megapixels exceeds the limit of 50"):
        load_image(path)
    assert time.perf_counter() - start < 0.5
    assert decode_spy == []
    small = tmp_path / "small.png"
    Image.new("1", (80, 80)).save(small)
    load_image(small)
    assert "PNG" in decode_spy, "the spy must see the decode of an accepted image, or it proves nothing"


def test_limit_from_argument_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "small.png"
    Image.new("RGB", (100, 50), (9, 8, 7)).save(path)
    assert load_image(path, max_pixels=5000).shape == (50, 100, 3)  # exactly at the limit
    with pytest.raises(ImageError, match=r"100×50 = 0.005 megapixels exceeds the limit of 0.004999 \(pass"):
        load_image(path, max_pixels=4999)
    monkeypatch.setenv(MAX_PIXELS_ENV, "4999")
    assert max_pixels_limit() == 4999
    with pytest.raises(ImageError, match=r"set FACELENS_MAX_PIXELS to raise it"):
        load_image(path)
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(np.zeros((50, 100, 3), dtype=np.uint8))  # arrays obey the same limit
    assert load_image(path, max_pixels=5000).shape == (50, 100, 3)  # the argument wins over the variable
    monkeypatch.setenv(MAX_PIXELS_ENV, "2e4")
    assert load_image(path).shape == (50, 100, 3)
    monkeypatch.delenv(MAX_PIXELS_ENV)
    assert max_pixels_limit() == DEFAULT_MAX_PIXELS


@pytest.mark.parametrize("setting", ["lots", "-5", "0", "1.5"])
def test_bad_limit_setting_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    monkeypatch.setenv(MAX_PIXELS_ENV, setting)
    with pytest.raises(FaceLensError, match=MAX_PIXELS_ENV) as excinfo:
        load_image(np.zeros((2, 2), dtype=np.uint8))
    assert not isinstance(excinfo.value, ImageError)


def test_pil_bomb_warning_and_error_become_image_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "medium.png"
    Image.new("L", (60, 50)).save(path)  # 3000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # PIL warns above 2000 and refuses above 4000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError) as warned:
            load_image(path, max_pixels=10**6)
    assert _reason(warned).startswith(
        "60×50 = 0.003 megapixels exceeds PIL's decompression-bomb limit of 0.002"
    )
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError) as refused:
        load_image(path, max_pixels=10**6)
    assert "PIL's decompression-bomb limit" in _reason(refused)
    with pytest.raises(ImageError, match=r"0.003 megapixels exceeds the limit of 0.0025"):
        load_image(path, max_pixels=2500)


def test_pil_global_settings_are_left_alone(tmp_path: Path) -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(4000, 30000))
    with pytest.raises(ImageError):
        load_image(path, max_pixels=10**9)
    load_image(np.zeros((3, 3), dtype=np.uint8), max_pixels=9)
    assert before == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)


def test_other_warnings_pass_through(tmp_path: Path) -> None:
    path = tmp_path / "bad_exif.jpg"
    Image.new("RGB", (4, 4)).save(path, exif=b"Exif\x00\x00MM\x00*garbage-garbage-garbage")
    with pytest.warns(UserWarning, match="EXIF"):
        load_image(path)


# ---------------------------------------------------------------------------------------------------
# bytes, PIL images, names


def test_bytes_path_and_pil_inputs_agree(tmp_path: Path) -> None:
    data = _encoded("PNG", (20, 10))
    path = tmp_path / "same.png"
    path.write_bytes(data)
    from_path = load_image(path)
    np.testing.assert_array_equal(load_image(data), from_path)
    np.testing.assert_array_equal(load_image(bytearray(data)), from_path)
    np.testing.assert_array_equal(load_image(str(path)), from_path)
    with Image.open(path) as img:
        np.testing.assert_array_equal(load_image(img), from_path)
        assert img.mode == "RGB" and img.size == (20, 10)  # the caller's image is not changed


def test_bytes_errors_are_named(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as empty:
        load_image(b"")
    assert str(empty.value) == "<bytes>: empty file (0 bytes)"
    with pytest.raises(ImageError) as truncated:
        load_image(_encoded("JPEG")[:300], name="upload-17.jpg")
    assert str(truncated.value) == "upload-17.jpg: truncated image data"


def test_lazily_opened_truncated_pil_image(tmp_path: Path) -> None:
    data = _encoded("JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) * 3 // 4])  # header intact, so PIL opens it lazily
    with Image.open(path) as img, pytest.raises(ImageError, match="truncated image data"):
        load_image(img)


def test_source_names(tmp_path: Path) -> None:
    assert source_name(tmp_path / "a.jpg") == str(tmp_path / "a.jpg")
    assert source_name("rel/b.png") == "rel/b.png"
    assert source_name(b"\x89PNG") == "<bytes>"
    assert source_name(np.zeros((12, 34, 3))) == "<array 12x34>"
    assert source_name(Image.new("L", (3, 3))) == "<PIL image>"


# ---------------------------------------------------------------------------------------------------
# a real photo


def test_real_photos_match_pil(shared_faces: Path, manifest_rows: list[dict[str, str]]) -> None:
    picked = {}
    for row in manifest_rows:
        picked.setdefault(os.path.splitext(row["path"])[1].lower(), row["path"])
    assert picked, "the manifest lists no photos"
    for relative in picked.values():
        path = shared_faces / relative
        with Image.open(path) as img:
            expected = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        out = load_image(path)
        _assert_rgb(out, *expected.shape[:2])
        np.testing.assert_array_equal(out, expected)
