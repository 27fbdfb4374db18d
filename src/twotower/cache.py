"""The hybrid cache of a NemotronH tower: plain tensors, one entry per layer.

* attention layer: (k, v), each [b, kv_heads, s, head_dim], all positions so far;
* Mamba layer: (conv, ssm), the last K-1 raw conv inputs [b, conv_dim, K-1] and the float32
  SSM state [b, heads, head_dim, state];
* MoE / MLP layer: None.

`pad_mask` [b, s] marks real tokens (False at left padding) and is None while nothing is padded.
The cache is mutated in place by a tower's forward; `clone` takes a snapshot (the two-tower
sampler keeps states at earlier positions), `select` keeps a subset of batch rows (finished
rows leave a batch), `to` moves it between devices.

After a tentative forward (`NemotronHModel.forward(..., tentative=True)`) over l positions,
`keep_prefixes(lengths)` keeps the first lengths[r] of them in row r: speculative decoding
verifies a drafted chunk and keeps what was accepted. Rows that keep fewer than the longest are
right-aligned with padding on the left, so every row's real tokens end at the cache's end: with
no positional encoding a key's slot carries no meaning, and the Mamba states are per row. So
padding stays at the left, as the forward's masks expect, and no row needs its own length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .mamba2 import MambaChunk


def _map(fn, states):
    return [None if s is None else tuple(fn(t) for t in s) for s in states]


def kept_columns(pad_mask: torch.Tensor | None, start: int, lengths: torch.Tensor):
    """The layout after row r keeps `lengths[r]` of the positions that follow the first `start`.

    Rows are right-aligned (row r shifted right by max(lengths) - lengths[r]) and the leading
    slots that are then padding in every row dropped. pad_mask [b, start + l] or [b, start] (the
    positions kept are real) or None (all real).
    Returns (column [b, s']: the old slot each new slot holds, negative where it is padding;
    real [b, s'] bool), on the CPU. The sequence a cache covers is laid out by the same columns."""
    lengths = lengths.long().cpu()
    width = int(lengths.max())
    column = torch.arange(start + width)[None, :] - (width - lengths)[:, None]
    real = column >= 0
    if pad_mask is not None:
        pad_mask = torch.cat([pad_mask[:, :start].cpu(), torch.ones(len(lengths), width, dtype=torch.bool)], 1)
        real &= pad_mask.gather(1, column.clamp(min=0))
    first = int(real.any(0).long().argmax())
    return column[:, first:], real[:, first:]


def _shift_rows(t: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """K or V [b, heads, s, d] rearranged so slot j of row r holds old slot column[r, j] (clamped
    at 0: a negative one is padding, its content never read). column [b, s'] -> [b, heads, s', d]."""
    index = column.clamp(min=0).to(t.device)[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
    return t.gather(2, index)


@dataclass
class HybridCache:
    states: list = field(default_factory=list)
    length: int = 0
    pad_mask: torch.Tensor | None = None
    tentative: int = 0  # positions at the end that a tentative forward added, until keep_prefixes

    @classmethod
    def empty(cls, num_layers: int) -> "HybridCache":
        return cls(states=[None] * num_layers)

    def _first_tensor(self) -> torch.Tensor | None:
        return next((s.raw if isinstance(s, MambaChunk) else s[0] for s in self.states if s is not None), None)

    @property
    def batch_size(self) -> int:
        first = self._first_tensor()
        if first is not None:
            return first.shape[0]
        return 0 if self.pad_mask is None else self.pad_mask.shape[0]

    @property
    def device(self) -> torch.device | None:
        """Where the cached tensors are (None while the cache is empty)."""
        first = self._first_tensor()
        return None if first is None else first.device

    def clone(self) -> "HybridCache":
        return HybridCache(_map(torch.clone, self.states), self.length,
                           None if self.pad_mask is None else self.pad_mask.clone())

    def select(self, rows: torch.Tensor) -> "HybridCache":
        """Keep batch rows `rows` (a LongTensor of indices or a bool mask)."""
        return HybridCache(_map(lambda t: t[rows.to(t.device)], self.states), self.length,
                           None if self.pad_mask is None else self.pad_mask[rows.to(self.pad_mask.device)])

    def to(self, device) -> "HybridCache":
        """The cache on `device`; itself if it is there already (or empty), as `Tensor.to` does."""
        if self.device is None or self.device == torch.device(device):
            return self
        return HybridCache(_map(lambda t: t.to(device), self.states), self.length,
                           None if self.pad_mask is None else self.pad_mask.to(device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.states if s is not None for t in s)

    def keep_prefixes(self, lengths: torch.Tensor) -> None:
        """Keep the first lengths[r] (1..l) positions of the tentative chunk in row r, in place.

        K/V: the kept entries are shifted right by (max(lengths) - lengths[r]) and the slots
        freed on the left become padding; the cache grows by max(lengths), less any leading
        slots that are now padding in every row. Mamba: each layer's state after lengths[r]
        positions, from its `MambaChunk`."""
        l = self.tentative
        if not l:
            raise ValueError("keep_prefixes follows a tentative forward; the cache has none")
        lengths = lengths.long().cpu()
        if lengths.shape != (self.batch_size,) or int(lengths.min()) < 1 or int(lengths.max()) > l:
            raise ValueError(f"lengths must be [{self.batch_size}] values in [1, {l}], got {lengths.tolist()}")
        column, real = kept_columns(self.pad_mask, self.length - l, lengths)
        shifted = bool((column != column[:1]).any())
        for i, s in enumerate(self.states):
            if isinstance(s, MambaChunk):
                self.states[i] = s.state_after(lengths)
            elif s is not None and shifted:
                self.states[i] = tuple(_shift_rows(t, column) for t in s)
            elif s is not None:  # every row keeps as many: a slice
                self.states[i] = tuple(t[:, :, int(column[0, 0]):int(column[0, -1]) + 1] for t in s)
        self.length, self.tentative = column.shape[1], 0
        self.pad_mask = None if bool(real.all()) else real.to(self.device)
