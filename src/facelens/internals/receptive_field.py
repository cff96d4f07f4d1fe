"""Receptive fields of feature-map positions, in chip pixels, found from gradients.

Why gradients rather than walking the layers' kernel sizes and strides: our ports contain residual
sums with dlib's zero-padding add (``PadAdd``), average-pool shortcuts, "same"-padded pools and
depthwise-separable blocks, and a user's wrapped network can contain anything. Layer arithmetic would
need a rule per module type and per wiring; the gradient support does not. To make the support equal
the *theoretical* receptive field (every input pixel any path can reach) rather than the part one
input happens to use, gradients are taken through a copy of the forward pass in which every ReLU
passes gradients everywhere and every max-pool is replaced by the average pool of the same window.
What remains is a composition of linear maps, whose gradient is non-zero exactly on the pixels a path
reaches (barring exact cancellation of weights, which we do not expect in trained filters).
Positions near the border get clipped boxes, as they should.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ModelError
from .activation_max import layer_outputs

if TYPE_CHECKING:
    from ..models.base import FaceModel

__all__ = ["receptive_fields"]


class _PassReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def _linearize(model: FaceModel) -> list[torch.utils.hooks.RemovableHandle]:
    handles = []
    for m in model.net.modules():
        if isinstance(m, torch.nn.ReLU):
            handles.append(m.register_forward_hook(lambda _m, inp, _o: _PassReLU.apply(inp[0])))
        elif isinstance(m, torch.nn.MaxPool2d):
            if m.dilation not in (1, (1, 1)) or m.return_indices:
                continue

            def avg(mod: torch.nn.MaxPool2d, inp: tuple[torch.Tensor, ...], _o: torch.Tensor) -> torch.Tensor:
                return F.avg_pool2d(inp[0], mod.kernel_size, mod.stride, mod.padding, ceil_mode=mod.ceil_mode,
                                    count_include_pad=True)

            handles.append(m.register_forward_hook(avg))
    return handles


Box = tuple[int, int, int, int]


def receptive_fields(model: FaceModel, layer: str, positions: Sequence[tuple[int, int]], *,
                     size: tuple[int, int] | None = None, chunk: int = 32) -> dict[tuple[int, int], Box]:
    """Box ``(x0, y0, x1, y1)`` (chip pixels, end-exclusive) of every (row, col) position of ``layer``.

    ``size`` is the input (H, W); default the model's. Boxes are cached per call only: positions of one
    layer at one size are cheap (one backward pass per ``chunk`` positions).
    """
    hw = tuple(size or model.input_size)
    unique = list(dict.fromkeys((int(r), int(c)) for r, c in positions))
    out: dict[tuple[int, int], Box] = {}
    gen = torch.Generator().manual_seed(0)
    for start in range(0, len(unique), chunk):
        part = unique[start:start + chunk]
        x = torch.rand(len(part), 3, *hw, generator=gen).requires_grad_(True)
        handles = _linearize(model)
        try:
            act = layer_outputs(model, [layer], x)[layer]
        finally:
            for h in handles:
                h.remove()
        if act.dim() != 4:
            raise ModelError(f"{model.name}: layer {layer!r} has no spatial map (shape {tuple(act.shape)})")
        rows = torch.tensor([p[0] for p in part])
        cols = torch.tensor([p[1] for p in part])
        if (rows >= act.shape[2]).any() or (cols >= act.shape[3]).any() or (rows < 0).any() or (cols < 0).any():
            raise ModelError(f"{model.name}: a position is outside the {act.shape[2]}×{act.shape[3]} map of {layer!r}")
        idx = torch.arange(len(part))
        target = act[idx, :, rows, cols].sum()
        (grad,) = torch.autograd.grad(target, x)
        support = grad.abs().sum(1).numpy() > 0
        for k, pos in enumerate(part):
            ys, xs = np.nonzero(support[k])
            if len(ys) == 0:
                raise ModelError(f"{model.name}: position {pos} of {layer!r} has no gradient to the input")
            out[pos] = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return out
