"""The Mamba-2 mixer of NemotronH (Dao and Gu 2024, "Transformers are SSMs", arXiv:2405.21060;
mamba's `mamba_ssm/modules/mamba2.py` and transformers' `modeling_nemotron_h.py` hold the same
computation). Its conv and scan run through `kernels.py`, which uses the fused CUDA kernels where
installed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import mamba_conv, mamba_conv_step, mamba_scan, mamba_scan_step
from .linear import Linear
from .norm import GatedRMSNorm
from .ssd import ssd_chunked, ssd_state_after

MambaState = tuple[torch.Tensor, torch.Tensor]  # (conv [b, conv_dim, K-1], ssm [b, h, p, n] float32)


def block_conv_histories(raw: torch.Tensor, history: torch.Tensor, block_size: int) -> torch.Tensor:
    """The conv history (last K-1 raw inputs) entering every block of `block_size` positions.

    raw [b, l, c] the block inputs, history [b, c, K-1] what precedes them -> [b, ceil(l/L), c, K-1].
    """
    l, k1 = raw.shape[1], history.shape[-1]
    seq = torch.cat([history.to(raw.dtype), raw.transpose(1, 2)], dim=-1)
    return torch.stack([seq[:, :, i:i + k1] for i in range(0, l, block_size)], dim=1)


def conv_history_after(history: torch.Tensor, raw: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The conv history (last K-1 raw inputs) after the first `lengths[r]` positions of row r.

    history [b, c, K-1] what precedes the chunk, raw [b, l, c] its inputs -> [b, c, K-1]."""
    k1 = history.shape[-1]
    seq = torch.cat([history.to(raw.dtype), raw.transpose(1, 2)], dim=-1)  # [b, c, K-1+l]
    index = lengths.to(seq.device)[:, None] + torch.arange(k1, device=seq.device)  # [b, K-1]
    return seq.gather(2, index[:, None, :].expand(-1, seq.shape[1], -1))


@dataclass
class MambaChunk:
    """What a Mamba layer saw in a chunk it ran tentatively: enough to give its state after any
    prefix of the chunk, per row, without running anything again (speculative decoding keeps
    the prefix the verifier accepted). Its memory is the chunk's scan inputs, a few hundred
    bytes per position and channel group, not a state per position."""

    conv_before: torch.Tensor  # [b, conv_dim, K-1] the conv history entering the chunk
    raw: torch.Tensor  # [b, l, conv_dim] the conv inputs of the chunk
    x: torch.Tensor  # [b, l, h, p] scan inputs (float32, after the conv)
    dt: torch.Tensor  # [b, l, h]
    B: torch.Tensor  # [b, l, g, n]
    A: torch.Tensor  # [h]
    ssm_before: torch.Tensor | None  # [b, h, p, n] the SSM state entering the chunk (None: zeros)

    def state_after(self, lengths: torch.Tensor) -> MambaState:
        """(conv history, SSM state) after the first lengths[r] positions of row r."""
        return (conv_history_after(self.conv_before, self.raw, lengths),
                ssd_state_after(self.x, self.dt, self.A, self.B, lengths, self.ssm_before))


