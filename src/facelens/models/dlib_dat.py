"""Read dlib's binary serialization (``.dat`` files) in pure Python.

dlib ships its pretrained networks as C++ ``serialize()`` streams, and its
Python binding offers no way to read the weights back out. This module reads
that stream directly, so a dlib network can be rebuilt as a torch module
without compiling anything.

The format, as written by dlib's ``serialize.h``, ``dnn/core.h``,
``dnn/layers.h``, ``dnn/input.h`` and ``cuda/tensor.h``:

* integers: one control byte (low nibble = number of value bytes, ``0x80`` =
  negative) followed by the magnitude, little-endian; zero takes one value byte;
* floats: a ``float_details`` pair, mantissa (int64) then exponent (int16), worth
  ``mantissa · 2**exponent``; three reserved exponents mean inf, −inf and NaN;
* strings: a length integer and the raw bytes; ``bool``: the character ``'0'`` or ``'1'``;
* tensors: version ``2``, four sizes (samples, k, rows, cols), then raw little-endian float32;
* layer settings: a version string naming the layer type (``"con_4"``, ``"relu_2"``...)
  and its fields.

A network is nested types, ``add_loss_layer<add_layer<..., add_layer<..., input>>>``,
and each wrapper writes its version and then its *whole inner network* before its
own settings. The stream therefore holds every wrapper's version from the outside
in, then the input layer, then each layer's settings from the input outward.
The stream does not say which wrapper is which, so :func:`read_network` is told
the architecture and checks the stream against it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import WeightsError

__all__ = [
    "AddPrev",
    "Affine",
    "Conv",
    "DatReader",
    "DlibNetwork",
    "FullyConnected",
    "InputRGB",
    "LayerRecord",
    "LossMetric",
    "Pool",
    "Relu",
    "WrapperKind",
    "read_layer",
    "read_network",
]

# float_details' reserved exponents
_EXP_INF, _EXP_NINF, _EXP_NAN = 32000, 32001, 32002

WrapperKind = Literal["add_layer", "add_tag_layer", "add_skip_layer"]


class DatReader:
    """A cursor over a dlib stream that raises `WeightsError` naming the file, field and byte offset."""

    def __init__(self, data: bytes | bytearray | memoryview, source: str = "<bytes>") -> None:
        self.data = bytes(data)
        self.source = source
        self.pos = 0

    # -- errors and raw bytes -------------------------------------------------------------------
    def error(self, what: str, reason: str, at: int | None = None) -> WeightsError:
        offset = self.pos if at is None else at
        return WeightsError(f"{self.source}: {reason} (reading {what} at byte {offset})")

    def advance(self, n: int, what: str) -> int:
        """Step over ``n`` bytes that must exist; returns where they start."""
        if n < 0 or self.pos + n > len(self.data):
            left = len(self.data) - self.pos
            raise self.error(what, f"the file ends early: needs {n} more bytes, {left} left")
        start = self.pos
        self.pos += n
        return start

    def take(self, n: int, what: str) -> bytes:
        start = self.advance(n, what)
        return self.data[start:self.pos]

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def expect_end(self) -> None:
        if self.remaining:
            raise self.error("the end of the file", f"{self.remaining} unexpected bytes after the network")

    # -- primitives -----------------------------------------------------------------------------
    def read_int(self, what: str = "an integer", max_bytes: int = 8) -> int:
        """A signed integer in dlib's variable-length encoding (``ser_helper::unpack_int``)."""
        start = self.pos
        control = self.take(1, what)[0]
        size = control & 0x0F
        if size == 0 or size > max_bytes:
            raise self.error(what, f"bad integer control byte 0x{control:02x}", start)
        value = int.from_bytes(self.take(size, what), "little")
        return -value if control & 0x80 else value

    def read_uint(self, what: str = "an unsigned integer", max_bytes: int = 8) -> int:
        """An unsigned integer: same encoding, but a set sign bit is an error."""
        start = self.pos
        control = self.take(1, what)[0]
        size = control & 0x8F
        if size == 0 or size > max_bytes:
            raise self.error(what, f"bad unsigned integer control byte 0x{control:02x}", start)
        return int.from_bytes(self.take(size, what), "little")

    def read_float(self, what: str = "a float") -> float:
        """A ``float_details`` pair, as dlib writes every float and double outside tensors."""
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            raise self.error(what, "float in dlib's pre-2013 text format, which is not supported")
        mantissa = self.read_int(what + " (mantissa)", 8)
        exponent = self.read_int(what + " (exponent)", 2)
        if exponent == _EXP_INF:
            return math.inf
        if exponent == _EXP_NINF:
            return -math.inf
        if exponent == _EXP_NAN:
            return math.nan
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError:  # C's ldexp, which dlib uses, saturates to ±inf
            return math.copysign(math.inf, mantissa)

    def read_string(self, what: str = "a string") -> str:
        length = self.read_uint(what + " (length)")
        if length > self.remaining:
            raise self.error(what, f"string length {length} runs past the end of the file")
        return self.take(length, what).decode("latin-1")

    def read_bool(self, what: str = "a flag") -> bool:
        start = self.pos
        ch = self.take(1, what)
        if ch not in (b"0", b"1"):
            raise self.error(what, f"bad bool byte 0x{ch[0]:02x} (expected '0' or '1')", start)
        return ch == b"1"

    def read_tensor(self, what: str = "a tensor") -> np.ndarray:
        """A ``resizable_tensor``: shape (samples, k, rows, cols), float32, copied out of the file."""
        version = self.read_int(what + " (version)")
        if version != 2:
            raise self.error(what, f"unsupported tensor version {version} (expected 2)")
        shape = tuple(self.read_int(what + " (size)") for _ in range(4))
        if min(shape) < 0:
            raise self.error(what, f"negative tensor size {shape}")
        count = math.prod(shape)
        start = self.advance(4 * count, what + f" ({count} floats)")
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=start)
        return values.astype(np.float32).reshape(shape)  # a native-order copy, independent of the file buffer

    def read_alias_shape(self, what: str = "an alias tensor") -> tuple[int, int, int, int]:
        """An ``alias_tensor``: only the shape of a view into a layer's flat parameter tensor."""
        version = self.read_int(what + " (version)")
        if version != 1:
            raise self.error(what, f"unsupported alias_tensor version {version} (expected 1)")
        n, k, nr, nc = (self.read_int(what + " (size)") for _ in range(4))
        if min(n, k, nr, nc) < 0:
            raise self.error(what, f"negative alias tensor size {(n, k, nr, nc)}")
        return n, k, nr, nc

    def expect_version(self, what: str, allowed: Sequence[int]) -> int:
        start = self.pos
        version = self.read_int(what + " version")
        if version not in allowed:
            raise self.error(what, f"unexpected {what} version {version} (expected {list(allowed)})", start)
        return version


