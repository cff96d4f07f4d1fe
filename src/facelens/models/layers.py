"""Small explicit modules that our ports are built from.

Hook-based explainers (LRP, EBP, DeepLIFT, Guided Backprop) need every
operation that mixes tensors to be a module they can see, and no module to be
used twice or to work in place. Our ports are written in that canonical form
from the start, so no canonizer has to rewrite them later.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Add", "Normalize", "RGBToGray"]


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
