"""dlib's serialization primitives and layer records, read back from byte strings built here.

The encoders below follow dlib's writers (``ser_helper::pack_int``,
``float_details::convert_from_T``, the tensor and layer ``serialize`` functions),
not our reader, so a reader that decodes what it encodes the wrong way fails.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from facelens.errors import WeightsError
from facelens.models.dlib_dat import (
    AddPrev,
    Affine,
    Conv,
    DatReader,
    FullyConnected,
    InputRGB,
    LossMetric,
    Pool,
    Relu,
    read_layer,
    read_network,
)


# -- encoders written from dlib's serialize.h / float_details.h / tensor.h ----------------------
def enc_int(value: int) -> bytes:
    magnitude = abs(value)
    body = magnitude.to_bytes(max(1, (magnitude.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if value < 0 else 0)]) + body


def enc_float(value: float, digits: int = 24) -> bytes:
    """float_details of a C++ float (24 digits) or double (53), low zero bytes shifted off as dlib does."""
    if math.isinf(value):
        return enc_int(0) + enc_int(32000 if value > 0 else 32001)
    if math.isnan(value):
        return enc_int(0) + enc_int(32002)
    if digits == 24:
        value = float(np.float32(value))
    m, e = math.frexp(value)
    mantissa, exponent = int(m * (1 << digits)), e - digits
    for _ in range(8):
        if mantissa & 0xFF:
            break
        mantissa >>= 8
        exponent += 8
    return enc_int(mantissa) + enc_int(exponent)


def enc_str(text: str) -> bytes:
    return enc_int(len(text)) + text.encode("ascii")


def enc_bool(flag: bool) -> bytes:
    return b"1" if flag else b"0"


def enc_tensor(values: np.ndarray, shape: tuple[int, int, int, int] | None = None) -> bytes:
    shape = shape or tuple(values.shape)  # type: ignore[assignment]
    flat = np.asarray(values, np.float32).reshape(-1)
    return enc_int(2) + b"".join(enc_int(s) for s in shape) + struct.pack(f"<{flat.size}f", *flat.tolist())


EMPTY_TENSOR = enc_int(2) + enc_int(0) * 4


def enc_alias(shape: tuple[int, int, int, int]) -> bytes:
    return enc_int(1) + b"".join(enc_int(s) for s in shape)


MULTIPLIERS = b"".join(enc_float(v, digits=53) for v in (1.0, 1.0, 1.0, 0.0))  # doubles in dlib


def con_record(weight: np.ndarray, bias: np.ndarray, stride: int, padding: int) -> bytes:
    filters, k, rows, cols = weight.shape
    params = np.concatenate([weight.reshape(-1), bias])
    return (enc_str("con_4") + enc_tensor(params, (params.size, 1, 1, 1)) + enc_int(filters)
            + enc_int(rows) + enc_int(cols) + enc_int(stride) * 2 + enc_int(padding) * 2
            + enc_alias((filters, k, rows, cols)) + enc_alias((1, filters, 1, 1)) + MULTIPLIERS)


# -- integers -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "value"), [
    (b"\x01\x00", 0), (b"\x01\x7f", 127), (b"\x01\xff", 255), (b"\x02\x2c\x01", 300),
    (b"\x81\x05", -5), (b"\x84\x00\x00\x00\x80", -(2**31)),
    (b"\x08" + (2**63 - 1).to_bytes(8, "little"), 2**63 - 1),
])
def test_int_known_encodings(raw: bytes, value: int) -> None:
    r = DatReader(raw)
    assert r.read_int() == value
    assert r.remaining == 0


def test_int_round_trip_through_dlib_encoder() -> None:
    rng = np.random.default_rng(0)
    values = [0, 1, -1, 256, -65536, *rng.integers(-(2**62), 2**62, 50).tolist()]
    r = DatReader(b"".join(enc_int(v) for v in values))
    assert [r.read_int() for _ in values] == values


@pytest.mark.parametrize(("raw", "reason"), [
    (b"\x00", "control byte"), (b"\x09" + b"\x00" * 9, "control byte"),
    (b"\x02\x01", "ends early"), (b"", "ends early"),
])
def test_int_rejects_bad_bytes(raw: bytes, reason: str) -> None:
    with pytest.raises(WeightsError, match=reason) as info:
        DatReader(raw, "model.dat").read_int("num_filters")
    assert "model.dat" in str(info.value) and "num_filters" in str(info.value)


def test_int_size_limit_follows_the_target_type() -> None:
    with pytest.raises(WeightsError, match="control byte"):
        DatReader(b"\x03\x00\x00\x01").read_int("an int16", max_bytes=2)


def test_uint_refuses_the_sign_bit() -> None:
    assert DatReader(b"\x01\x96").read_uint() == 150
    with pytest.raises(WeightsError, match="unsigned"):
        DatReader(b"\x81\x05").read_uint()


# -- floats ---------------------------------------------------------------------------------------
def test_float_known_encoding() -> None:
    # loss_metric_ margin as it sits in dlib's face-recognition file: mantissa 0xa3d70a, exponent -28
    r = DatReader(b"\x03\x0a\xd7\xa3\x81\x1c")
    value = r.read_float()
    assert value == 0xA3D70A * 2.0**-28
    assert np.float32(value) == np.float32(0.04)


def test_float_round_trip_through_dlib_encoder() -> None:
    rng = np.random.default_rng(1)
    values = np.concatenate([[0.0, 1.0, -1.0, 0.5, 122.782, -1e-30, 3e38],
                             rng.normal(0, 1, 100) * 10.0 ** rng.integers(-20, 20, 100)]).astype(np.float32)
    r = DatReader(b"".join(enc_float(float(v)) for v in values))
    decoded = np.array([r.read_float() for _ in values], dtype=np.float32)
    np.testing.assert_array_equal(decoded, values)
    assert r.remaining == 0


def test_double_round_trip_keeps_all_53_bits() -> None:
    values = [0.1, -1e-5, 1 / 3, 2.0**-1000, 1.7976931348623157e308]
    r = DatReader(b"".join(enc_float(v, digits=53) for v in values))
    assert [r.read_float() for _ in values] == values


def test_float_special_values() -> None:
    r = DatReader(enc_float(math.inf) + enc_float(-math.inf) + enc_float(math.nan))
    assert r.read_float() == math.inf
    assert r.read_float() == -math.inf
    assert math.isnan(r.read_float())


def test_float_overflow_saturates_like_c_ldexp() -> None:
    r = DatReader(enc_int(-3) + enc_int(2000))
    assert r.read_float() == -math.inf


def test_float_old_text_format_is_refused() -> None:
    with pytest.raises(WeightsError, match="text format"):
        DatReader(b"0.5 ").read_float()


# -- strings, bools, tensors ----------------------------------------------------------------------
def test_strings_and_bools() -> None:
    r = DatReader(enc_str("hello") + enc_str("") + b"10")
    assert (r.read_string(), r.read_string(), r.read_bool(), r.read_bool()) == ("hello", "", True, False)
    with pytest.raises(WeightsError, match="past the end"):
        DatReader(b"\x01\x09abc").read_string()
    with pytest.raises(WeightsError, match="bool"):
        DatReader(b"x").read_bool()


def test_tensor_layout_and_errors() -> None:
    values = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2) / 7
    out = DatReader(enc_tensor(values)).read_tensor()
    assert out.dtype == np.float32 and out.shape == (2, 3, 2, 2)
    np.testing.assert_array_equal(out, values)
    assert DatReader(EMPTY_TENSOR).read_tensor().size == 0
    with pytest.raises(WeightsError, match="tensor version"):
        DatReader(enc_int(1) + enc_int(0) * 4).read_tensor()
    with pytest.raises(WeightsError, match="ends early"):
        DatReader(enc_tensor(values)[:-3]).read_tensor()


def test_alias_shape() -> None:
    assert DatReader(enc_alias((32, 3, 7, 7))).read_alias_shape() == (32, 3, 7, 7)
    with pytest.raises(WeightsError, match="alias_tensor version"):
        DatReader(enc_int(2) + enc_int(1) * 4).read_alias_shape()


# -- layer records --------------------------------------------------------------------------------
def test_con_record_splits_filters_and_biases() -> None:
    rng = np.random.default_rng(2)
    weight = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    rec = read_layer(DatReader(con_record(weight, bias, stride=2, padding=0)))
    assert isinstance(rec, Conv)
    assert (rec.num_filters, rec.rows, rec.cols, rec.stride_y, rec.padding_x) == (4, 3, 3, 2, 0)
    np.testing.assert_array_equal(rec.weight, weight)
    assert rec.bias is not None
    np.testing.assert_array_equal(rec.bias, bias)


def test_con_record_without_parameters_is_refused() -> None:
    raw = (enc_str("con_4") + EMPTY_TENSOR + enc_int(4) + enc_int(3) * 2 + enc_int(1) * 4
           + enc_alias((0, 0, 0, 0)) * 2 + MULTIPLIERS)
    with pytest.raises(WeightsError, match="no trained parameters"):
        read_layer(DatReader(raw))


def test_fc_record_keeps_dlib_inputs_by_outputs_layout() -> None:
    weight = np.arange(6, dtype=np.float32).reshape(3, 2)  # 3 inputs, 2 outputs
    raw = (enc_str("fc_3") + enc_int(2) + enc_int(3) + enc_tensor(weight, (6, 1, 1, 1))
           + enc_alias((3, 2, 1, 1)) + enc_alias((0, 0, 0, 0)) + enc_int(1) + MULTIPLIERS + enc_bool(True))
    rec = read_layer(DatReader(raw))
    assert isinstance(rec, FullyConnected) and rec.bias is None
    assert (rec.num_inputs, rec.num_outputs) == (3, 2)
    np.testing.assert_array_equal(rec.weight, weight)


def test_affine_and_bn_records() -> None:
    gamma, beta = np.array([2.0, -1.0], np.float32), np.array([0.5, 0.25], np.float32)
    raw = (enc_str("affine_2") + enc_tensor(np.concatenate([gamma, beta]), (4, 1, 1, 1))
           + enc_alias((1, 2, 1, 1)) * 2 + enc_int(0) + enc_bool(False))
    rec = read_layer(DatReader(raw))
    assert isinstance(rec, Affine) and rec.mode == "conv"
    np.testing.assert_array_equal(rec.gamma, gamma)
    np.testing.assert_array_equal(rec.beta, beta)

    means, variances, eps = np.array([1.0, -2.0], np.float32), np.array([4.0, 0.25], np.float32), 1e-5
    raw = (enc_str("bn_con2") + enc_tensor(np.concatenate([gamma, beta]), (4, 1, 1, 1))
           + enc_alias((1, 2, 1, 1)) * 2 + EMPTY_TENSOR * 2
           + enc_tensor(means, (1, 2, 1, 1)) + enc_tensor(variances, (1, 2, 1, 1))
           + enc_int(100) + enc_int(1000) + MULTIPLIERS + enc_float(eps, digits=53))
    rec = read_layer(DatReader(raw))
    assert isinstance(rec, Affine)
    scale = gamma.astype(np.float64) / np.sqrt(variances.astype(np.float64) + eps)
    np.testing.assert_allclose(rec.gamma, scale, rtol=1e-6)
    np.testing.assert_allclose(rec.beta, beta - scale * means, rtol=1e-6)


def test_small_records() -> None:
    raw = (enc_str("relu_2") + enc_bool(False)
           + enc_str("max_pool_2") + b"".join(map(enc_int, (3, 3, 2, 2, 0, 0)))
           + enc_str("avg_pool_2") + b"".join(map(enc_int, (0, 0, 1, 1, 0, 0))) + enc_str("add_prev_")
           + enc_str("input_rgb_image_sized") + enc_float(122.782) + enc_float(117.001) + enc_float(104.298)
           + enc_int(150) * 2 + enc_str("loss_metric_2") + enc_float(0.04) + enc_float(0.6))
    r = DatReader(raw)
    records = [read_layer(r) for _ in range(6)]
    assert records[:4] == [Relu(False), Pool("max", 3, 3, 2, 2, 0, 0), Pool("avg", 0, 0, 1, 1, 0, 0),
                           AddPrev()]
    rgb, loss = records[4], records[5]
    assert isinstance(rgb, InputRGB) and (rgb.rows, rgb.cols) == (150, 150)
    assert np.float32(rgb.avg_red) == np.float32(122.782)
    assert isinstance(loss, LossMetric) and np.float32(loss.dist_thresh) == np.float32(0.6)
    assert r.remaining == 0


def test_unknown_layer_type_is_named() -> None:
    with pytest.raises(WeightsError, match="'lstm_1'") as info:
        read_layer(DatReader(enc_str("lstm_1"), "net.dat"))
    assert "net.dat" in str(info.value)


# -- whole networks: wrappers out-to-in, then layers in-to-out ------------------------------------
def tiny_network(weight: np.ndarray, bias: np.ndarray) -> bytes:
    """``loss_metric<relu<tag1<con<input_rgb_image_sized<8>>>>>``, laid out as dlib's serialize() does."""
    add_layer_state = enc_bool(True) + enc_bool(False) + enc_bool(False) + EMPTY_TENSOR * 3
    input_state = enc_bool(True) + enc_bool(False) + enc_bool(False) + EMPTY_TENSOR * 3 + enc_int(1)
    return (enc_int(1) + enc_str("loss_metric_2") + enc_float(0.04) + enc_float(0.6)  # add_loss_layer
            + enc_int(2)  # add_layer<relu_, ...>
            + enc_int(1)  # add_tag_layer<1, ...>
            + enc_int(3)  # add_layer<con_, input>
            + enc_str("input_rgb_image_sized") + enc_float(1.0) + enc_float(2.0) + enc_float(3.0)
            + enc_int(8) * 2
            + con_record(weight, bias, stride=1, padding=1) + input_state
            + enc_str("relu_2") + enc_bool(False) + add_layer_state)