# -- layer records -------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputRGB:
    """``input_rgb_image[_sized]``: per-channel means subtracted before dividing by 256."""

    avg_red: float
    avg_green: float
    avg_blue: float
    rows: int | None = None
    cols: int | None = None


@dataclass(frozen=True, eq=False)
class Conv:
    """``con_``: weight is (filters, k, rows, cols), the same layout as torch's Conv2d."""

    num_filters: int
    rows: int
    cols: int
    stride_y: int
    stride_x: int
    padding_y: int
    padding_x: int
    weight: np.ndarray
    bias: np.ndarray | None


@dataclass(frozen=True, eq=False)
class FullyConnected:
    """``fc_``: weight is (num_inputs, num_outputs), i.e. the transpose of torch's Linear."""

    num_outputs: int
    num_inputs: int
    weight: np.ndarray
    bias: np.ndarray | None


@dataclass(frozen=True, eq=False)
class Affine:
    """``affine_`` (or a ``bn_`` converted to one): ``y = gamma·x + beta``, per channel in conv mode."""

    gamma: np.ndarray
    beta: np.ndarray
    mode: Literal["conv", "fc"]
    disabled: bool = False


@dataclass(frozen=True)
class Relu:
    disabled: bool = False


@dataclass(frozen=True)
class Pool:
    """``max_pool_``/``avg_pool_``; rows = cols = 0 means the window covers the whole input."""

    kind: Literal["max", "avg"]
    rows: int
    cols: int
    stride_y: int
    stride_x: int
    padding_y: int
    padding_x: int


