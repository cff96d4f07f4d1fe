"""A fast inference copy of dlib-resnet: frozen affines folded into the convolutions, channels_last, oneDNN.

Explanations need the network as it is, with every affine, ReLU and residual sum a module that hooks
can see (:mod:`facelens.models.dlib_resnet`). Plain batched embedding needs none of that, so it may
run a rewritten copy that does less work:

- **fold**: dlib's ``affine_`` layers are frozen per-channel ``γ·x + β`` after a convolution; folding
  them into that convolution's weights and bias removes 29 passes over the activations. The input
  normalization ``(255·x − mean) / 256`` folds into the stem convolution too, exactly, because that
  convolution has no padding (a padded one would see normalized zeros, not raw ones).
- **channels_last** (NHWC) is the layout oneDNN's convolutions prefer on CPU: no reorders between layers.
- **oneDNN fusion**: ``torch.jit.freeze`` + ``optimize_for_inference`` of the traced, folded net turns
  conv + ReLU (and conv + add) into single oneDNN primitives with pre-packed weights.

Which of those helps is measured by ``python -m bench.embedding_speed`` (``--variants``); the default
``mode="jit"`` is the fastest there (the README quotes the numbers). ``torch.compile`` is offered as
``mode="compile"`` but is not the default: its first call compiles for tens of seconds and, measured
here, it was not faster than the frozen oneDNN graph.

The copy is cached per network and rebuilt when any parameter or buffer of the original changes
(identity or in-place version), so randomizing weights for a sanity check cannot leave a stale copy.
"""

from __future__ import annotations

import copy
import itertools
import threading
import warnings
import weakref
from typing import Literal

import torch
from torch import nn

from .dlib_resnet import DlibResNet
from .layers import Normalize

__all__ = ["MODES", "FastNet", "fast_net", "fold", "fold_conv_affine", "fold_normalize"]

Mode = Literal["eager", "channels_last", "jit", "compile"]
MODES: tuple[str, ...] = ("eager", "channels_last", "jit", "compile")


@torch.no_grad()
def fold_conv_affine(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Make ``conv`` compute ``bn(conv(x))`` (bn frozen: running statistics), in place."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    new_bias = (bias - bn.running_mean) * scale + bn.bias
    conv.bias = nn.Parameter(new_bias.detach().clone(), requires_grad=False)


@torch.no_grad()
def fold_normalize(norm: Normalize, conv: nn.Conv2d) -> None:
    """Make ``conv`` compute ``conv(norm(x))``, in place; only exact for an unpadded convolution."""
    if conv.padding not in ((0, 0), "valid"):
        raise ValueError("folding the input normalization needs a convolution without padding")
    scale = (norm.pixel_range / norm.scale).flatten()  # per input channel (or one for all)
    shift = (norm.mean / norm.scale).flatten()
    scale = scale.expand(conv.in_channels) if scale.numel() == 1 else scale
    shift = shift.expand(conv.in_channels) if shift.numel() == 1 else shift
    w = conv.weight
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
    conv.bias = nn.Parameter(bias - (w * shift.view(1, -1, 1, 1)).sum(dim=(1, 2, 3)), requires_grad=False)
    w.mul_(scale.view(1, -1, 1, 1))


def fold(net: DlibResNet) -> DlibResNet:
    """A copy of ``net`` with every affine and the input normalization folded into a convolution.

    The pairs are read from :meth:`DlibResNet.dlib_layers` (dlib's own layer order), so only an affine
    that directly follows a convolution is folded; the folded affines become ``Identity``.
    """
    out = copy.deepcopy(net).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    order = [m for kind, _, m in out.dlib_layers() if kind == "add_layer"]
    parents = {id(child): (parent, name) for parent in out.modules() for name, child in parent.named_children()}
    for prev, mod in itertools.pairwise(order):
        if isinstance(prev, nn.Conv2d) and isinstance(mod, nn.BatchNorm2d):
            fold_conv_affine(prev, mod)
            parent, name = parents[id(mod)]
            setattr(parent, name, nn.Identity())
    fold_normalize(out.normalize, out.stem.conv)
    out.normalize = nn.Identity()  # type: ignore[assignment]
    return out


class FastNet(nn.Module):
    """The optimized copy behind one call signature: NCHW float RGB in [0, 1] in, embeddings out."""

    def __init__(self, net: DlibResNet, mode: Mode = "jit", example_batch: int = 8) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        self.mode = mode
        folded = fold(net)
        self.channels_last = mode != "eager"
        if self.channels_last:
            folded = folded.to(memory_format=torch.channels_last)
        h = w = 150
        if mode == "jit":
            example = torch.rand(example_batch, 3, h, w).contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), warnings.catch_warnings():
                # deprecation notices, and PadAdd's shape tests becoming constants: right for fixed 150×150
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(folded, example, check_trace=False)
                self.impl: nn.Module = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        elif mode == "compile":
            self.impl = torch.compile(folded, dynamic=False)  # type: ignore[assignment]
        else:
            self.impl = folded

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.impl(x).contiguous()


_cache: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str, FastNet]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _fingerprint(net: nn.Module) -> tuple:
    return tuple((id(t), t._version) for t in (*net.parameters(), *net.buffers()))


def fast_net(net: nn.Module, mode: Mode = "jit") -> FastNet | None:
    """The cached fast copy of ``net`` (built on first use), or None when there is none for its type.

    Only :class:`DlibResNet` has one; other networks run as they are.
    """
    if type(net) is not DlibResNet:
        return None
    key = _fingerprint(net)
    with _lock:
        hit = _cache.get(net)
        if hit is not None and hit[0] == key and hit[1] == mode:
            return hit[2]
        fast = FastNet(net, mode)  # type: ignore[arg-type]
        _cache[net] = (key, mode, fast)
        return fast
