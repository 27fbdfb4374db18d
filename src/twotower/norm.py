"""RMSNorm and the gated group RMSNorm of the Mamba-2 mixer, computed in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last axis, in float32, rounded once to x's dtype.

    The kernel computes in float32 for bfloat16 and float16 inputs: bitwise the same as casting x
    and the weight to float32 and the result back (tested), without the three casts.
    """
    return F.rms_norm(x, x.shape[-1:], weight.to(x.dtype), eps)


def gated_group_rms_norm(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float
) -> torch.Tensor:
    """Mamba-2 output norm: v = y * silu(z), RMS-normalised per group of `group_size` channels.

    The gate is applied before the norm (`norm_before_gate=False`), as the checkpoints expect.
    y, z: [..., d] -> [..., d] in y's dtype.
    """
    v = F.silu(z.float()).mul_(y.float())  # in place on the gate's fresh output; contiguous for the norm
    groups = F.rms_norm(v.unflatten(-1, (-1, group_size)), (group_size,), eps=eps)
    return weight * groups.flatten(-2).to(y.dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_group_rms_norm(y, z, self.weight, self.group_size, self.eps)