@dataclass(frozen=True)
class AddPrev:
    """``add_prev_``: adds a tagged earlier output; which tag is not stored in the file."""


@dataclass(frozen=True)
class LossMetric:
    margin: float
    dist_thresh: float


LayerRecord = InputRGB | Conv | FullyConnected | Affine | Relu | Pool | AddPrev | LossMetric


def _split_params(r: DatReader, what: str, params: np.ndarray,
                  parts: Sequence[tuple[int, int, int, int]]) -> list[np.ndarray]:
    """Cut a layer's flat parameter tensor into the views its alias tensors describe."""
    flat = params.reshape(-1)
    sizes = [math.prod(s) for s in parts]
    if sum(sizes) != flat.size:
        raise r.error(what, f"parameter tensor holds {flat.size} values but its views {list(parts)} "
                            f"need {sum(sizes)}")
    out, offset = [], 0
    for shape, size in zip(parts, sizes, strict=True):
        out.append(flat[offset:offset + size].reshape(shape))
        offset += size
    return out


def _read_con(r: DatReader, version: str) -> Conv:
    what = f"layer {version}"
    params = r.read_tensor(what + " params")
    num_filters = r.read_int(what + " num_filters")
    rows, cols = r.read_int(what + " nr"), r.read_int(what + " nc")
    stride_y, stride_x = r.read_int(what + " stride_y"), r.read_int(what + " stride_x")
    padding_y, padding_x = r.read_int(what + " padding_y"), r.read_int(what + " padding_x")
    filters = r.read_alias_shape(what + " filters")
    biases = r.read_alias_shape(what + " biases")
    for _ in range(4):  # learning-rate and weight-decay multipliers
        r.read_float(what + " multiplier")
    use_bias = r.read_bool(what + " use_bias") if version in ("con_5", "con_6") else True
    if version == "con_6":
        r.read_bool(what + " use_relu")  # only a cuDNN fusion hint; a following relu_ layer still exists
    if params.size == 0:
        raise r.error(what, "convolution has no trained parameters")
    if filters[0] != num_filters or filters[2:] != (rows, cols):
        raise r.error(what, f"filter shape {filters} does not match {num_filters} filters of {rows}×{cols}")
    if not use_bias:
        biases = (0, 0, 0, 0)
    if use_bias and math.prod(biases) != num_filters:
        raise r.error(what, f"bias shape {biases} does not match {num_filters} filters")
    weight, bias = _split_params(r, what, params, [filters, biases])
    return Conv(num_filters, rows, cols, stride_y, stride_x, padding_y, padding_x,
                weight, bias.reshape(-1) if use_bias else None)


def _read_fc(r: DatReader, version: str) -> FullyConnected:
    what = f"layer {version}"
    num_outputs = r.read_uint(what + " num_outputs")
    num_inputs = r.read_uint(what + " num_inputs")
    params = r.read_tensor(what + " params")
    weights = r.read_alias_shape(what + " weights")
    biases = r.read_alias_shape(what + " biases")
    bias_mode = r.read_int(what + " bias_mode")
    for _ in range(4):
        r.read_float(what + " multiplier")
    use_bias = r.read_bool(what + " use_bias") if version == "fc_3" else True
    if params.size == 0:
        raise r.error(what, "fully connected layer has no trained parameters")
    if bias_mode not in (0, 1):
        raise r.error(what, f"unknown fc bias mode {bias_mode}")
    has_bias = bias_mode == 0 and use_bias
    if weights[0] != num_inputs or math.prod(weights[1:]) != num_outputs:
        raise r.error(what, f"weight shape {weights} does not match {num_inputs} inputs × {num_outputs} "
                            "outputs")
    parts = [weights, biases] if has_bias else [weights]
    split = _split_params(r, what, params, parts)
    bias = split[1].reshape(-1) if has_bias else None
    return FullyConnected(num_outputs, num_inputs, split[0].reshape(num_inputs, num_outputs), bias)


