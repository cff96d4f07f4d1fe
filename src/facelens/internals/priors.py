"""Image priors shared by activation maximization and feature inversion."""

from __future__ import annotations

import torch

__all__ = ["total_variation"]


def total_variation(x: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Mean TV^β of an N×C×H×W batch, per image (shape N): Mahendran & Vedaldi's smoothness prior.

    β = 2 is the usual choice; β = 1 is the classic (anisotropic-free) TV and favours flat patches.
    """
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    tv = (dx[..., :-1, :] ** 2 + dy[..., :, :-1] ** 2).clamp_min(1e-12) ** (beta / 2)
    return tv.flatten(1).mean(1)
