"""The hybrid cache of a NemotronH tower: plain tensors, one entry per layer.

* attention layer: (k, v), each [b, kv_heads, s, head_dim], all positions so far;
* Mamba layer: (conv, ssm), the last K-1 raw conv inputs [b, conv_dim, K-1] and the float32
  SSM state [b, heads, head_dim, state];
* MoE / MLP layer: None.

`pad_mask` [b, s] marks real tokens (False at left padding) and is None while nothing is padded.
The cache is mutated in place by a tower's forward; `clone` takes a snapshot (the two-tower
sampler keeps states at earlier positions), `select` keeps a subset of batch rows (finished
rows leave a batch), `to` moves it between devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _map(fn, states):
    return [None if s is None else tuple(fn(t) for t in s) for s in states]


@dataclass
class HybridCache:
    states: list = field(default_factory=list)
    length: int = 0
    pad_mask: torch.Tensor | None = None

    @classmethod
    def empty(cls, num_layers: int) -> "HybridCache":
        return cls(states=[None] * num_layers)

    def _first_tensor(self) -> torch.Tensor | None:
        return next((s[0] for s in self.states if s is not None), None)

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
