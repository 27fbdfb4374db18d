"""Training objectives: next-token cross-entropy for a single-tower backbone, and the two-tower
masked-diffusion loss (reference-spec section 1.3), vectorised over all blocks of a sequence.

Both return (sum of per-target losses, number of targets), so gradient accumulation and data
parallelism can average exactly over targets.

Diffusion, per example: t ~ U[eps, 1]; each token is replaced by the mask token with probability
t; the context tower runs once, causally and without a graph, over the clean sequence; the
denoiser then runs over all blocks of the noisy sequence at once: block N attends to context
blocks 0..N-1 and bidirectionally to itself, and its Mamba layers start from the context state
at the end of block N-1 (zeros for block 0). The loss is the cross-entropy of the clean token at
every masked position (same position, not shifted), with no 1/t weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import CAUSAL

T_EPS = 1e-3


def ar_loss(model, ids: torch.Tensor):
    """Next-token cross-entropy of a single-tower model over ids [b, n]: (sum, count)."""
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    return loss, ids[:, 1:].numel()


def corrupt(ids: torch.Tensor, mask_token_id: int, generator: torch.Generator | None = None, t=None):
    """Absorbing-state noise: t ~ U[eps, 1] per row (unless given), each token masked with prob t.

    Returns (noisy [b, n], masked [b, n] bool, t [b])."""
    b, n = ids.shape
    if t is None:
        t = (1 - T_EPS) * torch.rand(b, generator=generator, device="cpu").to(ids.device) + T_EPS
    masked = torch.rand(b, n, generator=generator, device="cpu").to(ids.device) < t[:, None]
    return ids.masked_fill(masked, mask_token_id), masked, t


@torch.no_grad()
def context_block_states(model, clean: torch.Tensor, block_size: int):
    """One causal pass of the frozen context tower over clean [b, n].

    Returns per layer: (k, v) [b, kv_heads, n, d] for attention, the (conv, ssm) state entering
    every block [b, blocks, ...] for Mamba, None otherwise."""
    tower = model.context_tower
    h = tower.embeddings(clean)
    states = []
    for layer in tower.layers:
        h, state = layer(h, mask=CAUSAL, block_states=block_size)
        states.append(state)
    return states


def block_causal_mask(n: int, block_size: int, device=None) -> torch.Tensor:
    """[1, 1, n, 2n] bool over keys [context ; denoiser]: a query in block N sees context blocks
    0..N-1 and every denoiser position of block N."""
    block = torch.arange(n, device=device) // block_size
    context = block[None, :] < block[:, None]
    own = block[None, :] == block[:, None]
    return torch.cat([context, own], dim=1)[None, None]


def diffusion_loss(model, ids: torch.Tensor, block_size: int | None = None,
                   generator: torch.Generator | None = None, noise=None):
    """Masked-diffusion loss over clean ids [b, n]: (sum of CE at masked positions, #masked).

    Runs through `model(...)` so that a DDP/FSDP wrapper sees it. `noise` = (noisy, masked, t)
    fixes the corruption; otherwise it is drawn here."""
    return model(ids, diffusion_block_size=block_size or 0, noise=noise, generator=generator)


def masked_diffusion_loss(model, ids: torch.Tensor, block_size: int,
                          generator: torch.Generator | None = None, noise=None):
    """The computation behind `diffusion_loss` (block_size 0: the model's)."""
    L = block_size or model.config.block_size
    noisy, masked, t = noise if noise is not None else corrupt(ids, model.config.mask_token_id, generator)
    states = context_block_states(model, ids, L)
    mask = block_causal_mask(ids.shape[1], L, ids.device)
    logits = model.denoise(noisy, t, states, mask, L, positions=masked)
    loss = F.cross_entropy(logits, ids[masked], reduction="sum")
    return loss, masked.sum()


def diffusion_loss_by_blocks(model, ids, noisy, masked, t, block_size: int):
    """The same loss through the inference path: for each block, the context cache of the clean
    prefix and one `denoise_block` call. Slow; it ties training to what the sampler runs."""
    total = torch.zeros(())
    for start in range(0, ids.shape[1], block_size):
        context = model.encode_context(ids[:, :start]) if start else model.context_tower.new_cache()
        logits = model.denoise_block(noisy[:, start:start + block_size], t, context)
        m = masked[:, start:start + block_size]
        total = total + F.cross_entropy(logits[m], ids[:, start:start + block_size][m], reduction="sum")
    return total, masked.sum()
