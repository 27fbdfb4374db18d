"""The Mamba-2 state-space recurrence: a chunked scan for sequences, a step for decoding.

Per head h with state S of shape [P, N] and group g(h) = h // (heads / groups):

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t (outer) B_t
    y_t = S_t @ C_t                                   (the D skip is added by the mixer)

`ssd_chunked` computes exactly this with the SSD block decomposition (quadratic inside a chunk,
recurrent across chunks); `ssd_sequential` is the plain loop it is tested against. Everything
runs in float32, autocast or not: seeded states can be O(1e3) and overflow bfloat16.

Shapes: x [b, l, h, p], dt [b, l, h] (after softplus and clamping), A [h], B and C [b, l, g, n],
state [b, h, p, n].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .precision import without_autocast


def _decay_(log_decay: torch.Tensor) -> torch.Tensor:
    """exp of a log-decay (a sum of dt * A <= 0), in place on a fresh tensor, floored at
    exp(-80) ~ 2e-35: an absolute change below 2e-35 that keeps results out of the denormal range,
    where exp is ~30x slower on CPUs. Positive inputs (the masked upper triangle of a chunk) give
    1, never inf. Autograd-safe: the clamp's and exp's backward need no overwritten input."""
    return log_decay.clamp_(-80.0, 0.0).exp_()


@without_autocast
def ssd_chunked(x, dt, A, B, C, chunk_size: int, initial_state=None, states: str | None = "final"):
    """Chunked SSD scan. Returns (y [b, l, h, p], state), both float32, where `states` picks the
    state: "final" [b, h, p, n]; "entering", the state entering every chunk [b, chunks, h, p, n]
    (training seeds each denoiser block from it); None: no state, and the last chunk's
    contribution to it is skipped (the denoiser reads its block's outputs only).

    Heads are laid out as [groups, heads per group] so that B and C, shared by a group's heads,
    are never copied per head, and C.B is computed once per group.
    """
    if states not in ("final", "entering", None):
        raise ValueError(f"states must be 'final', 'entering' or None, got {states!r}")
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    chunk = max(1, min(chunk_size, l))  # any chunk length gives the same result; no padding for short blocks
    pad = (-l) % chunk
    c = (l + pad) // chunk
    dt = dt.float()

    def by_chunk(t):  # [b, l, h or g, ...] -> [b, c, s, g, r or 1, ...]; padded steps: no input, no decay
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t
        return t.unflatten(1, (c, chunk)).unflatten(3, (g, -1))

    # chunk-major copies [b, g, r, c, s, .], made once so that every product below reads them as they are
    X = by_chunk(x.float() * dt[..., None]).permute(0, 3, 4, 1, 2, 5).contiguous()
    B, C = (by_chunk(t.float()).permute(0, 3, 4, 1, 2, 5).contiguous() for t in (B, C))  # [b, g, 1, c, s, n]
    A_cum = torch.cumsum(by_chunk(dt * A.float()).permute(0, 3, 4, 1, 2), dim=-1)  # [b, g, r, c, s]

    # 1. inside each chunk: C_i . B_j, decayed from step j to step i (j <= i), applied to X_j. The
    # causal mask zeroes C.B, shared by a group's heads; the decay is 1 above the diagonal.
    decay = _decay_(A_cum[..., :, None] - A_cum[..., None, :])  # [b, g, r, c, s, s]
    y = ((C @ B.transpose(-1, -2)).tril_() * decay) @ X  # [b, g, r, c, s, p]

    # 2. the state each chunk adds by its end (needed for the next chunk and for the final state)
    carried = c if states == "final" else c - 1
    to_end = _decay_(A_cum[..., :carried, -1:] - A_cum[..., :carried, :])[..., None]  # [b, g, r, c', s, 1]
    added = (X[..., :carried, :, :] * to_end).transpose(-1, -2) @ B[..., :carried, :, :]  # [b, g, r, c', p, n]

    # 3. carry the state across chunks, one step per chunk
    from_start = _decay_(A_cum.clone())  # [b, g, r, c, s]: decay from each chunk's start to step s
    chunk_decay = from_start[..., -1, None, None]  # [b, g, r, c, 1, 1]
    state = x.new_zeros(b, g, r, p, n, dtype=torch.float32) if initial_state is None \
        else initial_state.float().reshape(b, g, r, p, n)
    entering = []
    for i in range(c):
        entering.append(state)
        if i < carried:
            state = torch.addcmul(added[:, :, :, i], state, chunk_decay[:, :, :, i])
    entering_states = torch.stack(entering, dim=3) if c > 1 else entering[0][:, :, :, None]  # [b, g, r, c, p, n]

    # 4. what the state entering each chunk contributes to its outputs, added by the product
    decayed_C = (C * from_start[..., None]).view(-1, chunk, n)  # [b g r c, s, n]
    y = y.view(-1, chunk, p).baddbmm_(decayed_C, entering_states.reshape(-1, p, n).transpose(1, 2))  # y is fresh
    y = y.view(b, g, r, c, chunk, p).permute(0, 3, 4, 1, 2, 5).reshape(b, c * chunk, h, p)[:, :l]
    if states == "final":
        return y, state.reshape(b, h, p, n)
    if states == "entering":
        return y, entering_states.permute(0, 3, 1, 2, 4, 5).reshape(b, c, h, p, n)
    return y, None


@without_autocast
def ssd_state_after(x, dt, A, B, lengths: torch.Tensor, initial_state=None):
    """The state after the first `lengths[r]` steps of row r (0 <= lengths <= l), from one pass.

        S_a = exp(sum_{j<a} dt_j A) S_0 + sum_{j<a} exp(sum_{j<i<a} dt_i A) dt_j x_j (outer) B_j

    Steps at or after a row's length get dt = 0 (no input, no decay), so this is the final-state
    part of the scan over the kept steps: one [p, l] x [l, n] product per head and no outputs.
    Decoding uses it to roll a state back to a prefix of a chunk it has run. Returns [b, h, p, n]
    float32.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    keep = torch.arange(l, device=x.device) < lengths.to(x.device)[:, None]  # [b, l]
    dt = dt.float() * keep[..., None]
    dA = dt * A.float()  # [b, l, h]
    total = dA.sum(1)  # [b, h]
    weight = _decay_(total[:, None] - torch.cumsum(dA, 1)) * dt  # [b, l, h]: decay from step j to the end, times dt_j
    added = torch.einsum("blgr,blgrp,blgn->bgrpn", weight.view(b, l, g, -1), x.float().view(b, l, g, -1, p),
                         B.float())
    state = added.reshape(b, h, p, n)
    if initial_state is not None:
        state = torch.addcmul(state, initial_state.float(), _decay_(total)[..., None, None])
    return state


@without_autocast
def ssd_step(state, x, dt, A, B, C):
    """One recurrence step. state [b, h, p, n]; x [b, h, p]; dt [b, h]; B, C [b, g, n].

    Returns (y [b, h, p], new_state), float32.
    """
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    r = h // g  # heads per group share B and C: [b, g, r, p, n] against [b, g, 1, 1, n]
    dt = dt.float()
    decay = torch.exp(dt * A.float()).view(b, g, r, 1, 1)
    dx = (dt[..., None] * x.float()).view(b, g, r, p, 1)
    state = torch.addcmul(state.float().reshape(b, g, r, p, n) * decay, dx, B.float().view(b, g, 1, 1, n))
    y = torch.bmm(state.view(b * g, r * p, n), C.float().reshape(b * g, n, 1))  # a group's heads at once
    return y.view(b, h, p), state.view(b, h, p, n)


def ssd_sequential(x, dt, A, B, C, initial_state=None):
    """The recurrence one step at a time: the reference the chunked scan is tested against."""
    b, l, h, p = x.shape
    state = x.new_zeros(b, h, p, B.shape[-1], dtype=torch.float32) if initial_state is None else initial_state.float()
    ys = []
    for t in range(l):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state
