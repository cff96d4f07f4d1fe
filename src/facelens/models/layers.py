"""Small explicit modules that our ports are built from.

Hook-based explainers (LRP, EBP, DeepLIFT, Guided Backprop) need every
operation that mixes tensors to be a module they can see, and no module to be
used twice or to work in place. Our ports are written in that canonical form
from the start, so no canonizer has to rewrite them later.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError

__all__ = ["Add", "Affine", "Normalize", "PadAdd", "RGBToGray"]


class Add(nn.Module):
    """A residual sum as a module, so relevance rules can split it between branches."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Normalize(nn.Module):
    """Map RGB in [0, 1] to the network's own input scale: ``(255·x − mean) / scale``.

    Keeping this inside the network makes every explanation live in pixel space,
    so baselines such as black or blurred images mean what they say.
    """

    def __init__(self, mean: tuple[float, ...], scale: float | tuple[float, ...], pixel_range: float = 255.0):
        super().__init__()
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        scale_t = torch.tensor(scale, dtype=torch.float32).reshape(-1)
        self.register_buffer("mean", mean_t)
        self.register_buffer("scale", scale_t.view(1, -1, 1, 1))
        self.pixel_range = float(pixel_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.pixel_range - self.mean) / self.scale

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, scale={self.scale.flatten().tolist()}, range={self.pixel_range}"


class RGBToGray(nn.Module):
    """ITU-R BT.601 luma, as OpenCV's ``cvtColor(RGB2GRAY)`` computes it, kept differentiable."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weights).sum(dim=1, keepdim=True)


class Affine(nn.BatchNorm2d):
    """dlib's ``affine_`` layer, a batch norm frozen into ``gamma·x + beta`` per channel.

    It is a ``BatchNorm2d`` with running mean 0, variance 1 and eps 0, so generic
    conv-BN folding (zennit canonizers, ``torch.fx`` fusion) recognizes and merges it
    exactly, but it always uses the stored statistics: ``train()`` cannot turn it into
    a batch-statistics layer dlib never had.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=0.0, momentum=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


class PadAdd(Add):
    """A residual sum that zero-pads the smaller input at its end, as dlib's ``add_prev`` does.

    PyTorch would refuse to broadcast 3×3 against 4×4 (or 128 against 256 channels);
    dlib instead sizes the output to the larger extent in every dimension and treats
    missing entries as zero, keeping the origin at the top-left.
    """

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape == b.shape:
            return a + b
        if a.dim() != 4 or b.dim() != 4 or a.shape[0] != b.shape[0]:
            raise ModelError(f"PadAdd needs two N×C×H×W tensors of one batch, "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}")
        channels, rows, cols = (max(sa, sb) for sa, sb in zip(a.shape[1:], b.shape[1:], strict=True))
        return self._pad_to(a, channels, rows, cols) + self._pad_to(b, channels, rows, cols)

    @staticmethod
    def _pad_to(x: torch.Tensor, channels: int, rows: int, cols: int) -> torch.Tensor:
        pads = (0, cols - x.shape[3], 0, rows - x.shape[2], 0, channels - x.shape[1])
        return F.pad(x, pads) if any(pads) else x
