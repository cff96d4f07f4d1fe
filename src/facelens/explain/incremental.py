"""Incremental inference for occlusion: recompute only what a patch changes (Krypton).

Occlusion scores hundreds of copies of one image that differ from it in one small
patch. A convolution's output changes only inside the patch's *projective field*,
which is small in the early layers, where much of the arithmetic is. Following
Krypton (Nakandala, Kumar & Papakonstantinou, SIGMOD 2019) we

* run the network once on the intact image and keep every activation;
* for each batch of patches, carry per layer only a small *changed window* per patch
  (one shared size, a per-patch offset): a layer reads its input window with the halo
  it needs, from the cached activation with the patch's changed window pasted in, computes
  the layer there (padding only where the window meets the true border, in the layer's own
  padding mode) and hands on its output window;
* switch to the ordinary batched forward once a window covers most of its map, and in
  any case at the global layers (pooling to a vector, flatten, linear);
* apply the same target to the network output as the engine does.

Exact mode gives the full recompute's scores up to float rounding. Approximate mode
caps each changed window at a fraction ``tau`` of its map (Krypton's projective-field
threshold: the changes it drops are the small ones at the field's edge) and drills down
adaptively: a coarse grid of patches first, the fine grid only around the patches that
moved the score most, bilinear interpolation elsewhere.

Why our own: neither captum, Zennit nor pytorch-grad-cam do incremental inference, and
Krypton's prototype is tied to its own network definitions; here the plan is read from
the ``torch.fx`` graph of any model built from convolutions, pools, elementwise layers
and residual sums. Any other layer whose input has changed is computed in full (a
warning, and ``fell_back`` on the result), so a map is never wrong, only slower.
"""

from __future__ import annotations

import math
import operator
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ModelError
from ..models.layers import Add, Normalize, RGBToGray
from ..targets import Target

__all__ = [
    "BATCH_GROWTH",
    "BFLOAT16_MIN_FAN_IN",
    "DEFAULT_COVERAGE",
    "DEFAULT_DRILL_FACTOR",
    "DEFAULT_DRILL_FRACTION",
    "DEFAULT_TAU",
    "DEFAULT_TAU_MIN_SIDE",
    "IncrementalNet",
    "IncrementalOcclusion",
    "PatchScores",
    "incremental_net",
    "incremental_occlusion",
    "map_ssim",
    "occlusion_map",
]

Mode = Literal["exact", "approx"]
Precision = Literal["float32", "bfloat16"]

DEFAULT_COVERAGE = 0.7
"""Exact mode goes back to the full forward once a window covers this share of its map:
past it, gathering windows costs more than the few positions it saves."""
DEFAULT_TAU = 0.4
"""Approximate mode: no changed window grows beyond this fraction of its map's side."""
DEFAULT_TAU_MIN_SIDE = 16
"""Approximate mode: maps with a side below this are never truncated. On an 8×8 map the field of a
patch covers most of the map, so there is no small-magnitude border to drop: truncating there took
the SSIM of the fer-emotion and dlib-resnet maps from about 0.9 to about 0.2, and saves little."""
DEFAULT_DRILL_FACTOR = 2
"""Approximate mode: the coarse pass takes every second window position on each axis."""
DEFAULT_DRILL_FRACTION = 0.25
"""Approximate mode: the fine grid is computed around this share of the coarse positions."""

BATCH_GROWTH = 4
"""Incremental batches hold at most this many times ``batch_size`` patches (see `_Plan.patches_per_batch`):
512 patches of fer-emotion ran slower than 256, the batch no longer fitting the caches."""
BFLOAT16_MIN_FAN_IN = 128
"""bfloat16 mode rounds only convolutions with this many multiply-adds per output
(see `IncrementalNet.bfloat16_weights`)."""

_BIG = 1 << 40  # "unbounded" for range arithmetic

# -- what the planner understands ------------------------------------------------------------------------
_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout2d,
    Normalize, RGBToGray,
)
_WINDOW_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReplicationPad2d, nn.ReflectionPad2d,
)
_GLOBAL_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Flatten, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_POINTWISE_FUNCTIONS: set[Any] = {
    torch.relu, F.relu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.gelu, F.silu, F.leaky_relu, F.relu6,
    F.elu, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, torch.clamp, torch.clip,
}
_POINTWISE_METHODS = {"relu", "sigmoid", "tanh", "clamp", "clamp_min", "clamp_max", "contiguous"}
# elementwise ops of two or more tensors; in-place spellings run out of place (the graph has no other reader)
_MERGE_FUNCTIONS: dict[Any, Callable[..., Any]] = {
    operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
    operator.truediv: operator.truediv, operator.iadd: operator.add, operator.isub: operator.sub,
    operator.imul: operator.mul, operator.itruediv: operator.truediv,
    torch.add: torch.add, torch.sub: torch.sub, torch.mul: torch.mul, torch.div: torch.div,
    torch.maximum: torch.maximum, torch.minimum: torch.minimum,
}
_MERGE_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "add_": "add", "sub_": "sub",
                  "mul_": "mul", "div_": "div"}


def _same_pad_type() -> type[nn.Module]:
    from ..models.fer_emotion import SamePad

    return SamePad


