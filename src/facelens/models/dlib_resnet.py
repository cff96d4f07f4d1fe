"""dlib's face-recognition ResNet as a plain torch module, with weights read from dlib's own file.

The network is ``anet_type`` from dlib's ``dnn_face_recognition_ex.cpp``: a 7×7/2
convolution and a 3×3/2 max pool, then five stages of residual blocks (dlib's
``alevel4`` … ``alevel0``), a global average pool and a 128-d linear embedding
(29 convolutions). Two details of dlib's definition matter for exact parity:

* strided convolutions and pools have **no padding** (dlib's default padding is
  ``size/2`` only for stride 1), so a down-sampling block's two branches can differ
  in size: 3×3 vs 4×4 in stage 4, 1×1 vs 2×2 in stage 5;
* dlib's ``add_prev`` then zero-pads the smaller tensor at its end (rows, columns and
  channels appended, origin top-left), which :class:`PadAdd` reproduces. In stage 5
  only the top-left cell of the 2×2 map therefore sees the last convolutions.

The module is in canonical form for hook-based explainers: every ReLU, residual sum
and affine layer is its own module, nothing is used twice and nothing works in place.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import WeightsError
from ..faces.align import AlignRecipe
from ..weights import weight_path
from .base import FaceModel
from .cohort import load_cohort
from .dlib_dat import (
    AddPrev,
    Conv,
    FullyConnected,
    InputRGB,
    LayerRecord,
    Pool,
    Relu,
    WrapperKind,
    read_network,
)
from .dlib_dat import Affine as AffineRecord
from .layers import Add, Affine, Normalize, PadAdd

__all__ = ["WEIGHTS_KEY", "Affine", "DlibResNet", "PadAdd", "ResidualBlock", "build", "load_dlib_resnet"]

WEIGHTS_KEY = "dlib_face_recognition_resnet_model_v1.dat"
INPUT_SIZE = 150
# (channels, blocks, whether the first block halves the resolution) for dlib's alevel4 … alevel0
STAGES: tuple[tuple[int, int, bool], ...] = (
    (32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True),
)


class ResidualBlock(nn.Module):
    """dlib's ``ares`` (identity shortcut) or ``ares_down`` (2×2 average-pool shortcut) block.

    ``conv1 → affine1 → relu1 → conv2 → affine2``, summed with the shortcut by ``add``,
    then ``relu2``. Down-sampling blocks use an unpadded 3×3/2 convolution, as dlib does.
    """

    def __init__(self, in_channels: int, channels: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = downsample
        stride, padding = (2, 0) if downsample else (1, 1)
        if not downsample and in_channels != channels:
            raise ValueError("an identity-shortcut block needs as many input as output channels")
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=padding)
        self.affine1 = Affine(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1)
        self.affine2 = Affine(channels)
        if downsample:
            self.shortcut = nn.AvgPool2d(2, stride=2, padding=0)
        self.add = PadAdd() if downsample else Add()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(self.relu1(self.affine1(self.conv1(x)))))
        skip = self.shortcut(x) if self.downsample else x
        return self.relu2(self.add(y, skip))


class DlibResNet(nn.Module):
    """RGB in [0, 1], ``N×3×150×150`` → 128-d face descriptor (not normalized, as dlib's)."""

    def __init__(self, mean: tuple[float, float, float] = (122.782, 117.001, 104.298)) -> None:
        super().__init__()
        self.normalize = Normalize(mean=mean, scale=256.0)
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(3, 32, 7, stride=2, padding=0))
        self.stem.add_module("affine", Affine(32))
        self.stem.add_module("relu", nn.ReLU())
        self.stem.add_module("pool", nn.MaxPool2d(3, stride=2, padding=0))
        in_channels = 32
        for s, (channels, blocks, downsample) in enumerate(STAGES, start=1):
            stage = nn.Sequential()
            for b in range(blocks):
                stage.add_module(f"block{b}", ResidualBlock(in_channels, channels, downsample and b == 0))
                in_channels = channels
            self.add_module(f"stage{s}", stage)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.embedding = nn.Linear(in_channels, 128, bias=False)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"stage{s}") for s in range(1, len(STAGES) + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(x))
        for stage in self.stages():
            x = stage(x)
        return self.embedding(self.flatten(self.pool(x)))

    def dlib_layers(self) -> Iterator[tuple[WrapperKind, str, nn.Module | None]]:
        """The wrappers of dlib's ``anet_type`` from the input outward, each with our module.

        Tags and skips have no module: they only route tensors, which our ``forward`` does.
        """
        for name in ("conv", "affine", "relu", "pool"):
            yield "add_layer", f"stem.{name}", getattr(self.stem, name)
        for s, stage in enumerate(self.stages(), start=1):
            for b, block in enumerate(stage):
                assert isinstance(block, ResidualBlock)
                where = f"stage{s}.block{b}"
                yield "add_tag_layer", f"{where} (tag1)", None
                for name in ("conv1", "affine1", "relu1", "conv2", "affine2"):
                    yield "add_layer", f"{where}.{name}", getattr(block, name)
                if block.downsample:
                    yield "add_tag_layer", f"{where} (tag2)", None
                    yield "add_skip_layer", f"{where} (skip1)", None
                    yield "add_layer", f"{where}.shortcut", block.shortcut
                yield "add_layer", f"{where}.add", block.add
                yield "add_layer", f"{where}.relu2", block.relu2
        yield "add_layer", "pool", self.pool
        yield "add_layer", "embedding", self.embedding