class Mamba2Mixer(nn.Module):
    """in_proj -> (z, xBC, dt); causal conv on xBC; SSD scan; gated group norm; out_proj.

    forward(u [b, l, d], state=None, pad_mask=None) -> (out [b, l, d], new state).
    `state` seeds the conv history and the SSM state (a cache, or the context tower's state
    when the denoiser starts a block). Positions where `pad_mask` [b, l] is False leave the
    state untouched and output zeros before out_proj.
    """

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.n_groups = config.n_groups
        self.state_size = config.ssm_state_size
        self.intermediate_size = config.mamba_intermediate_size
        self.conv_dim = config.mamba_conv_dim
        self.chunk_size = config.chunk_size
        self.dt_min, self.dt_max = (float(v) for v in config.time_step_limit)
        self.in_proj = Linear(
            config.hidden_size, self.intermediate_size + self.conv_dim + self.num_heads, bias=config.use_bias
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, config.conv_kernel, groups=self.conv_dim,
            padding=config.conv_kernel - 1, bias=config.use_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(
            self.intermediate_size, self.intermediate_size // self.n_groups, eps=config.layer_norm_epsilon
        )
        self.out_proj = Linear(self.intermediate_size, config.hidden_size, bias=config.use_bias)

    def _dt(self, dt: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        """softplus(dt + dt_bias) clamped to the time-step limit, float32; 0 at padding (no input
        and no decay there)."""
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(self.dt_min, self.dt_max)
        return dt if pad_mask is None else dt * pad_mask[..., None]

    def forward(self, u: torch.Tensor, state: MambaState | None = None, *, pad_mask: torch.Tensor | None = None,
                block_states: int | None = None, keep_state: bool = True, tentative: bool = False):
        """-> (out [b, l, hidden], state). The state is the final (conv, ssm); with `block_states`
        = L, the one entering every block of L positions: (conv [b, blocks, conv_dim, K-1], ssm
        [b, blocks, h, p, n]), which training uses to seed the denoiser's blocks from one context
        pass; with `keep_state=False`, None and not computed (the denoiser discards it); with
        `tentative=True`, a `MambaChunk`, from which the state after any prefix of the input
        follows (`HybridCache.keep_prefixes`)."""
        b, l, _ = u.shape
        if l == 1 and state is not None and not block_states and not tentative:
            out, state = self.step(u, state, pad_mask)
            return out, state if keep_state else None
        z, xBC, dt = self.in_proj(u).split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        if pad_mask is not None:
            xBC = xBC * pad_mask[..., None].to(xBC.dtype)
        conv_history, ssm_state = state if state is not None else (None, None)
        raw, history_before = xBC, conv_history
        xBC, conv_history = mamba_conv(xBC, self.conv1d.weight[:, 0], self.conv1d.bias, conv_history)
        group_width = self.n_groups * self.state_size
        x, B, C = xBC.split([self.intermediate_size, group_width, group_width], dim=-1)
        dt = self._dt(dt, pad_mask)
        A = -torch.exp(self.A_log.float())
        x = x.reshape(b, l, self.num_heads, self.head_dim)
        B = B.reshape(b, l, self.n_groups, self.state_size)
        C = C.reshape(b, l, self.n_groups, self.state_size)
        if tentative:
            y, _ = mamba_scan(x, dt, A, B, C, self.chunk_size, ssm_state, final_state=False)
            if history_before is None:
                history_before = torch.zeros_like(conv_history)
            return self._output(y, x, z, pad_mask, u.dtype), MambaChunk(history_before, raw, x, dt, B, A, ssm_state)
        if block_states:
            y, ssm_state = ssd_chunked(x, dt, A, B, C, block_states, ssm_state, states="entering")
            start = state[0] if state is not None and state[0] is not None else raw.new_zeros(
                b, self.conv_dim, self.conv1d.kernel_size[0] - 1)
            conv_history = block_conv_histories(raw, start, block_states)
        else:
            y, ssm_state = mamba_scan(x, dt, A, B, C, self.chunk_size, ssm_state, final_state=keep_state)
        return self._output(y, x, z, pad_mask, u.dtype), (conv_history, ssm_state) if keep_state else None

    def step(self, u: torch.Tensor, state: MambaState, pad_mask: torch.Tensor | None = None):
        """forward for one position u [b, 1, d] continuing `state`: the same function as a scan of
        length 1, in fewer and smaller ops (a decoding step is bound by per-op overhead)."""
        b = u.shape[0]
        z, xBC, dt = self.in_proj(u[:, 0]).split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        if pad_mask is not None:
            pad_mask = pad_mask[:, -1]
            xBC = xBC * pad_mask[:, None].to(xBC.dtype)
        history, ssm_state = state
        xBC, history = mamba_conv_step(xBC, self.conv1d.weight[:, 0], self.conv1d.bias, history)  # float32
        group_width = self.n_groups * self.state_size
        x, B, C = xBC.split([self.intermediate_size, group_width, group_width], dim=-1)
        x = x.view(b, self.num_heads, self.head_dim)
        y, ssm_state = mamba_scan_step(ssm_state, x, self._dt(dt, pad_mask), -torch.exp(self.A_log.float()),
                                       B.view(b, self.n_groups, -1), C.view(b, self.n_groups, -1))
        return self._output(y, x, z, pad_mask, u.dtype)[:, None], (history, ssm_state)

    def _output(self, y, x, z, pad_mask, dtype):
        """D skip, gated norm, zeros at padding, out_proj. y, x [..., h, p]; z [..., d_inner];
        pad_mask [...] or None -> [..., hidden] in `dtype`."""
        y = self.norm(torch.addcmul(y, x.float(), self.D.float()[:, None]).flatten(-2), z)
        if pad_mask is not None:
            y = y * pad_mask[..., None].to(y.dtype)
        return self.out_proj(y.to(dtype))
