"""The rows of a batch still generating: their tokens so far (prompt + committed), left-padding
mask, index in the original batch and the context tower's cache. Finished rows leave (`select`), so
they cost nothing; speculative decoding keeps a different prefix of a block per row
(`keep_prefixes`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import HybridCache, kept_columns


@dataclass
class GenerationRows:
    """The rows still generating: their tokens so far (prompt + committed), padding mask, their
    index in the original batch, and the context tower's cache (None until first used)."""

    seq: torch.Tensor  # [b, n] on CPU
    mask: torch.Tensor | None  # [b, n] bool, False at left padding
    index: torch.Tensor = None  # [b]
    context: HybridCache | None = None

    def __post_init__(self):
        if self.index is None:
            self.index = torch.arange(self.seq.shape[0])

    def append(self, tokens: torch.Tensor) -> None:
        self.seq = torch.cat([self.seq, tokens], dim=1)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, torch.ones_like(tokens, dtype=torch.bool)], dim=1)

    def keep_prefixes(self, block: torch.Tensor, kept: torch.Tensor, pad_token_id: int) -> None:
        """Append the first kept[r] tokens of block [b, L] to row r, laid out as
        `HybridCache.keep_prefixes` lays out the context cache (rows right-aligned)."""
        column, real = kept_columns(self.mask, self.seq.shape[1], kept)
        seq = torch.cat([self.seq, block], dim=1)
        self.seq = seq.gather(1, column.clamp(min=0)).masked_fill(~real, pad_token_id)
        self.mask = None if bool(real.all()) else real

    def select(self, keep: torch.Tensor) -> "GenerationRows":
        keep = keep.cpu()
        if bool(keep.all()):
            return self
        context = None if self.context is None else self.context.select(keep)
        return GenerationRows(self.seq[keep], None if self.mask is None else self.mask[keep], self.index[keep], context)