def _read_affine(r: DatReader, version: str) -> Affine:
    what = f"layer {version}"
    params = r.read_tensor(what + " params")
    gamma_shape = r.read_alias_shape(what + " gamma")
    beta_shape = r.read_alias_shape(what + " beta")
    mode = r.read_int(what + " mode")
    disabled = r.read_bool(what + " disabled") if version == "affine_2" else False
    if mode not in (0, 1):
        raise r.error(what, f"unknown layer mode {mode}")
    if disabled:
        return Affine(np.zeros(0, np.float32), np.zeros(0, np.float32), "conv" if mode == 0 else "fc", True)
    gamma, beta = _split_params(r, what, params, [gamma_shape, beta_shape])
    return Affine(gamma.reshape(-1), beta.reshape(-1), "conv" if mode == 0 else "fc")


def _read_bn_as_affine(r: DatReader, version: str) -> Affine:
    """A batch-norm layer frozen into an affine one, with the same float32 arithmetic as dlib's
    ``affine_(const bn_&)`` constructor (dlib does this conversion whenever it loads a bn_ as affine_)."""
    what = f"layer {version}"
    params = r.read_tensor(what + " params")
    gamma_shape = r.read_alias_shape(what + " gamma")
    beta_shape = r.read_alias_shape(what + " beta")
    r.read_tensor(what + " batch means")
    r.read_tensor(what + " batch invstds")
    running_means = r.read_tensor(what + " running means").reshape(-1)
    running_vars = r.read_tensor(what + " running variances").reshape(-1)
    r.read_uint(what + " num_updates")
    r.read_uint(what + " running_stats_window_size")
    for _ in range(4):
        r.read_float(what + " multiplier")
    eps = r.read_float(what + " eps")
    gamma, beta = (p.reshape(-1) for p in _split_params(r, what, params, [gamma_shape, beta_shape]))
    if not (running_means.size == running_vars.size == gamma.size):
        raise r.error(what, f"running statistics ({running_means.size}, {running_vars.size}) "
                            f"do not match {gamma.size} channels")
    scale = gamma / np.sqrt(running_vars + np.float32(eps))
    shift = beta - scale * running_means
    mode: Literal["conv", "fc"] = "conv" if version == "bn_con2" else "fc"
    return Affine(scale.astype(np.float32), shift.astype(np.float32), mode)


def _read_pool(r: DatReader, version: str) -> Pool:
    what = f"layer {version}"
    rows, cols = r.read_int(what + " nr"), r.read_int(what + " nc")
    stride_y, stride_x = r.read_int(what + " stride_y"), r.read_int(what + " stride_x")
    padding_y, padding_x = r.read_int(what + " padding_y"), r.read_int(what + " padding_x")
    kind: Literal["max", "avg"] = "max" if version.startswith("max") else "avg"
    return Pool(kind, rows, cols, stride_y, stride_x, padding_y, padding_x)


def _read_input_rgb(r: DatReader, version: str) -> InputRGB:
    what = f"input layer {version}"
    means = [r.read_float(what + f" avg_{c}") for c in ("red", "green", "blue")]
    if version == "input_rgb_image":
        return InputRGB(*means)
    return InputRGB(*means, rows=r.read_uint(what + " nr"), cols=r.read_uint(what + " nc"))


def _read_relu(r: DatReader, version: str) -> Relu:
    return Relu(r.read_bool(f"layer {version} disabled") if version == "relu_2" else False)


def _read_loss_metric(r: DatReader, version: str) -> LossMetric:
    if version == "loss_metric_":  # dlib hard-coded these before they were serialized
        return LossMetric(0.1, 0.75)
    return LossMetric(r.read_float("loss_metric_ margin"), r.read_float("loss_metric_ dist_thresh"))