class _Tracer(fx.Tracer):
    """Keeps every layer the planner knows as one node (our Affine is a BatchNorm subclass,
    SamePad and PadAdd branch on shapes and cannot be traced through)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        known = (*_POINTWISE_MODULES, *_WINDOW_MODULES, *_GLOBAL_MODULES, _BatchNorm, Add, _same_pad_type())
        return isinstance(m, known) or super().is_leaf_module(m, qualname)


# -- geometry --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Axis:
    """One spatial axis of a windowed layer: output ``o`` reads inputs ``o·stride − before + j·dilation``."""

    kernel: int
    stride: int
    before: int
    dilation: int

    def span(self, n_out: int) -> int:
        return (n_out - 1) * self.stride + self.dilation * (self.kernel - 1) + 1

    def out_range(self, lo: np.ndarray, hi: np.ndarray, n_in: int, n_out: int, pad: str) -> tuple[np.ndarray,
                                                                                                    np.ndarray]:
        """Bounding range of the outputs whose inputs intersect ``[lo, hi)`` (vectorized over patches).

        Replicate and reflect padding copy border inputs into the padding, so a change at the
        border reaches the outputs that read the padding too.
        """
        empty = lo >= hi
        a, b = lo.copy(), hi.copy()
        after = max(0, self.span(n_out) - self.before - n_in)
        if pad == "replicate":
            a[a <= 0] = -_BIG
            b[b >= n_in] = _BIG
        elif pad == "reflect":
            a[a <= self.before] = -_BIG
            b[b >= n_in - after] = _BIG
        reach = self.dilation * (self.kernel - 1)
        out_lo = np.clip(-((reach - a - self.before) // self.stride), 0, n_out)  # ceil((a + before − reach) / s)
        out_hi = np.clip((b - 1 + self.before) // self.stride + 1, 0, n_out)
        out_lo[empty] = 0
        out_hi[empty] = 0
        return out_lo, out_hi


@dataclass(frozen=True)
class _Window:
    """A layer computed on windows: its two axes, how it pads, and the layer with no padding."""

    rows: _Axis
    cols: _Axis
    pad: str  # "value", "replicate" or "reflect"
    value: float
    apply: Callable[[torch.Tensor], torch.Tensor]


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _window_of(module: nn.Module, in_shape: torch.Size) -> _Window | None:
    """The window description of a module, or None when it cannot be computed on windows."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode not in ("zeros", "replicate", "reflect"):
            return None
        k, s, d = _pair(module.kernel_size), _pair(module.stride), _pair(module.dilation)
        if isinstance(module.padding, str):
            before = (0, 0) if module.padding == "valid" else tuple(d[i] * (k[i] - 1) // 2 for i in range(2))
        else:
            before = _pair(module.padding)
        pad = "value" if module.padding_mode == "zeros" else module.padding_mode
        groups = module.groups

        def conv(w: torch.Tensor) -> torch.Tensor:  # the module's weights when called: plans outlive them
            return F.conv2d(w, module.weight, module.bias, s, 0, d, groups)

        return _Window(_Axis(k[0], s[0], before[0], d[0]), _Axis(k[1], s[1], before[1], d[1]), pad, 0.0, conv)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        if module.ceil_mode or getattr(module, "return_indices", False):
            return None
        k, s, p = _pair(module.kernel_size), _pair(module.stride or module.kernel_size), _pair(module.padding)
        if isinstance(module, nn.MaxPool2d):
            d = _pair(module.dilation)

            def pool(w: torch.Tensor) -> torch.Tensor:
                return F.max_pool2d(w, k, s, 0, d)

            value = -math.inf
        else:
            if any(p) and not module.count_include_pad:
                return None
            d = (1, 1)
            divisor = module.divisor_override

            def pool(w: torch.Tensor) -> torch.Tensor:
                return F.avg_pool2d(w, k, s, 0, False, True, divisor)

            value = 0.0
        return _Window(_Axis(k[0], s[0], p[0], d[0]), _Axis(k[1], s[1], p[1], d[1]), "value", value, pool)
    pads: tuple[int, int, int, int] | None = None
    mode, value = "value", 0.0
    if isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReplicationPad2d, nn.ReflectionPad2d)):
        pads = tuple(module.padding)  # type: ignore[assignment]  # left, right, top, bottom
        if isinstance(module, nn.ConstantPad2d):
            value = float(module.value)
        elif isinstance(module, nn.ReplicationPad2d):
            mode = "replicate"
        elif isinstance(module, nn.ReflectionPad2d):
            mode = "reflect"
    elif isinstance(module, _same_pad_type()):
        top, bottom = module.pads(int(in_shape[-2]))  # type: ignore[operator]
        left, right = module.pads(int(in_shape[-1]))  # type: ignore[operator]
        pads = (left, right, top, bottom)
        mode = "replicate" if module.mode == "replicate" else "value"
    if pads is None or min(pads) < 0:
        return None
    return _Window(_Axis(1, 1, pads[2], 1), _Axis(1, 1, pads[0], 1), mode, value, lambda w: w)


def _is_map(v: object) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[0] == 1


def _broadcasts(v: object) -> bool:
    """True for arguments that join a feature map without varying over space (scalars, per-channel)."""
    if not isinstance(v, torch.Tensor):
        return v is None or isinstance(v, (int, float, bool))
    return v.dim() == 0 or (3 <= v.dim() <= 4 and v.shape[-1] == 1 and v.shape[-2] == 1
                            and (v.dim() == 3 or v.shape[0] == 1))


def _run_node(node: fx.Node, modules: dict[str, nn.Module], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if node.op == "call_module":
        return modules[str(node.target)](*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        obj, *rest = args
        return getattr(obj, str(node.target))(*rest, **kwargs)
    raise ModelError(f"cannot run graph node {node.op} {node.target}")


def _attr(net: nn.Module, target: str) -> Any:
    obj: Any = net
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _fold_batch_norms(nodes: list[fx.Node], modules: dict[str, nn.Module]) -> dict[fx.Node, tuple[torch.Tensor,
                                                                                                  torch.Tensor]]:
    """Convolutions whose only reader is a frozen batch norm, with the norm folded into their
    weights and bias: one pass over each map instead of two (the norm node then passes its
    input on). Values differ from the unfolded pair by float rounding only."""
    folded: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}
    for node in nodes:
        conv = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        norm = modules.get(str(user.target)) if user.op == "call_module" else None
        if (not isinstance(norm, _BatchNorm) or norm.training or norm.running_mean is None
                or norm.running_var is None or user.args != (node,) or user.kwargs):
            continue
        with torch.no_grad():
            scale = torch.rsqrt(norm.running_var + norm.eps)
            if norm.weight is not None:
                scale = scale * norm.weight
            shift = -norm.running_mean * scale
            if norm.bias is not None:
                shift = shift + norm.bias
            bias = shift if conv.bias is None else conv.bias * scale + shift
            weight = conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
        folded[node] = (weight.detach(), bias.detach())
    return folded


def _node_args(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


# -- gathering windows -----------------------------------------------------------------------------------
def _map_axis(coords: torch.Tensor, size: int, pad: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Coordinates in the map (padding resolved) and, for constant padding, which lie inside it."""
    if pad == "replicate":
        return coords.clamp(0, size - 1), None
    if pad == "reflect":
        folded = coords.abs()
        return torch.where(folded > size - 1, 2 * (size - 1) - folded, folded).clamp(0, size - 1), None
    inside = (coords >= 0) & (coords < size)
    return coords.clamp(0, size - 1), (None if bool(inside.all()) else inside)


@dataclass(frozen=True)
class _Code:
    """Where every patch of a plan reads one window ``(N, Lh, Lw)`` of a map.

    A cell ``≥ 0`` is a cell of the intact map (``height·width`` is its padding cell, holding
    ``value``); ``−1 − i`` is cell ``i`` of the patch's own changed window. Worked out once per
    plan geometry, so a batch only slices it: computing these indices batch by batch was half
    of fer-emotion's incremental time.
    """

    cells: torch.Tensor
    padded: bool
    value: float


def _code(rows: torch.Tensor, cols: torch.Tensor, height: int, width: int, pad: str = "value",
          value: float = 0.0, window: tuple[torch.Tensor, tuple[int, int]] | None = None) -> _Code:
    """The `_Code` of windows at per-patch coordinates ``rows (N, Lh)``, ``cols (N, Lw)`` of a
    ``height × width`` map; coordinates outside it follow ``pad``. ``window``: each patch's changed
    window of the map, as (origins ``(N, 2)``, size)."""
    r, r_in = _map_axis(rows, height, pad)
    c, c_in = _map_axis(cols, width, pad)
    cells = r[:, :, None] * width + c[:, None, :]
    if window is not None:
        origin, (h, w) = window
        dr, dc = r - origin[:, 0:1], c - origin[:, 1:2]
        hit = ((dr >= 0) & (dr < h))[:, :, None] & ((dc >= 0) & (dc < w))[:, None, :]
        local = dr.clamp(0, h - 1)[:, :, None] * w + dc.clamp(0, w - 1)[:, None, :]
        cells = torch.where(hit, -1 - local, cells)
    padded = False
    if r_in is not None or c_in is not None:
        inside = torch.ones(cells.shape, dtype=torch.bool, device=cells.device)
        if r_in is not None:
            inside &= r_in[:, :, None]
        if c_in is not None:
            inside &= c_in[:, None, :]
        cells = torch.where(inside, cells, height * width)
        padded = not bool(inside.all())
    return _Code(cells, padded, value)


class _Store:
    """One node's intact map, channels last, with room after it for a padding cell and the
    changed windows of one batch: windows are read with one ``index_select`` and the intact
    map is never copied per batch."""

    def __init__(self, base: torch.Tensor) -> None:
        self.height, self.width, self.channels = int(base.shape[-2]), int(base.shape[-1]), int(base.shape[1])
        self.cells = self.height * self.width
        self.buffer = base.new_empty((self.cells + 1, self.channels))
        self.buffer[:self.cells] = base[0].permute(1, 2, 0).reshape(self.cells, self.channels)
        self.loaded: torch.Tensor | None = None

    def load(self, values: torch.Tensor) -> None:
        """Copy a batch's windows ``(B, C, h, w)`` behind the intact map (once per batch)."""
        if self.loaded is values:
            return
        need = self.cells + 1 + values.numel() // self.channels
        if self.buffer.shape[0] < need:
            grown = self.buffer.new_empty((need, self.channels))
            grown[:self.cells] = self.buffer[:self.cells]
            self.buffer = grown
        self.buffer[self.cells + 1:need].view(values.shape[0], values.shape[2], values.shape[3],
                                               self.channels).copy_(values.permute(0, 2, 3, 1))
        self.loaded = values

    def read(self, code: _Code, idx: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C, Lh, Lw)`` (channels-last memory): the windows of patches ``idx`` of a plan,
        from the intact map and, where ``code`` says so, from the batch's changed windows ``values``."""
        cells = code.cells.index_select(0, idx)
        b = cells.shape[0]
        used = self.cells + 1
        if values is not None:
            self.load(values)
            hw = values.shape[-2] * values.shape[-1]
            # −1 − i  →  the cell after the padding cell where row b's window starts, plus i
            offsets = (self.cells + hw * torch.arange(b, device=cells.device)).view(b, 1, 1)
            cells = torch.where(cells >= 0, cells, offsets - cells)
            used += b * hw
        if code.padded:
            self.buffer[self.cells].fill_(code.value)
        out = self.buffer[:used].index_select(0, cells.reshape(-1))
        return out.view(b, cells.shape[1], cells.shape[2], self.channels).permute(0, 3, 1, 2)


# -- the plan --------------------------------------------------------------------------------------------
@dataclass
class _NodePlan:
    """How one graph node is computed for a set of patches.

    ``state``: ``const`` (does not depend on the image), ``same`` (no patch changes it),
    ``delta`` (a changed window per patch), ``full`` (computed on whole maps).
    """

    state: str
    kind: str = "generic"  # input, point, window, merge, generic, output
    lo: np.ndarray | None = None  # (N, 2) exact changed range per patch (rows, cols)
    hi: np.ndarray | None = None
    size: tuple[int, int] = (0, 0)  # shared window size
    origin: np.ndarray | None = None  # (N, 2) window offsets
    window: _Window | None = None
    maps: tuple[int, ...] = ()  # positions in node.args of the maps a merge gathers
    fn: Callable[..., Any] | None = None


@dataclass(frozen=True)
class PatchScores:
    """Target scores of patched copies of one image, computed incrementally.

    Attributes:
        scores: ``(N,)`` one score per patch.
        intact: the score of the unpatched image.
        work_fraction: convolution and linear multiply-adds spent, as a share of full recomputes.
        fell_back: some changed layer had to be computed in full because it is not supported.
        fallback_ops: those layers.
    """

    scores: torch.Tensor
    intact: float
    work_fraction: float
    fell_back: bool
    fallback_ops: tuple[str, ...]


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[str(node.target)]).__name__})"
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})"


