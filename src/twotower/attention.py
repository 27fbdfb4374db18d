"""Grouped-query attention without positional encoding (NoPE), as in NemotronH."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear

KVState = tuple[torch.Tensor, torch.Tensor]  # (k, v), each [b, kv_heads, s, head_dim]


CAUSAL = "causal"  # a mask: query i sees keys 0..i and no others (lq == lk), without building it


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | str | None) -> torch.Tensor:
    """Softmax attention of q [b, h, lq, d] over k, v [b, kv_heads, lk, d].

    mask: bool, broadcastable to [b, h, lq, lk], True where a query may look; None = everything;
    CAUSAL. Each kv head serves h / kv_heads consecutive query heads. A query row that may see no
    key returns zeros (a fully padded row), never NaN.
    """
    gqa = q.shape[1] != k.shape[1]
    if mask is None or isinstance(mask, str):
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask == CAUSAL, enable_gqa=gqa)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out.masked_fill(~mask.any(-1, keepdim=True), 0.0)


class Attention(nn.Module):
    """q/k/v projections, attention over [past keys ; own keys], o_proj.

    forward(u [b, l, d], state=(k_past, v_past) or None, mask) -> (out [b, l, d], (k_all, v_all)).
    The caller owns the mask (see `attend`): causal for the context tower (CAUSAL when it starts a
    sequence without padding), none (bidirectional block plus the context's keys) for the
    denoiser, block-causal in training.
    """

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def forward(self, u: torch.Tensor, state: KVState | None = None, mask: torch.Tensor | str | None = None):
        b, l, _ = u.shape
        q = self.q_proj(u).view(b, l, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(u).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(u).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if state is not None:
            k = torch.cat([state[0].to(k.dtype), k], dim=2)
            v = torch.cat([state[1].to(v.dtype), v], dim=2)
        out = attend(q, k, v, mask).transpose(1, 2).reshape(b, l, -1)
        return self.o_proj(out), (k, v)