def test_read_network_walks_wrappers_then_layers() -> None:
    weight, bias = np.ones((2, 3, 3, 3), np.float32), np.array([0.5, -0.5], np.float32)
    net = read_network(tiny_network(weight, bias), ["add_layer", "add_tag_layer", "add_layer"], "tiny.dat")
    assert isinstance(net.loss, LossMetric) and isinstance(net.input, InputRGB)
    assert net.input.avg_green == 2.0
    assert [type(layer) for layer in net.layers] == [Conv, Relu]
    conv = net.layers[0]
    assert isinstance(conv, Conv) and conv.bias is not None
    np.testing.assert_array_equal(conv.bias, bias)


def test_read_network_rejects_mismatches() -> None:
    raw = tiny_network(np.ones((2, 3, 3, 3), np.float32), np.zeros(2, np.float32))
    with pytest.raises(WeightsError, match="unexpected bytes"):
        read_network(raw + b"\x00", ["add_layer", "add_tag_layer", "add_layer"], "tiny.dat")
    # one wrapper too few: versions and records misalign
    with pytest.raises(WeightsError, match=r"tiny\.dat"):
        read_network(raw, ["add_layer", "add_layer"], "tiny.dat")
    with pytest.raises(WeightsError, match="ends early"):
        read_network(raw[:-10], ["add_layer", "add_tag_layer", "add_layer"], "tiny.dat")
