"""Fast inference copies of a network: what runs when only its outputs are needed.

Two kinds. dlib-resnet gets a folded, traced and frozen copy (below). Every other network of at
most ``CHANNELS_LAST_MAX_PARAMS`` parameters gets a ``channels_last`` copy (:func:`inference_net`):
PyTorch's CPU convolutions, and above all the depthwise ones of fer-emotion's mini-Xception, are
much faster on NHWC memory (bench ``explain``: fer-emotion's forward 2–3.7× faster, dlib-age and
dlib-gender 1.2–1.8×). A copy is checked against the network on its first batch and used only when
it gives the same outputs, so a user model that breaks on NHWC memory simply runs as it is.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .dlib_resnet import DlibResNet
from .layers import Normalize

__all__ = ["CHANNELS_LAST_MAX_PARAMS", "MODES", "ChannelsLastNet", "FastNet", "fast_net", "fold", "fold_conv_affine",
           "fold_normalize", "inference_net", "passive", "watched"]

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


@dataclass(frozen=True)
class _Anatomy:
    """What the per-call checks read of a network, listed once: its submodules' parameter and
    buffer dicts, and their hook dicts. Walking the module tree on every scoring call cost about
    1 ms, 8% of a small method's time (fer-emotion region occlusion). The dicts are the modules'
    own, so replaced or updated weights and added hooks are seen; a submodule attached after the
    first call is not."""

    tensors: tuple[dict, ...]
    hooks: tuple[dict, ...]


_anatomies: weakref.WeakKeyDictionary[nn.Module, _Anatomy] = weakref.WeakKeyDictionary()


def _anatomy(net: nn.Module) -> _Anatomy:
    found = _anatomies.get(net)
    if found is None:
        below = tuple(net.modules())[1:]  # without ``net``: a value that held its key would keep it alive
        found = _anatomies[net] = _Anatomy(
            tuple(d for m in below for d in (m._parameters, m._buffers)),
            tuple(d for m in below for d in (m._forward_hooks, m._forward_pre_hooks)))
    return found


def _fingerprint(net: nn.Module) -> tuple:
    """Identity and in-place version of every parameter and buffer: changes when any weight does."""
    dicts = (net._parameters, net._buffers, *_anatomy(net).tensors)
    return tuple((id(t), t._version) for d in dicts for t in d.values() if t is not None)


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


CHANNELS_LAST_MAX_PARAMS = 50_000_000
"""Larger networks (VGG16: 138 M) are not copied: the copy would cost as much memory again."""
_MATCH_TOLERANCE = 1e-4  # relative to the outputs' scale: float reordering only


class ChannelsLastNet(nn.Module):
    """A frozen copy of a network with channels_last weights: NCHW in, the same outputs out.

    Gradients flow to the input (the parameters are frozen), so input-gradient methods can run on
    it as well as forward-only scoring. dlib-resnet's copy also has its affines folded (:func:`fold`).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        # built outside inference mode even when first asked for inside it (the engine): inference
        # tensors as weights would refuse a later input-gradient pass
        with torch.inference_mode(False), torch.no_grad():
            # dlib-resnet's affines fold into its convolutions exactly (and keep autograd): fewer passes
            base = fold(net) if type(net) is DlibResNet else copy.deepcopy(net)
            self.impl = base.eval().to(memory_format=torch.channels_last)
        for p in self.impl.parameters():
            p.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.impl(x.contiguous(memory_format=torch.channels_last)).contiguous()


def passive(hook: Callable) -> Callable:
    """Mark a hook as one that only counts or times calls: it does not stop copies being used.

    The bench's batch recorders are such hooks; they hook the copies too.
    """
    hook.__facelens_passive__ = True  # type: ignore[attr-defined]
    return hook


def _active(hooks: dict) -> bool:
    return bool(hooks) and any(not getattr(h, "__facelens_passive__", False) for h in hooks.values())


def watched(net: nn.Module) -> bool:
    """True when hooks watch ``net`` or training mode is on: then only the network itself is right.

    A hook means someone observes layers (CAM activations, a probe) that a copy would not have;
    training mode means batch statistics a frozen copy would not compute. :func:`passive` hooks
    do not count.
    """
    from torch.nn.modules import module as torch_module

    if net.training or _active(torch_module._global_forward_hooks) or _active(
            torch_module._global_forward_pre_hooks):
        return True
    if _active(net._forward_hooks) or _active(net._forward_pre_hooks):
        return True
    # ``any`` over the dicts first: nearly always every one is empty, and that test runs in C
    hooks = _anatomy(net).hooks
    return any(hooks) and any(_active(h) for h in hooks)


@dataclass
class _Copy:
    fingerprint: tuple
    net: ChannelsLastNet
    same: dict[tuple, bool] = field(default_factory=dict)  # per input shape: does it match the network?


_copies: weakref.WeakKeyDictionary[nn.Module, _Copy] = weakref.WeakKeyDictionary()


def _same_outputs(net: nn.Module, copy_: nn.Module, example: torch.Tensor) -> bool:
    """Outputs equal on two rows of ``example`` and a seeded random row (an example may be blank)."""
    noise = torch.rand((1, *example.shape[1:]), generator=torch.Generator().manual_seed(0)).to(example)
    probe = torch.cat([example.detach()[:2], noise])
    try:
        with torch.inference_mode():
            want, got = net(probe), copy_(probe)
    except Exception:  # a layer that cannot take NHWC memory: run the network as it is
        return False
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or want.shape != got.shape:
        return False
    scale = float(want.abs().max()) if want.numel() else 0.0
    return bool(torch.allclose(got, want, rtol=_MATCH_TOLERANCE, atol=_MATCH_TOLERANCE * max(scale, 1e-6)))


def inference_net(net: nn.Module, example: torch.Tensor | None = None, *, grad: bool = False) -> nn.Module:
    """What to run when only the outputs of ``net`` on batches like ``example`` are needed
    (``grad``: and their gradients with respect to the input).

    dlib-resnet's fused copy (:func:`fast_net`; it has no autograd, so not with ``grad``), a
    channels_last copy (checked on two rows of ``example`` against ``net`` once per weights and
    input shape), or ``net`` itself: when it is watched (:func:`watched`), too large to copy, or
    its copy does not give the same outputs. Copies are rebuilt when any parameter or buffer of
    ``net`` changes.
    """
    if watched(net):
        return net
    if type(net) is DlibResNet and not grad:
        if example is None or tuple(example.shape[1:]) == (3, 150, 150):
            return fast_net(net) or net
        return net
    if example is None:
        return net
    fingerprint, shape = _fingerprint(net), (tuple(example.shape[1:]), example.dtype, str(example.device))
    with _lock:
        held = _copies.get(net)
        if held is None or held.fingerprint != fingerprint:
            if sum(p.numel() for p in net.parameters()) > CHANNELS_LAST_MAX_PARAMS:
                return net
            held = _copies[net] = _Copy(fingerprint, ChannelsLastNet(net))
        if shape not in held.same:
            held.same[shape] = _same_outputs(net, held.net, example)
        return held.net if held.same[shape] else net