class IncrementalNet:
    """A traced network that scores patched copies of an image by incremental inference.

    Args:
        net: the model's network (``FaceModel.net``), in eval mode.

    ``traced`` says whether ``torch.fx`` could read the network; when it could not, `scores`
    recomputes every patch in full (``fell_back``) and ``reason`` says why.
    """

    def __init__(self, net: nn.Module) -> None:
        # a weak reference: the cache below is keyed weakly by the network, so nothing here may keep it alive
        self._net = weakref.ref(net)
        self.modules = {name: m for name, m in net.named_modules() if name}
        self.reason = ""
        self.graph: fx.Graph | None = None
        try:
            self.graph = _Tracer().trace(net)
        except Exception as exc:  # any tracing failure means "not supported", never a crash
            self.reason = f"torch.fx cannot trace {type(net).__name__}: {type(exc).__name__}: {exc}"
        if self.graph is not None:
            placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
            if len(placeholders) != 1:
                self.reason = f"the network takes {len(placeholders)} inputs, incremental inference needs one"
                self.graph = None
        self._checked: dict[tuple[int, ...], tuple[str, ...]] = {}
        self._geometries: dict[tuple, _Plan] = {}  # least recently used first
        self._cached_weights: tuple | None = None  # (key, folded, (fan-in, bfloat16 weights) | None)
        self._lock = threading.Lock()

    GEOMETRIES = 4
    """Plan geometries kept per network (one per chip size, patch grid and mode in use)."""

    @property
    def traced(self) -> bool:
        return self.graph is not None

    @property
    def net(self) -> nn.Module:
        net = self._net()
        if net is None:
            raise ModelError("the network of this IncrementalNet no longer exists")
        return net

    # -- weights ------------------------------------------------------------------------------------------
    def folded(self) -> dict[fx.Node, tuple[torch.Tensor, torch.Tensor]]:
        """`_fold_batch_norms` of the network's current weights (cached until any of them changes)."""
        return self._weights()[0]

    def bfloat16_weights(self) -> dict[fx.Node, tuple[torch.Tensor, torch.Tensor | None]]:
        """The weights of bfloat16 mode: convolutions with at least `BFLOAT16_MIN_FAN_IN`
        multiply-adds per output in bfloat16, the others as `folded` has them (cached like it).
        Native bfloat16 runs dlib-resnet's 3×3×32+ convolutions 2–3× faster; fer-emotion's depthwise
        and narrow 1×1 ones got slower, the casts costing more than the arithmetic saves."""
        folded, low = self._weights()
        if low is not None and low[0] == BFLOAT16_MIN_FAN_IN:
            return low[1]
        assert self.graph is not None
        weights: dict[fx.Node, tuple[torch.Tensor, torch.Tensor | None]] = dict(folded)
        for node in self.graph.nodes:
            module = self.modules.get(str(node.target)) if node.op == "call_module" else None
            if isinstance(module, nn.Conv2d) and module.weight[0].numel() >= BFLOAT16_MIN_FAN_IN:
                weight, bias = folded.get(node, (module.weight, module.bias))
                weights[node] = (weight.detach().bfloat16(), None if bias is None else bias.detach().bfloat16())
        with self._lock:
            held = self._cached_weights
            if held is not None and held[1] is folded:
                self._cached_weights = (held[0], folded, (BFLOAT16_MIN_FAN_IN, weights))
        return weights

    def _weights(self) -> tuple[dict, tuple | None]:
        """(folded weights, (fan-in threshold, bfloat16 weights) or None), worked out again when a
        weight, a buffer or a training flag changes (sanity checks randomize weights in place)."""
        from ..models.fuse import _fingerprint

        assert self.graph is not None
        key = (_fingerprint(self.net), tuple(m.training for m in self.modules.values()))
        with self._lock:
            held = self._cached_weights
        if held is not None and held[0] == key:
            return held[1], held[2]
        folded = _fold_batch_norms(list(self.graph.nodes), self.modules)
        with self._lock:
            self._cached_weights = (key, folded, None)
        return folded, None

    # -- intact pass --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def materialize(self, x: torch.Tensor, skip: frozenset[fx.Node] = frozenset()) -> dict[fx.Node, Any]:
        """Every node's value on the intact image ``(1, C, H, W)``, but for the nodes in ``skip`` (and
        so for everything computed from them). A convolution whose batch norm folds into it gives the
        normed map, and the norm passes it on (as the patched passes do)."""
        assert self.graph is not None
        folded = self.folded()
        identities = {user for node in folded for user in node.users}
        env: dict[fx.Node, Any] = {}
        for node in self.graph.nodes:
            if node.op == "placeholder":
                env[node] = x
            elif node.op == "get_attr":
                env[node] = _attr(self.net, str(node.target))
            elif node in skip:
                continue
            elif node.op == "output":
                env[node] = fx.node.map_arg(node.args[0], lambda n: env[n])
            elif node in identities:
                env[node] = env[node.args[0]]  # type: ignore[index]
            elif node in folded:
                weight, bias = folded[node]
                env[node] = self.modules[str(node.target)]._conv_forward(env[node.args[0]], weight, bias)  # type: ignore[index, operator]
            else:
                args = fx.node.map_arg(node.args, lambda n: env[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
                env[node] = _run_node(node, self.modules, args, kwargs)  # type: ignore[arg-type]
        return env

    def unsupported(self, input_shape: tuple[int, ...]) -> tuple[str, ...]:
        """Layers that a change in the input would reach and that cannot be updated on windows."""
        key = tuple(int(s) for s in input_shape)
        if key not in self._checked:
            if self.graph is None:
                self._checked[key] = ("the whole network: " + self.reason,)
            else:
                device = next(iter(self.net.parameters()), torch.zeros(0)).device
                x = torch.zeros(1, *key[1:], device=device)
                h, w = key[-2:]
                box = np.array([[h // 2, h // 2 + 1, w // 2, w // 2 + 1]])
                plan = _Plan(self, self.materialize(x), box, mode="exact", tau=1.0, coverage=2.0)
                self._checked[key] = plan.fallback_ops
        return self._checked[key]

    # -- patched copies -----------------------------------------------------------------------------------
    def plan(self, x: torch.Tensor, boxes: np.ndarray, *, mode: Mode = "exact", tau: float = DEFAULT_TAU,
             coverage: float = DEFAULT_COVERAGE, tau_min_side: int = DEFAULT_TAU_MIN_SIDE,
             base: dict[fx.Node, Any] | None = None) -> _Plan:
        """Plan the patches ``boxes`` (``(N, 4)`` rows ``[r0, r1, c0, c1)``) on image ``x``."""
        if self.graph is None:
            raise ModelError(f"incremental inference is not available: {self.reason}")
        boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        # Window sizes, offsets and read indices depend only on shapes, patches, settings and which
        # layers are frozen, not on the image: a later image of the same size reuses them.
        key = (tuple(x.shape), boxes.tobytes(), mode, float(tau), float(coverage), int(tau_min_side),
               tuple(m.training for m in self.modules.values()),
               tuple(m.running_mean is None for m in self.modules.values() if isinstance(m, _BatchNorm)))
        with self._lock:
            geometry = self._geometries.pop(key, None)
        # with a known geometry the layers every patch recomputes in full need no intact values
        values = base if base is not None else self.materialize(x, skip=geometry.tail if geometry else frozenset())
        plan = _Plan(self, values, boxes, mode=mode, tau=tau, coverage=coverage, tau_min_side=tau_min_side,
                     geometry=geometry)
        with self._lock:
            self._geometries[key] = plan.geometry()
            while len(self._geometries) > self.GEOMETRIES:
                self._geometries.pop(next(iter(self._geometries)))
        return plan

    def scores(self, x: torch.Tensor, fill: torch.Tensor, boxes: np.ndarray, target: Target, *,
               mode: Mode = "exact", tau: float = DEFAULT_TAU, coverage: float = DEFAULT_COVERAGE,
               batch_size: int = 64) -> PatchScores:
        """Scores of ``x`` with each box replaced by ``fill`` (both ``(1, C, H, W)``)."""
        plan = self.plan(x, boxes, mode=mode, tau=tau, coverage=coverage, base=self.materialize(x))
        plan.warn()
        return plan.scores(x, fill, target, batch_size=batch_size)


_NETS: weakref.WeakKeyDictionary[nn.Module, IncrementalNet] = weakref.WeakKeyDictionary()


def incremental_net(net: nn.Module) -> IncrementalNet:
    """The (cached) `IncrementalNet` of a network: tracing is done once per network."""
    found = _NETS.get(net)
    if found is None:
        found = _NETS[net] = IncrementalNet(net)
    return found


class _Plan:
    """Window sizes and offsets of every node for one image and one set of patches.

    Planned over all patches at once, so each patch is computed the same way whatever
    the batch it falls in: maps do not depend on the batch size.
    """

    def __init__(self, inet: IncrementalNet, base: dict[fx.Node, Any], boxes: np.ndarray, *, mode: Mode,
                 tau: float, coverage: float, tau_min_side: int = DEFAULT_TAU_MIN_SIDE,
                 geometry: _Plan | None = None) -> None:
        assert inet.graph is not None
        if mode not in ("exact", "approx"):
            raise ModelError(f"incremental mode must be 'exact' or 'approx', got {mode!r}")
        if not 0 < tau <= 1:
            raise ModelError(f"tau must be in (0, 1], got {tau}")
        self.inet = inet
        self.base = base
        self.nodes: list[fx.Node] = list(inet.graph.nodes)
        self.folded = inet.folded()  # per call: weights may have changed
        self._weights = self.folded  # what the folded layers run with (bfloat16 copies in `scores`)
        self._stores: dict[fx.Node, _Store] = {}
        self._images: tuple[torch.Tensor, torch.Tensor, _Store] | None = None
        if geometry is not None:  # same shapes, patches and settings: only the values are new
            self.__dict__.update({k: geometry.__dict__[k] for k in _Plan.GEOMETRY})
            return
        self.boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        self.tau = tau if mode == "approx" else 1.0
        self.tau_min_side = tau_min_side
        self.coverage = coverage
        self.plans: dict[fx.Node, _NodePlan] = {}
        self.identities = {user for node in self.folded for user in node.users}
        self.codes: dict[tuple[str, fx.Node, fx.Node | None], _Code] = {}
        self._fallback: list[str] = []
        self._work = [0.0, 0.0]  # multiply-adds per patch: spent, full
        for node in self.nodes:
            self.plans[node] = self._plan_node(node)
        self.fallback_ops = tuple(self._fallback)
        self.work_fraction = self._work[0] / self._work[1] if self._work[1] else 1.0
        self.tail = frozenset(n for n, p in self.plans.items() if p.state == "full")
        self.cells = self._activation_cells()
        order = {n: i for i, n in enumerate(self.nodes)}
        self.last_use: dict[fx.Node, int] = {}
        for node in self.nodes:
            for user in node.users:
                self.last_use[node] = max(self.last_use.get(node, -1), order[user])

    def geometry(self) -> _Plan:
        """A value-free copy of this plan to start later plans from (no activations, no weights)."""
        kept = object.__new__(_Plan)
        kept.__dict__.update({k: self.__dict__[k] for k in _Plan.GEOMETRY})
        return kept

    GEOMETRY = ("boxes", "tau", "tau_min_side", "coverage", "plans", "identities", "codes", "_fallback", "_work",
                "fallback_ops", "work_fraction", "last_use", "tail", "cells")
    """What a plan shares with later plans of the same shapes, patches and settings (`IncrementalNet.plan`)."""

    # -- planning ---------------------------------------------------------------------------------------
    def _container(self, lo: np.ndarray, hi: np.ndarray, shape: tuple[int, int], kind: str,
                   **extra: Any) -> _NodePlan:
        """Shared window size and per-patch offsets; capped at ``tau`` in approximate mode;
        ``full`` once the window covers ``coverage`` of the map."""
        lo, hi = lo.copy(), hi.copy()
        for axis, n in enumerate(shape):
            if n < self.tau_min_side:
                continue
            cap = max(1, math.ceil(self.tau * n))
            wide = hi[:, axis] - lo[:, axis] > cap
            if wide.any():
                start = np.clip((lo[wide, axis] + hi[wide, axis] - cap) // 2, 0, n - cap)
                lo[wide, axis], hi[wide, axis] = start, start + cap
        live = (hi > lo).all(1)
        if not live.any():
            return _NodePlan("same", kind)
        size = tuple(int((hi[live, a] - lo[live, a]).max()) for a in range(2))
        if size[0] * size[1] >= self.coverage * shape[0] * shape[1]:
            return _NodePlan("full", kind, **extra)
        lo[~live] = 0
        hi[~live] = 0
        origin = np.stack([np.clip(lo[:, a], 0, shape[a] - size[a]) for a in range(2)], 1)
        return _NodePlan("delta", kind, lo=lo, hi=hi, size=size, origin=origin, **extra)  # type: ignore[arg-type]

    def _cost(self, node: fx.Node, plan: _NodePlan) -> None:
        module = self.inet.modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or plan.state == "const":
            return
        out = self.base[node]
        per = module.weight.numel()
        whole = per * (out.shape[-2] * out.shape[-1] if isinstance(module, nn.Conv2d) else 1)
        self._work[1] += whole
        if plan.state == "full":
            self._work[0] += whole
        elif plan.state == "delta":
            self._work[0] += per * plan.size[0] * plan.size[1]

    def _plan_node(self, node: fx.Node) -> _NodePlan:
        plan = self._classify(node)
        self._cost(node, plan)
        return plan

    def _classify(self, node: fx.Node) -> _NodePlan:
        base, plans = self.base, self.plans
        if node.op == "placeholder":
            h, w = base[node].shape[-2:]
            b = self.boxes
            lo, hi = np.stack([b[:, 0], b[:, 2]], 1), np.stack([b[:, 1], b[:, 3]], 1)
            size = tuple(int((hi[:, a] - lo[:, a]).max()) for a in range(2))
            origin = np.stack([np.clip(lo[:, a], 0, (h, w)[a] - size[a]) for a in range(2)], 1)
            return _NodePlan("delta", "input", lo=lo, hi=hi, size=size, origin=origin)  # type: ignore[arg-type]
        if node.op == "get_attr":
            return _NodePlan("const", "const")
        inputs = _node_args(node)
        states = {plans[n].state for n in inputs}
        if node.op == "output":
            return _NodePlan("full" if states & {"delta", "full"} else ("same" if "same" in states else "const"),
                             "output")
        if not states & {"delta", "full", "same"}:
            return _NodePlan("const", "generic")
        if not states & {"delta", "full"}:
            return _NodePlan("same", "generic")
        out = base[node]
        if "full" not in states and _is_map(out):
            found = self._spatial(node, out)
            if found is not None:
                return found
        if "full" not in states and _is_map(out) and out.shape[-1] * out.shape[-2] > 1:
            self._fallback.append(_describe(node, self.inet.modules))
        return _NodePlan("full", "generic")

    def _spatial(self, node: fx.Node, out: torch.Tensor) -> _NodePlan | None:
        """A plan for a layer computed on windows, or None when the layer is not one we can."""
        modules, base, plans = self.inet.modules, self.base, self.plans
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        args = list(node.args)
        out_hw = (int(out.shape[-2]), int(out.shape[-1]))
        # windowed layers: one input map
        if module is not None and isinstance(module, (*_WINDOW_MODULES, _same_pad_type())):
            if len(args) != 1 or node.kwargs or not isinstance(args[0], fx.Node):
                return None
            src = args[0]
            window = _window_of(module, base[src].shape)
            if window is None or plans[src].state != "delta":
                return None
            p = plans[src]
            assert p.lo is not None and p.hi is not None
            n_in = base[src].shape[-2:]
            r = window.rows.out_range(p.lo[:, 0], p.hi[:, 0], int(n_in[0]), out_hw[0], window.pad)
            c = window.cols.out_range(p.lo[:, 1], p.hi[:, 1], int(n_in[1]), out_hw[1], window.pad)
            return self._container(np.stack([r[0], c[0]], 1), np.stack([r[1], c[1]], 1), out_hw, "window",
                                   window=window)
        # pointwise and elementwise layers
        fn: Callable[..., Any] | None = None
        pointwise_only = False
        if module is not None:
            if isinstance(module, Add):
                fn = module
            elif isinstance(module, _POINTWISE_MODULES) or (
                    isinstance(module, _BatchNorm) and not module.training and module.running_mean is not None):
                fn, pointwise_only = (_identity if node in self.identities else module), True
            elif isinstance(module, (nn.Dropout, nn.Dropout2d)) and module.training:
                return None
        elif node.op == "call_function":
            if node.target in _MERGE_FUNCTIONS:
                fn = _MERGE_FUNCTIONS[node.target]
            elif node.target in _POINTWISE_FUNCTIONS and not node.kwargs.get("inplace", False):
                fn, pointwise_only = node.target, True  # type: ignore[assignment]
        elif node.op == "call_method":
            name = str(node.target)
            if name in _MERGE_METHODS:
                fn = getattr(torch.Tensor, _MERGE_METHODS[name])
            elif name in _POINTWISE_METHODS:
                fn, pointwise_only = getattr(torch.Tensor, name), True
        if fn is None:
            return None
        if isinstance(module, nn.Module) and getattr(module, "inplace", False):
            return None
        pad_add = isinstance(module, Add)
        maps: list[int] = []
        deltas: list[fx.Node] = []
        for i, a in enumerate(args):
            if isinstance(a, fx.Node):
                v = base[a]
                if _is_map(v):
                    hw = (int(v.shape[-2]), int(v.shape[-1]))
                    fits = hw == out_hw or (pad_add and hw[0] <= out_hw[0] and hw[1] <= out_hw[1])
                    if not fits or plans[a].state == "full":
                        return None
                    maps.append(i)
                    if plans[a].state == "delta":
                        deltas.append(a)
                elif not _broadcasts(v) or plans[a].state in ("delta", "full"):
                    return None
            elif isinstance(a, (list, tuple, dict)) or not _broadcasts(a):
                return None
        for v in node.kwargs.values():
            if isinstance(v, fx.Node) or not _broadcasts(v):
                return None
        if not deltas:
            return None
        if len(maps) == 1 and len(deltas) == 1:
            p = plans[deltas[0]]
            return _NodePlan("delta", "point", lo=p.lo, hi=p.hi, size=p.size, origin=p.origin, fn=fn, maps=tuple(maps))
        if pointwise_only:
            return None
        lo = np.full((len(self.boxes), 2), _BIG, dtype=np.int64)
        hi = np.full((len(self.boxes), 2), -_BIG, dtype=np.int64)
        for d in deltas:
            p = plans[d]
            assert p.lo is not None and p.hi is not None
            live = (p.hi > p.lo).all(1)
            lo[live] = np.minimum(lo[live], p.lo[live])
            hi[live] = np.maximum(hi[live], p.hi[live])
        empty = (hi <= lo).any(1)
        lo[empty], hi[empty] = 0, 0
        return self._container(lo, hi, out_hw, "merge", fn=fn, maps=tuple(maps))

    # -- running ----------------------------------------------------------------------------------------
    def _store(self, node: fx.Node) -> _Store:
        store = self._stores.get(node)
        if store is None:
            store = self._stores[node] = _Store(self.base[node])
        return store

    def _changed(self, node: fx.Node, env: dict[fx.Node, Any]) -> torch.Tensor | None:
        """The batch's changed windows of ``node``, when it has them."""
        return env[node] if self.plans[node].state == "delta" else None

    def _window(self, node: fx.Node, device: torch.device) -> tuple[torch.Tensor, tuple[int, int]] | None:
        plan = self.plans[node]
        if plan.state != "delta":
            return None
        return torch.as_tensor(plan.origin, device=device), plan.size

    def _code(self, key: tuple[str, fx.Node, fx.Node | None], device: torch.device) -> _Code:
        """The `_Code` of one read, for every patch of the plan (made on first use, then shared)."""
        found = self.codes.get(key)
        if found is None or found.cells.device != device:
            found = self.codes[key] = self._make_code(*key, device)
        return found

    def _make_code(self, kind: str, node: fx.Node, src: fx.Node | None, device: torch.device) -> _Code:
        plan = self.plans[node]
        if kind == "full":  # every cell of a changed map
            h, w = (int(v) for v in self.base[node].shape[-2:])
            n = len(self.boxes)
            rows = torch.arange(h, device=device).expand(n, -1)
            cols = torch.arange(w, device=device).expand(n, -1)
            return _code(rows, cols, h, w, window=self._window(node, device))
        origin = torch.as_tensor(plan.origin, device=device)
        axes = (plan.window.rows, plan.window.cols) if kind == "window" and plan.window is not None else (None, None)
        rows = self._offsets(origin[:, 0], plan.size[0], axes[0], device)
        cols = self._offsets(origin[:, 1], plan.size[1], axes[1], device)
        if kind == "input":  # the image, or the fill inside the patch: cells of [image | fill] stacked
            h, w = (int(v) for v in self.base[node].shape[-2:])
            box = torch.as_tensor(self.boxes, device=device)
            in_r = (rows >= box[:, 0:1]) & (rows < box[:, 1:2])
            in_c = (cols >= box[:, 2:3]) & (cols < box[:, 3:4])
            cells = rows[:, :, None] * w + cols[:, None, :] + h * w * (in_r[:, :, None] & in_c[:, None, :])
            return _Code(cells, False, 0.0)
        assert src is not None
        h, w = (int(v) for v in self.base[src].shape[-2:])
        if kind == "window":
            assert plan.window is not None
            return _code(rows, cols, h, w, plan.window.pad, plan.window.value, self._window(src, device))
        return _code(rows, cols, h, w, window=self._window(src, device))  # a merge's argument

    def _materialize(self, node: fx.Node, env: dict[fx.Node, Any], idx: torch.Tensor) -> Any:
        """A node's value for every patch of the batch, as the unmodified layer would see it."""
        state = self.plans[node].state
        if state == "const":
            return self.base[node]
        if state == "full":
            return env[node]
        b = len(idx)
        if state == "delta":
            return self._store(node).read(self._code(("full", node, None), idx.device), idx, env[node])
        v = self.base[node]
        return v.expand(b, *v.shape[1:]) if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == 1 else v

    def _offsets(self, origin: torch.Tensor, n: int, axis: _Axis | None, device: torch.device) -> torch.Tensor:
        """Per-patch input coordinates ``(B, span)`` read by output windows starting at ``origin``."""
        if axis is None:
            return origin[:, None] + torch.arange(n, device=device)[None, :]
        start = origin * axis.stride - axis.before
        return start[:, None] + torch.arange(axis.span(n), device=device)[None, :]

    def _convolve(self, node: fx.Node, inp: torch.Tensor, *, windowed: bool) -> torch.Tensor:
        """A convolution with its `_weights`: on a window (unpadded) or a whole map (padded as the layer
        pads). In bfloat16 only the convolution itself is rounded; what follows it (sums, pools, the
        linear head) stays float32, so scores are not quantized to bfloat16 steps."""
        module = self.inet.modules[str(node.target)]
        weight, bias = self._weights[node]
        low = weight.dtype != inp.dtype
        if low:
            inp = inp.to(weight.dtype)
        if windowed:
            out = F.conv2d(inp, weight, bias, module.stride, 0, module.dilation, module.groups)  # type: ignore[arg-type]
        else:
            out = module._conv_forward(inp, weight, bias)  # type: ignore[operator]
        return out.float() if low else out

    def _windowed(self, node: fx.Node, win: torch.Tensor) -> torch.Tensor:
        plan = self.plans[node]
        assert plan.window is not None
        if node in self._weights:  # batch norm folded in, or bfloat16
            return self._convolve(node, win, windowed=True)
        return plan.window.apply(win)

    @torch.inference_mode()
    def run(self, x: torch.Tensor, fill: torch.Tensor, idx: np.ndarray) -> Any:
        """The network output for patches ``idx`` (a batch)."""
        device = x.device
        idx_t = torch.as_tensor(idx, device=device)
        env: dict[fx.Node, Any] = {}
        for step, node in enumerate(self.nodes):
            plan = self.plans[node]
            if plan.state in ("const", "same"):
                pass
            elif plan.kind == "input":
                if self._images is None or self._images[0] is not x or self._images[1] is not fill:
                    self._images = (x, fill, _Store(torch.cat([x, fill], -2)))
                env[node] = self._images[2].read(self._code(("input", node, None), device), idx_t)
            elif plan.kind == "output":
                env[node] = fx.node.map_arg(node.args[0], lambda n: self._materialize(n, env, idx_t))
            elif plan.state == "delta" and plan.kind == "window":
                src = node.args[0]
                assert isinstance(src, fx.Node)
                win = self._store(src).read(self._code(("window", node, src), device), idx_t, self._changed(src, env))
                env[node] = self._windowed(node, win)
            elif plan.state == "delta" and plan.kind == "point":
                assert plan.fn is not None
                args = [env[a] if i in plan.maps else self._materialize(a, env, idx_t)
                        if isinstance(a, fx.Node) else a for i, a in enumerate(node.args)]
                env[node] = plan.fn(*args, **node.kwargs)
            elif plan.state == "delta" and plan.kind == "merge":
                assert plan.fn is not None
                args = [self._store(a).read(self._code(("merge", node, a), device), idx_t, self._changed(a, env))
                        if i in plan.maps else self._materialize(a, env, idx_t) if isinstance(a, fx.Node) else a
                        for i, a in enumerate(node.args)]
                env[node] = plan.fn(*args, **node.kwargs)
            else:
                args = fx.node.map_arg(node.args, lambda n: self._materialize(n, env, idx_t))
                kwargs = fx.node.map_arg(node.kwargs, lambda n: self._materialize(n, env, idx_t))
                if node in self.identities:
                    env[node] = args[0]
                elif node in self._weights:
                    env[node] = self._convolve(node, args[0], windowed=False)
                else:
                    env[node] = _run_node(node, self.inet.modules, args, kwargs)  # type: ignore[arg-type]
            for n in node.all_input_nodes:
                if self.last_use.get(n) == step:
                    env.pop(n, None)
        out_node = self.nodes[-1]
        if self.plans[out_node].state in ("const", "same"):
            return self._materialize(out_node, env, idx_t)
        return env[out_node]

    def warn(self) -> None:
        """Say, once per plan, which layers are recomputed in full because they are not supported."""
        if self.fallback_ops:
            warnings.warn(f"incremental occlusion: {', '.join(self.fallback_ops)} cannot be updated on windows; "
                          "computed in full from there (the map is exact, only slower)", RuntimeWarning,
                          stacklevel=3)

    def _activation_cells(self) -> tuple[int, int]:
        """(largest map of one image, largest activation one patch carries), in values."""
        full = max((v[0].numel() for v in self.base.values() if isinstance(v, torch.Tensor) and v.dim() == 4),
                   default=1)
        per_patch = 1
        for node, plan in self.plans.items():
            v = self.base.get(node)
            if plan.state == "delta" and isinstance(v, torch.Tensor):
                per_patch = max(per_patch, int(v.shape[1]) * plan.size[0] * plan.size[1])
            elif plan.state == "full" and isinstance(v, torch.Tensor):
                per_patch = max(per_patch, v[0].numel())
        return full, per_patch

    def patches_per_batch(self, batch_size: int) -> int:
        """How many patches make one batch: as many as fit in the activation memory of ``batch_size``
        whole images (a patch carries small windows until its change covers the map), at most
        `BATCH_GROWTH` times more. Larger batches amortize the per-layer work of a batch: on
        fer-emotion's small maps 256 patches a batch ran 1.35× faster than 64."""
        full, per_patch = self.cells
        return int(min(BATCH_GROWTH * batch_size, max(batch_size, batch_size * full // per_patch)))

    def scores(self, x: torch.Tensor, fill: torch.Tensor, target: Target, *, batch_size: int = 64,
               subset: np.ndarray | None = None, precision: Precision = "float32") -> PatchScores:
        """Target scores of the patches (or of ``subset`` of them), in batches holding no more
        activations than ``batch_size`` whole images (`patches_per_batch`); ``precision="bfloat16"``
        rounds the long convolutions to bfloat16 (`IncrementalNet.bfloat16_weights`)."""
        which = np.arange(len(self.boxes)) if subset is None else np.asarray(subset, dtype=np.int64)
        out = torch.empty(len(which))
        self._weights = self.inet.bfloat16_weights() if precision == "bfloat16" else self.folded
        step = self.patches_per_batch(batch_size)
        try:
            for start in range(0, len(which), step):
                idx = which[start:start + step]
                result = self.run(x, fill, idx)
                if not isinstance(result, torch.Tensor):
                    raise ModelError("incremental occlusion needs a network with one tensor output")
                out[start:start + len(idx)] = target(result).float().cpu()
        finally:
            self._weights = self.folded
        intact_out = self.base.get(self.nodes[-1])  # skipped when the plan's geometry was known
        intact = float(target(intact_out)[0]) if isinstance(intact_out, torch.Tensor) else float("nan")
        return PatchScores(out, intact, self.work_fraction, bool(self.fallback_ops), self.fallback_ops)


# -- occlusion -------------------------------------------------------------------------------------------
def occlusion_map(rows: torch.Tensor, cols: torch.Tensor, drops: torch.Tensor) -> torch.Tensor:
    """Each pixel's mean drop over the windows covering it (captum's definition).

    ``rows (n_rows, H)`` and ``cols (n_cols, W)`` say which pixels each window position covers
    (`occlusion_windows`), ``drops (n_rows, n_cols)`` the score drop of each position.
    """
    rows, cols = rows.to(drops.dtype), cols.to(drops.dtype)
    total = rows.T @ drops @ cols
    coverage = rows.sum(0)[:, None] * cols.sum(0)[None, :]
    return total / coverage


@dataclass(frozen=True)
class IncrementalOcclusion:
    """An occlusion map computed by incremental inference.

    Attributes:
        map: ``(H, W)`` the mean score drop of the windows covering each pixel.
        drops: ``(n_rows, n_cols)`` the drop of each window position.
        computed: ``(n_rows, n_cols)`` bool: positions scored (approximate mode interpolates the rest).
        intact: the score of the intact image.
        mode: ``exact``, ``approx`` or ``full`` (nothing incremental was possible).
        evaluations: patched images scored.
        work_fraction: convolution and linear multiply-adds spent per scored patch, as a share of a
            full forward.
        fell_back: part (or all) of the network was recomputed in full because it is not supported.
        fallback_ops: what was not supported.
        precision: the arithmetic of the patched copies: ``float32`` or ``bfloat16``.
    """

    map: torch.Tensor
    drops: torch.Tensor
    computed: torch.Tensor
    intact: float
    mode: str
    evaluations: int
    work_fraction: float
    fell_back: bool
    fallback_ops: tuple[str, ...]
    precision: str = "float32"

    def record(self) -> dict[str, object]:
        """What an `Explanation`'s extras keep of it."""
        return {"mode": self.mode, "evaluations": self.evaluations, "work_fraction": round(self.work_fraction, 4),
                "fell_back": self.fell_back, "fallback_ops": list(self.fallback_ops), "precision": self.precision}


def _boxes(row_starts: np.ndarray, col_starts: np.ndarray, window: int, h: int, w: int) -> np.ndarray:
    """Boxes ``[r0, r1, c0, c1)`` of every window position, row-major."""
    rr, cc = np.meshgrid(row_starts, col_starts, indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    return np.stack([rr, np.minimum(rr + window, h), cc, np.minimum(cc + window, w)], 1).astype(np.int64)


def _coarse_axis(n: int, factor: int) -> np.ndarray:
    picks = list(range(0, n, factor))
    if picks[-1] != n - 1:
        picks.append(n - 1)
    return np.asarray(picks)


def _interpolate(coarse: np.ndarray, at_rows: np.ndarray, at_cols: np.ndarray, n_rows: int,
                 n_cols: int) -> np.ndarray:
    """Bilinear interpolation of values on the coarse positions onto the whole fine grid."""
    fine_r, fine_c = np.arange(n_rows), np.arange(n_cols)
    along_cols = np.stack([np.interp(fine_c, at_cols, row) for row in coarse])
    return np.stack([np.interp(fine_r, at_rows, col) for col in along_cols.T], 1)


def incremental_occlusion(
    net: nn.Module,
    x: torch.Tensor,
    target: Target,
    *,
    window: int,
    stride: int,
    fill: torch.Tensor | str = "zero",
    mode: Mode = "exact",
    batch_size: int = 64,
    tau: float = DEFAULT_TAU,
    tau_min_side: int = DEFAULT_TAU_MIN_SIDE,
    coverage: float = DEFAULT_COVERAGE,
    drill_factor: int = DEFAULT_DRILL_FACTOR,
    drill_fraction: float = DEFAULT_DRILL_FRACTION,
    precision: Literal["auto", "float32", "bfloat16"] = "auto",
) -> IncrementalOcclusion:
    """Sliding-window occlusion of ``x`` ``(1, C, H, W)`` by incremental inference.

    Window positions are `occlusion_windows`'s (captum's); ``fill`` is a `fill_image` kind or an
    image. ``mode="exact"`` scores every position and equals the full recompute up to float
    rounding; a layer whose changed window covers ``coverage`` of its map is computed in full.
    ``mode="approx"`` caps the changed windows at ``tau`` of the side of every map whose side is at
    least ``tau_min_side``, scores every ``drill_factor``-th position on each axis (and the last),
    then the fine positions next to the top ``drill_fraction`` of those by absolute drop, and
    interpolates the rest bilinearly (``drill_factor=1`` scores every position). A network that
    cannot be traced is scored in full, with a warning and ``fell_back``.

    ``precision``: approximate mode may also compute in bfloat16 (``"auto"``: where the CPU does
    bfloat16 natively, e.g. AVX512-BF16 or AMX; 2–3× faster convolutions there). Exact mode is
    always float32. Drops are taken against the score of an empty patch computed the same way,
    so the rounding of the two sides is alike.
    """
    from .engine import PerturbationEngine
    from .perturbation import fill_image, occlusion_windows

    if x.dim() != 4 or x.shape[0] != 1:
        raise ModelError(f"incremental occlusion takes one image (1, C, H, W), got {tuple(x.shape)}")
    if mode not in ("exact", "approx"):
        raise ModelError(f"incremental mode must be 'exact' or 'approx', got {mode!r}")
    if drill_factor < 1 or not 0 < drill_fraction <= 1:
        raise ModelError(f"drill_factor must be ≥ 1 and drill_fraction in (0, 1]; got {drill_factor}, "
                         f"{drill_fraction}")
    low = _precision(precision, mode, x)
    h, w = x.shape[-2:]
    rows = occlusion_windows(h, window, stride).to(x.device)
    cols = occlusion_windows(w, window, stride).to(x.device)
    n_rows, n_cols = len(rows), len(cols)
    fill_t = fill_image(x, fill) if isinstance(fill, str) else fill.to(x)
    boxes = _boxes(np.arange(n_rows) * stride, np.arange(n_cols) * stride, window, h, w)
    inet = incremental_net(net)
    if not inet.traced:
        warnings.warn(f"incremental occlusion: {inet.reason}; every patch is recomputed in full", RuntimeWarning,
                      stacklevel=2)
        engine = PerturbationEngine(net, target, batch_size=batch_size, progress=False)
        intact = float(engine.score(x)[0])

        def masks(start: int, stop: int) -> torch.Tensor:
            b = torch.as_tensor(boxes[start:stop], device=x.device)
            pr, pc = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
            in_r = (pr[None] >= b[:, 0:1]) & (pr[None] < b[:, 1:2])
            in_c = (pc[None] >= b[:, 2:3]) & (pc[None] < b[:, 3:4])
            return (~(in_r[:, :, None] & in_c[:, None, :])).unsqueeze(1).to(x.dtype)

        scores = engine.run_masks(x, fill_t, len(boxes), masks)
        drops = (intact - scores.double()).view(n_rows, n_cols)
        return IncrementalOcclusion(occlusion_map(rows, cols, drops.to(x)), drops.float(),
                                    torch.ones(n_rows, n_cols, dtype=torch.bool), intact, "full", len(boxes),
                                    1.0, True, (inet.reason,))
    # A last, empty patch: the unpatched image through the same arithmetic (and bfloat16 rounding), so
    # the drops are differences of like with like; the intact pass then skips what every patch recomputes.
    boxes = np.concatenate([boxes, np.zeros((1, 4), np.int64)])
    plan = inet.plan(x, boxes, mode=mode, tau=tau, coverage=coverage, tau_min_side=tau_min_side)
    plan.warn()
    computed = np.zeros((n_rows, n_cols), dtype=bool)
    values = np.zeros((n_rows, n_cols), dtype=np.float64)

    def score(positions: np.ndarray, with_intact: bool = False) -> float:
        flat = positions[:, 0] * n_cols + positions[:, 1]
        if with_intact:
            flat = np.append(flat, len(boxes) - 1)
        result = plan.scores(x, fill_t, target, batch_size=batch_size, subset=flat, precision=low)
        got = result.scores.double().numpy()
        values[positions[:, 0], positions[:, 1]] = got[:len(positions)]
        computed[positions[:, 0], positions[:, 1]] = True
        return float(got[-1]) if with_intact else float("nan")

    if mode == "exact" or drill_factor == 1:
        intact = score(np.argwhere(np.ones((n_rows, n_cols), dtype=bool)), True)
        drops = intact - values
    else:
        at_r, at_c = _coarse_axis(n_rows, drill_factor), _coarse_axis(n_cols, drill_factor)
        intact = score(np.stack(np.meshgrid(at_r, at_c, indexing="ij"), -1).reshape(-1, 2), True)
        coarse = intact - values[np.ix_(at_r, at_c)]
        k = max(1, math.ceil(drill_fraction * coarse.size))
        chosen = np.argsort(-np.abs(coarse).ravel(), kind="stable")[:k]
        wanted = np.zeros((n_rows, n_cols), dtype=bool)
        reach = drill_factor // 2  # the fine positions nearer to the chosen coarse one than to its neighbours
        for flat in chosen:
            r, c = at_r[flat // len(at_c)], at_c[flat % len(at_c)]
            wanted[max(0, r - reach):r + reach + 1, max(0, c - reach):c + reach + 1] = True
        todo = np.argwhere(wanted & ~computed)
        if len(todo):
            score(todo)
        drops = _interpolate(coarse, at_r, at_c, n_rows, n_cols)
        drops[computed] = intact - values[computed]
    drops_t = torch.as_tensor(drops, dtype=torch.float64)
    heat = occlusion_map(rows, cols, drops_t.to(x.device, x.dtype))
    n_scored = int(computed.sum())
    return IncrementalOcclusion(heat, drops_t.float(), torch.as_tensor(computed), intact, mode, n_scored,
                                plan.work_fraction, bool(plan.fallback_ops), plan.fallback_ops, low)


def _precision(setting: str, mode: Mode, x: torch.Tensor) -> Precision:
    """The arithmetic to run: float32 in exact mode, and wherever bfloat16 would be emulated."""
    if setting not in ("auto", "float32", "bfloat16"):
        raise ModelError(f"precision must be 'auto', 'float32' or 'bfloat16', got {setting!r}")
    if mode == "exact":
        if setting == "bfloat16":
            raise ModelError("exact incremental occlusion computes in float32; bfloat16 is for mode='approx'")
        return "float32"
    if setting == "auto":
        native = x.device.type == "cpu" and x.dtype == torch.float32 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return "bfloat16" if native else "float32"
    return setting  # type: ignore[return-value]


def map_ssim(reference: torch.Tensor | np.ndarray, other: torch.Tensor | np.ndarray) -> float:
    """Structural similarity (scikit-image's SSIM, 7×7 windows) of a map to a reference map,
    on the reference's value range."""
    from skimage.metrics import structural_similarity

    a = np.asarray(reference.detach().cpu() if isinstance(reference, torch.Tensor) else reference, np.float64)
    b = np.asarray(other.detach().cpu() if isinstance(other, torch.Tensor) else other, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ModelError(f"SSIM needs two maps of one shape, got {a.shape} and {b.shape}")
    span = float(a.max() - a.min())
    return float(structural_similarity(a, b, data_range=span if span > 0 else 1.0))
