"""The non-gated squared-ReLU MLP: dense '-' layers, MoE experts and the shared expert."""

from __future__ import annotations

import torch
from torch import nn

from .linear import Linear


def relu2_(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 in place: x must be a fresh activation (an up projection's output) that nothing
    else reads. No new tensor in inference; autograd keeps what the backward needs."""
    return x.clamp_min_(0).square_()


class MLP(nn.Module):
    """down_proj(relu(up_proj(x))^2)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(relu2_(self.up_proj(x)))
