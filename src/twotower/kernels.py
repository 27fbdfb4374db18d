"""The Mamba-2 mixer's conv and scan, each through one function that picks the fused CUDA kernel
where it can run and this package's PyTorch code everywhere else.

The kernels are those of `causal-conv1d` (Dao-AILab/causal-conv1d, `causal_conv1d_interface.py`:
`causal_conv1d_fn`, `causal_conv1d_update`) and `mamba-ssm` (state-spaces/mamba,
`ops/triton/ssd_combined.py`: `mamba_chunk_scan_combined`; `ops/triton/selective_state_update.py`:
`selective_state_update`). A kernel is used when its package imports and every tensor is on CUDA;
otherwise, or inside `use_kernels(False)`, ours (`conv.py`, `ssd.py`) run, the per-function fallback
transformers' `modeling_nemotron_h.py` makes too.

Every function keeps our contract whichever runs: conv outputs, scan outputs and SSM states float32;
the conv history [b, conv_dim, K-1] in the inputs' dtype; dt already softplus'd and clamped (the
kernels get no dt bias, no softplus and their default, open limit, so they use dt as it is); no
argument is changed in place (the kernels that update a state get a fresh copy). The step kernels
have no backward: with gradients wanted, ours run.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections import Counter

import torch

from .conv import causal_conv, causal_conv_step
from .precision import without_autocast
from .ssd import ssd_chunked, ssd_step

# operation -> (module, function) of the kernel that can replace ours
MAMBA_KERNELS = {
    "mamba_conv": ("causal_conv1d", "causal_conv1d_fn"),
    "mamba_conv_step": ("causal_conv1d", "causal_conv1d_update"),
    "mamba_scan": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
    "mamba_scan_step": ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update"),
}

kernel_calls: Counter = Counter()  # operation -> how many times its kernel ran in this process
_enabled = True


@functools.cache
def kernel_for(operation: str):
    """The kernel function for `operation`, or None where its package does not import (absent, or
    built for another torch or CUDA)."""
    module, name = MAMBA_KERNELS[operation]
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - any failure to load a compiled extension means: use ours
        return None


def kernels_available() -> dict[str, bool]:
    """operation -> whether its kernel imports here."""
    return {operation: kernel_for(operation) is not None for operation in MAMBA_KERNELS}


@contextlib.contextmanager
def use_kernels(enabled: bool):
    """Within the block, allow the kernels (True, the default) or run ours only (False)."""
    global _enabled
    before, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = before


def kernel_or_ours(operation: str, *tensors: torch.Tensor | None) -> str:
    """"kernel" where `operation`'s kernel can run on these tensors (its package imports, all are on
    CUDA, kernels are allowed, and torch.compile is not tracing: a compiled graph makes its own
    kernels from ours), else "ours". The functions below add their kernel's own limits (the conv's
    width and channels; no gradients through the step kernels)."""
    if torch.compiler.is_compiling():
        return "ours"
    tensors = [t for t in tensors if t is not None]
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    return "kernel" if _enabled and on_cuda and kernel_for(operation) is not None else "ours"


def _grad_wanted(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _conv_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """causal-conv1d's limits: width 2..4, and (channel-last layout) channels a multiple of 8."""
    return 2 <= weight.shape[-1] <= 4 and x.shape[-1] % 8 == 0


def _channel_last(t: torch.Tensor) -> torch.Tensor:
    """[b, l, c] (any dtype) -> a float32 [b, c, l] view whose channels are contiguous: the layout in
    which causal_conv1d_fn takes initial states."""
    return torch.empty(t.shape, dtype=torch.float32, device=t.device).copy_(t).transpose(1, 2)


@without_autocast
def mamba_conv(x: torch.Tensor, weight: torch.Tensor, bias, history: torch.Tensor | None):
    """`conv.causal_conv`: x [b, l, c], weight [c, K], history [b, c, K-1] or None ->
    (out [b, l, c] float32, history [b, c, K-1] in x's dtype)."""
    if kernel_or_ours("mamba_conv", x, weight) == "ours" or not _conv_fits(x, weight):
        return causal_conv(x, weight, bias, history)
    kernel_calls["mamba_conv"] += 1
    b, l, c = x.shape
    k1 = weight.shape[-1] - 1
    history = x.new_zeros(b, c, k1) if history is None else history.to(x.dtype)
    out = kernel_for("mamba_conv")(
        _channel_last(x), weight.float().contiguous(), None if bias is None else bias.float().contiguous(),
        initial_states=_channel_last(history.transpose(1, 2)), activation="silu")
    # the new history is the last K-1 raw inputs, taken here (as ours does) at any length, even below K-1
    new_history = torch.cat([history, x.transpose(1, 2)], dim=-1)[:, :, -k1:].contiguous()
    return out.transpose(1, 2), new_history


@without_autocast
def mamba_conv_step(x: torch.Tensor, weight: torch.Tensor, bias, history: torch.Tensor):
    """`conv.causal_conv_step`: x [b, c], history [b, c, K-1] -> (out [b, c] float32, history)."""
    if (kernel_or_ours("mamba_conv_step", x, weight, history) == "ours" or not _conv_fits(x, weight)
            or _grad_wanted(x, weight, bias, history)):
        return causal_conv_step(x, weight, bias, history)
    kernel_calls["mamba_conv_step"] += 1
    # A state of K columns, the oldest a placeholder: releases that keep K columns shift it left by
    # one and read all K, those that keep K-1 or more read the last K-1; both see [history, x].
    state = torch.cat([history.new_zeros(history.shape[0], history.shape[1], 1), history], dim=-1).float()
    out = kernel_for("mamba_conv_step")(x.float(), state, weight.float().contiguous(),
                                         None if bias is None else bias.float().contiguous(), activation="silu")
    return out, state[:, :, 1:].to(x.dtype)


@without_autocast
def mamba_scan(x, dt, A, B, C, chunk_size: int, initial_state=None, final_state: bool = True):
    """`ssd.ssd_chunked` with states "final" (True) or None (False) -> (y float32, state or None)."""
    if kernel_or_ours("mamba_scan", x, dt, B, C) == "ours":
        return ssd_chunked(x, dt, A, B, C, chunk_size, initial_state, states="final" if final_state else None)
    kernel_calls["mamba_scan"] += 1
    result = kernel_for("mamba_scan")(
        x.float(), dt.float(), A.float(), B.float(), C.float(), chunk_size,
        initial_states=None if initial_state is None else initial_state.float(), return_final_states=final_state)
    return result if final_state else (result, None)


@without_autocast
def mamba_scan_step(state, x, dt, A, B, C):
    """`ssd.ssd_step`: state [b, h, p, n]; x [b, h, p]; dt [b, h]; B, C [b, g, n] -> (y [b, h, p],
    new state), float32."""
    if kernel_or_ours("mamba_scan_step", state, x, dt, B, C) == "ours" or _grad_wanted(state, x, dt, A, B, C):
        return ssd_step(state, x, dt, A, B, C)
    kernel_calls["mamba_scan_step"] += 1
    b, h, p = x.shape
    n = B.shape[-1]
    new_state = state.float().clone()  # updated in place by the kernel
    y = kernel_for("mamba_scan_step")(
        new_state, x.float(), dt.float()[..., None].expand(b, h, p), A.float()[:, None, None].expand(h, p, n),
        B.float(), C.float(), dt_softplus=False)  # no dt_bias: ours is in dt already
    return y, new_state