# -- weights -------------------------------------------------------------------------------------
def _expect(record: LayerRecord, kind: type, where: str, source: str) -> None:
    if not isinstance(record, kind):
        raise WeightsError(f"{source}: layer {where} should be dlib's {kind.__name__}, "
                           f"the file has {type(record).__name__} there")


def _check(ok: bool, where: str, source: str, what: str, found: object, expected: object) -> None:
    if not ok:
        raise WeightsError(f"{source}: layer {where}: {what} is {found} in the file, "
                           f"the architecture needs {expected}")


def _set(module: nn.Module, name: str, values: np.ndarray) -> None:
    """Replace a parameter by the file's values without another copy (shapes are checked before)."""
    old = getattr(module, name)
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(old.shape)
    setattr(module, name, nn.Parameter(tensor, requires_grad=old.requires_grad))


def _fill(module: nn.Module, record: LayerRecord, where: str, source: str) -> None:
    """Copy one dlib layer into its module after checking every stored hyper-parameter."""
    if isinstance(module, nn.Conv2d):
        _expect(record, Conv, where, source)
        assert isinstance(record, Conv)
        _check(record.weight.shape == tuple(module.weight.shape), where, source, "the filter shape",
               record.weight.shape, tuple(module.weight.shape))
        geometry = ((record.stride_y, record.stride_x), (record.padding_y, record.padding_x))
        _check(geometry == (module.stride, module.padding), where, source, "(stride, padding)",
               geometry, (module.stride, module.padding))
        _check(record.bias is not None, where, source, "the bias", "absent", "a bias")
        assert record.bias is not None
        _set(module, "weight", record.weight)
        _set(module, "bias", record.bias)
    elif isinstance(module, Affine):
        _expect(record, AffineRecord, where, source)
        assert isinstance(record, AffineRecord)
        _check(record.mode == "conv" and not record.disabled, where, source, "the affine mode",
               f"{record.mode}{' (disabled)' if record.disabled else ''}", "per-channel (conv) mode")
        _check(record.gamma.size == module.num_features, where, source, "the number of channels",
               record.gamma.size, module.num_features)
        _set(module, "weight", record.gamma)
        _set(module, "bias", record.beta)
        module.running_mean.zero_()
        module.running_var.fill_(1.0)
    elif isinstance(module, nn.ReLU):
        _expect(record, Relu, where, source)
        assert isinstance(record, Relu)
        _check(not record.disabled, where, source, "the relu", "disabled", "enabled")
    elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        _expect(record, Pool, where, source)
        assert isinstance(record, Pool)
        if isinstance(module, nn.AdaptiveAvgPool2d):
            expected = ("avg", (0, 0), (1, 1), (0, 0))  # dlib's avg_pool_everything
        else:
            k, st, p = (v if isinstance(v, tuple) else (v, v)
                        for v in (module.kernel_size, module.stride, module.padding))
            expected = ("max" if isinstance(module, nn.MaxPool2d) else "avg", k, st, p)
        found = (record.kind, (record.rows, record.cols), (record.stride_y, record.stride_x),
                 (record.padding_y, record.padding_x))
        _check(found == expected, where, source, "the pooling (kind, size, stride, padding)", found, expected)
    elif isinstance(module, Add):
        _expect(record, AddPrev, where, source)
    elif isinstance(module, nn.Linear):
        _expect(record, FullyConnected, where, source)
        assert isinstance(record, FullyConnected)
        shape = (record.num_inputs, record.num_outputs)
        _check(shape == (module.in_features, module.out_features), where, source, "(inputs, outputs)",
               shape, (module.in_features, module.out_features))
        has = ("with" if b else "without" for b in (record.bias is not None, module.bias is not None))
        found, needed = has
        _check(found == needed, where, source, "the layer", f"{found} bias", f"one {needed} bias")
        _set(module, "weight", record.weight.T)
    else:  # pragma: no cover - the architecture above only uses the modules handled here
        raise TypeError(f"no dlib layer maps to {type(module).__name__}")


