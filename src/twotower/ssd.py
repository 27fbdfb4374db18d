"""The Mamba-2 state-space recurrence: a chunked scan for sequences, a step for decoding.

Per head h with state S of shape [P, N] and group g(h) = h // (heads / groups):

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t (outer) B_t
    y_t = S_t @ C_t                                   (the D skip is added by the mixer)

`ssd_chunked` computes exactly this with the SSD block decomposition (quadratic inside a chunk,
recurrent across chunks); `ssd_sequential` is the plain loop it is tested against. Everything
runs in float32: seeded states can be O(1e3) and overflow bfloat16.

Shapes: x [b, l, h, p], dt [b, l, h] (after softplus and clamping), A [h], B and C [b, l, g, n],
state [b, h, p, n].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[b, l, g, n] -> [b, l, h, n] by repeating each group for its heads."""
    return t.repeat_interleave(num_heads // t.shape[2], dim=2)


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = sum(a[..., j+1 : i+1]) for j <= i, -inf above the diagonal. [..., s] -> [..., s, s]."""
    s = a.shape[-1]
    a = a[..., None].expand(*a.shape, s)
    below = torch.tril(torch.ones(s, s, dtype=torch.bool, device=a.device), diagonal=-1)
    out = torch.cumsum(a.masked_fill(~below, 0.0), dim=-2)
    on_or_below = torch.tril(torch.ones(s, s, dtype=torch.bool, device=a.device))
    return out.masked_fill(~on_or_below, float("-inf"))


def ssd_chunked(x, dt, A, B, C, chunk_size: int, initial_state=None, return_chunk_states: bool = False):
    """Chunked SSD scan. Returns (y [b, l, h, p], final_state [b, h, p, n]), both float32, and with
    `return_chunk_states` also the state entering every chunk [b, chunks, h, p, n]."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    x, dt, A = x.float(), dt.float(), A.float()
    B, C = _heads(B.float(), h), _heads(C.float(), h)
    chunk = max(1, min(chunk_size, l))  # any chunk length gives the same result; no padding for short blocks
    pad = (-l) % chunk
    X = F.pad(x * dt[..., None], (0, 0, 0, 0, 0, pad))  # padded steps: no input and no decay
    Adt = F.pad(dt * A, (0, 0, 0, pad))
    B = F.pad(B, (0, 0, 0, 0, 0, pad))
    C = F.pad(C, (0, 0, 0, 0, 0, pad))
    c = (l + pad) // chunk
    X, B, C = (t.reshape(b, c, chunk, h, -1) for t in (X, B, C))
    Adt = Adt.reshape(b, c, chunk, h).permute(0, 3, 1, 2)  # [b, h, c, s]
    A_cum = torch.cumsum(Adt, dim=-1)

    # 1. inside each chunk: a masked, decayed "attention" of C over B
    decay = torch.exp(segment_sum(Adt))  # [b, h, c, s, s]
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, X)

    # 2. the state each chunk adds by its end
    decay_to_end = torch.exp(A_cum[..., -1:] - A_cum)  # [b, h, c, s]
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, X)

    # 3. carry states across chunks, starting from the initial state
    start = torch.zeros(b, 1, h, p, n, dtype=X.dtype, device=X.device) if initial_state is None \
        else initial_state.float()[:, None]
    chunk_states = torch.cat([start, chunk_states], dim=1)  # [b, c+1, h, p, n]
    chunk_decay = torch.exp(segment_sum(F.pad(A_cum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, chunk_states)
    states, final_state = states[:, :-1], states[:, -1]

    # 4. what the state entering each chunk contributes to its outputs
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(A_cum))
    y = (y_diag + y_off).reshape(b, c * chunk, h, p)[:, :l]
    return (y, final_state, states) if return_chunk_states else (y, final_state)


def ssd_step(state, x, dt, A, B, C):
    """One recurrence step. state [b, h, p, n]; x [b, h, p]; dt [b, h]; B, C [b, g, n].

    Returns (y [b, h, p], new_state), float32.
    """
    h = x.shape[1]
    B = B.float().repeat_interleave(h // B.shape[1], dim=1)  # [b, h, n]
    C = C.float().repeat_interleave(h // C.shape[1], dim=1)
    dt = dt.float()
    decay = torch.exp(dt * A.float())[..., None, None]  # [b, h, 1, 1]
    state = state.float() * decay + (dt[..., None] * x.float())[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    return y, state


def ssd_sequential(x, dt, A, B, C, initial_state=None):
    """The recurrence one step at a time: the reference the chunked scan is tested against."""
    b, l, h, p = x.shape
    state = x.new_zeros(b, h, p, B.shape[-1], dtype=torch.float32) if initial_state is None else initial_state.float()
    ys = []
    for t in range(l):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state