_READERS = {
    "con_4": _read_con, "con_5": _read_con, "con_6": _read_con,
    "fc_2": _read_fc, "fc_3": _read_fc,
    "affine_": _read_affine, "affine_2": _read_affine,
    "bn_con2": _read_bn_as_affine, "bn_fc2": _read_bn_as_affine,
    "relu_": _read_relu, "relu_2": _read_relu,
    "max_pool_2": _read_pool, "avg_pool_2": _read_pool,
    "add_prev_": lambda r, v: AddPrev(),
    "input_rgb_image": _read_input_rgb, "input_rgb_image_sized": _read_input_rgb,
    "loss_metric_": _read_loss_metric, "loss_metric_2": _read_loss_metric,
}


def read_layer(r: DatReader) -> LayerRecord:
    """One layer's settings: its type string, then the fields that type writes."""
    start = r.pos
    tag = r.read_string("a layer type")
    reader = _READERS.get(tag)
    if reader is None:
        shown = tag if tag.isprintable() and len(tag) < 40 else repr(tag[:40])
        raise r.error("a layer type", f"unsupported or corrupt layer type {shown!r}", start)
    return reader(r, tag)


# -- whole networks ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DlibNetwork:
    """What a dlib network file holds: the loss, the input layer and every computing layer,
    listed from the input outward (one per ``add_layer`` in the architecture)."""

    loss: LayerRecord
    input: LayerRecord
    layers: list[LayerRecord]


def _skip_add_layer_state(r: DatReader, what: str, version: int, on_input: bool) -> None:
    """The training state each ``add_layer`` writes after its layer: flags and cached tensors."""
    for flag in ("setup_called", "gradient_input_is_stale", "get_output_and_gradient_input_disabled"):
        r.read_bool(f"{what} {flag}")
    r.read_tensor(what + " x_grad")
    r.read_tensor(what + " cached_output")
    if on_input:
        r.read_tensor(what + " grad_final")
        if version >= 3:
            r.read_uint(what + " sample_expansion_factor")
    elif version >= 2:
        r.read_tensor(what + " params_grad")


def read_network(data: bytes, kinds: Sequence[WrapperKind], source: str = "<bytes>") -> DlibNetwork:
    """Read a whole ``add_loss_layer<...>`` network serialized by dlib.

    ``kinds`` lists the network's wrappers from the input outward: ``"add_layer"`` for
    each computing layer (the first one sits on the input layer), ``"add_tag_layer"`` and
    ``"add_skip_layer"`` for the bookkeeping wrappers that hold no settings. The loss
    layer is implied. The whole file must be consumed.
    """
    if not kinds or kinds[0] != "add_layer":
        raise WeightsError(f"{source}: the architecture must start with an add_layer on the input")
    r = DatReader(data, source)
    r.expect_version("add_loss_layer", (1,))
    loss = read_layer(r)
    if not isinstance(loss, LossMetric):
        raise r.error("the loss layer", f"expected a loss layer, found {type(loss).__name__}")
    versions: list[int] = [0] * len(kinds)
    for i in range(len(kinds) - 1, -1, -1):  # wrapper versions come from the outside in
        kind = kinds[i]
        if i == 0:
            versions[i] = r.expect_version("add_layer (on the input)", (2, 3))
        elif kind == "add_layer":
            versions[i] = r.expect_version(f"add_layer #{i}", (1, 2))
        elif kind in ("add_tag_layer", "add_skip_layer"):
            versions[i] = r.expect_version(f"{kind} #{i}", (1,))
        else:
            raise WeightsError(f"{source}: unknown wrapper kind {kind!r} in the architecture")
    input_layer = read_layer(r)
    if not isinstance(input_layer, InputRGB):
        raise r.error("the input layer", f"expected an input layer, found {type(input_layer).__name__}")
    layers: list[LayerRecord] = []
    for i, kind in enumerate(kinds):  # then each layer's settings from the input outward
        if kind != "add_layer":
            continue
        record = read_layer(r)
        if isinstance(record, (InputRGB, LossMetric)):
            raise r.error(f"layer #{i}", f"found {type(record).__name__} where a computing layer belongs")
        layers.append(record)
        _skip_add_layer_state(r, f"add_layer #{i}", versions[i], on_input=i == 0)
    r.expect_end()
    return DlibNetwork(loss=loss, input=input_layer, layers=layers)
