"""Mamba-2's depthwise causal conv over time, then SiLU, in float32: over a sequence and one step.

Both take the previous K-1 raw inputs as the conv history [b, conv_dim, K-1] (zeros for a fresh
sequence) and return it updated, in the inputs' dtype. The outputs stay float32 for the scan, which
works in float32, as the CUDA kernels' accumulator does (causal-conv1d's `causal_conv1d_fn` and
`causal_conv1d_update`, which `kernels.py` uses on CUDA when installed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias, history: torch.Tensor | None):
    """Depthwise causal conv over time, then SiLU, in float32.

    x [b, l, c] raw inputs; weight [c, K]; history [b, c, K-1] the previous K-1 raw inputs (zeros
    for a fresh sequence). Returns (out [b, l, c] float32, new history [b, c, K-1] in x's dtype).

    K multiply-adds over time-major slices in float32, like the kernels' accumulator. The output
    stays float32 for the scan, which works in float32: no rounding to x's dtype and back; faster
    than the conv kernel on CPUs (measured in the README's Performance section).
    """
    l, k = x.shape[1], weight.shape[-1]
    history = x.new_zeros(x.shape[0], x.shape[2], k - 1) if history is None else history.to(x.dtype)
    seq = torch.cat([history.transpose(1, 2), x], dim=1)  # [b, K-1+l, c]
    new_history = seq[:, l:].transpose(1, 2).contiguous()
    seq, w = seq.float(), weight.float().T.contiguous()  # w [K, c]
    out = seq[:, :l] * w[0] if bias is None else torch.addcmul(bias.float(), seq[:, :l], w[0])
    for i in range(1, k):
        out.addcmul_(seq[:, i:i + l], w[i])
    return F.silu(out, inplace=True), new_history


def causal_conv_step(x: torch.Tensor, weight: torch.Tensor, bias, history: torch.Tensor):
    """`causal_conv` for one position in fewer ops: x [b, c] -> (out [b, c] float32, new history
    [b, c, K-1] in x's dtype)."""
    window = torch.cat([history.to(x.dtype), x[:, :, None]], dim=-1)  # [b, c, K]
    out = (window.float() * weight.float()).sum(-1)
    out = F.silu(out if bias is None else out + bias.float())
    return out, window[:, :, 1:]
