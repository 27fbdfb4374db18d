"""adaLN-single time conditioning of the denoiser (PixArt-alpha, Chen et al. 2023, arXiv:2310.00426;
the sinusoidal embedding of DiT, Peebles and Xie 2023, arXiv:2212.09748)."""

from __future__ import annotations

import math

import torch
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, with shift/scale [b, d] broadcast over the sequence of x [b, l, d]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(1000 t f), sin(1000 t f)] with f_i = max_period^(-i / (dim/2)). t [b] -> [b, dim], float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedder(nn.Module):
    """sinusoid(t) -> Linear -> SiLU -> Linear: [b] -> [b, hidden]. Weights `mlp.0`, `mlp.2`."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_sinusoid(t, self.frequency_dim).to(self.mlp[0].weight.dtype))
