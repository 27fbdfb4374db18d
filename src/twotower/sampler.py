"""The confidence-unmasking rule of mask diffusion (reference-spec section 1.4).

One denoising step looks at the denoiser's logits at a block's masked positions (committed
positions never change, so the head is not run there), predicts each, and commits the ones it is
most confident about:

* the mask token can never be predicted;
* k = #(masked positions with confidence > threshold), at least 1, at least
  ceil(masked / steps left) so the block finishes in time, at most #masked;
* the last step commits everything still masked.

Confidence is the model's unscaled probability of the predicted token, also when sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .generation import filter_logits


@dataclass
class DenoiseStep:
    """What `step_callback` sees after every denoising step."""

    block: int  # block index within this generate call (the round, in speculative decoding)
    step: int  # step within the block
    tokens: torch.Tensor  # [b, L] the block now (mask_token_id where still masked)
    committed: torch.Tensor  # [b, L] bool, positions committed at this step
    rows: torch.Tensor  # [b] which rows of the original batch these are


def block_time(masked: torch.Tensor) -> torch.Tensor:
    """t for each row: the fraction of the block still masked. masked [b, L] bool -> [b] float32.

    Per row, as NVIDIA's Megatron code does (a batch-wide mean would let one row's answer
    depend on the others)."""
    return masked.float().mean(-1)


def predict(logits: torch.Tensor, mask_token_id: int, temperature: float = 0.0, top_k: int | None = None,
            top_p: float | None = None, generator: torch.Generator | None = None):
    """Prediction and its confidence at every position. logits [..., v] -> (pred [...], conf [...]).

    Greedy: argmax. Sampling: Gumbel-max over the temperature-scaled, top-k/top-p filtered logits.
    """
    logits = logits.float().index_fill(-1, torch.tensor([mask_token_id], device=logits.device), float("-inf"))
    probs = logits.softmax(-1)
    if temperature <= 0:
        pred = logits.argmax(-1)
    else:
        scaled = filter_logits(logits / temperature, top_k, top_p)
        u = torch.rand(scaled.shape, generator=generator, device=scaled.device).clamp_(1e-20, 1.0)
        pred = (scaled - torch.log(-torch.log(u))).argmax(-1)
    return pred, probs.gather(-1, pred[..., None])[..., 0]


def tokens_to_commit(masked: torch.Tensor, confidence: torch.Tensor, step: int, steps: int,
                     threshold: float) -> torch.Tensor:
    """How many masked positions each row commits at this step. masked, confidence [b, L] -> [b]."""
    m = masked.sum(-1)
    if step >= steps - 1:
        return m
    confident = (masked & (confidence > threshold)).sum(-1)
    at_least = torch.div(m + (steps - step) - 1, steps - step, rounding_mode="floor")  # ceil(m / steps left)
    return torch.minimum(torch.maximum(confident.clamp(min=1), at_least), m)


def commit_confident(x: torch.Tensor, logits: torch.Tensor, step: int, steps: int, mask_token_id: int,
                     threshold: float, temperature: float = 0.0, top_k: int | None = None,
                     top_p: float | None = None, generator: torch.Generator | None = None):
    """One denoising step on a block. x [b, L] (mask_token_id where still masked); logits [n, v] for
    the n masked positions of x in row-major order (committed positions need no prediction).

    Returns (new x [b, L], committed [b, L] bool: the positions committed at this step).
    """
    masked = x == mask_token_id
    pred, conf = predict(logits, mask_token_id, temperature, top_k, top_p, generator)
    pred = x.masked_scatter(masked, pred)
    committed = positions_to_commit(masked, conf, step, steps, threshold)
    return torch.where(committed, pred, x), committed


def positions_to_commit(masked: torch.Tensor, confidence: torch.Tensor, step: int, steps: int,
                        threshold: float) -> torch.Tensor:
    """The masked positions committed at this step: each row's `tokens_to_commit` most confident
    (ties to the left). masked [b, L] bool, confidence [n] for the n masked positions in row-major
    order -> [b, L] bool."""
    conf = torch.full(masked.shape, float("-inf"), device=masked.device).masked_scatter(masked, confidence)
    k = tokens_to_commit(masked, conf, step, steps, threshold)
    order = conf.argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(masked.shape[1], device=masked.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return masked & (rank < k[:, None])