def _parse(data: bytes, source: str) -> DlibResNet:
    """Parse the file against the architecture and fill a fresh network with it."""
    net = DlibResNet()
    order = list(net.dlib_layers())
    parsed = read_network(data, [kind for kind, _, _ in order], source)
    rgb = parsed.input
    assert isinstance(rgb, InputRGB)
    if (rgb.rows, rgb.cols) != (INPUT_SIZE, INPUT_SIZE):
        raise WeightsError(f"{source}: the input layer takes {rgb.rows}×{rgb.cols} images, "
                           f"this architecture {INPUT_SIZE}×{INPUT_SIZE}")
    net.normalize.mean.copy_(torch.tensor([rgb.avg_red, rgb.avg_green, rgb.avg_blue]).view(1, 3, 1, 1))
    modules = [(where, module) for kind, where, module in order if kind == "add_layer"]
    for (where, module), record in zip(modules, parsed.layers, strict=True):
        assert module is not None
        _fill(module, record, where, source)
    return net.eval()


@functools.lru_cache(maxsize=2)
def _cached_state(path: str, mtime_ns: int, size: int) -> dict[str, torch.Tensor]:
    data = Path(path).read_bytes()
    net = _parse(data, Path(path).name)
    return net.state_dict()  # that network is dropped: the cache holds the only references


def load_dlib_resnet(path: str | Path | None = None) -> DlibResNet:
    """dlib's face-recognition ResNet with weights from ``path`` (default: the verified model file).

    The file is parsed once per process; every call returns an independent copy.
    """
    p = Path(weight_path(WEIGHTS_KEY) if path is None else path)
    try:
        stat = p.stat()
    except OSError as exc:
        raise WeightsError(f"{p}: cannot read the dlib model file ({exc.strerror or exc})") from exc
    state = _cached_state(str(p.resolve()), stat.st_mtime_ns, stat.st_size)
    net = DlibResNet()
    net.load_state_dict(state)
    return net.eval()


def build() -> FaceModel:
    """The zoo entry ``dlib-resnet``: dlib's recognizer with its own 5-point chip recipe."""
    net = load_dlib_resnet()
    mean = [round(float(v), 3) for v in net.normalize.mean.flatten()]
    return FaceModel(
        name="dlib-resnet",
        task="embedding",
        net=net,
        input_size=(INPUT_SIZE, INPUT_SIZE),
        recipe=AlignRecipe(size=INPUT_SIZE, padding=0.25, method="dlib5"),
        # early/mid/late span the depth (filters, inversion, the report's depth table); "cam" is the
        # default layer of Grad-CAM-type methods: the deepest map of at least 8×8. Deeper, stage 4 is 4×4
        # and stage 5, which feeds the global pooling and so is CAM's layer, is 2×2 with only its top-left
        # cell seeing the last convolutions: too coarse to separate facial features.
        layers={
            "early": "stage1.block2.relu2",  # 32 channels, 35×35
            "mid": "stage2.block3.relu2",  # 64 channels, 17×17
            "late": "stage4.block2.relu2",  # 256 channels, 4×4
            "cam": "stage3.block2.relu2",  # 128 channels, 8×8
        },
        preprocessing=f"(RGB − {mean}) / 256",
        license="CC0-1.0",
        source=f"face_recognition_models==0.3.0: {WEIGHTS_KEY}",
        match_threshold=0.6,
        description="dlib's face-recognition ResNet (29 convolutions, 128-d); same person if distance < 0.6",
        cohort=load_cohort("dlib-resnet"),
    )
