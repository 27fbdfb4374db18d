"""Training objectives: next-token cross-entropy for a single-tower backbone, and the two-tower
masked-diffusion loss (absorbing-state masked diffusion, Sahoo et al. 2024, arXiv:2406.07524, in
the block-wise form of Arriola et al. 2025, "Block Diffusion", arXiv:2503.09573), vectorised over all
blocks of a sequence.

Both return (sum of per-target losses, number of targets), so gradient accumulation and data
parallelism can average exactly over targets.

Diffusion, per example: t ~ U[eps, 1]; each token is replaced by the mask token with probability
t; the context tower runs once, causally and without a graph, over the clean sequence; the
denoiser then runs over all blocks of the noisy sequence at once: block N attends to context
blocks 0..N-1 and bidirectionally to itself, and its Mamba layers start from the context state
at the end of block N-1 (zeros for block 0). The loss is the cross-entropy of the clean token at
every masked position (same position, not shifted), with no 1/t weight. Optional terms:
certainty forcing (`certainty_sum`) and the AR tower's soft targets (`teacher_kl_sum`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from .attention import CAUSAL

T_EPS = 1e-3


# what the diffusion loss takes besides the clean ids and the block size (the two-tower forward passes them on)
DIFFUSION_LOSS_ARGUMENTS = ("noise", "generator", "loss_mask", "certainty_weight", "prefix_fraction",
                            "ar_kl_weight")

IGNORE_INDEX = -100  # transformers' label for positions without a target


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """transformers' causal-LM loss: logits [b, l, vocab] at position i predict labels[:, i + 1];
    labels equal to -100 are ignored; the summed cross-entropy is divided by `num_items_in_batch`
    if given (the Trainer's count over accumulated batches), else by the number of targets."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids, as the logits "
                         f"{tuple(logits.shape[:2])}")
    targets = labels[:, 1:]
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    if num_items_in_batch is None:
        num_items_in_batch = (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def ar_loss(model, ids: torch.Tensor):
    """Next-token cross-entropy of a single-tower model over ids [b, n]: (sum, count)."""
    logits = model(ids[:, :-1]).logits
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    return loss, ids[:, 1:].numel()


def corrupt(ids: torch.Tensor, mask_token_id: int, generator: torch.Generator | None = None, t=None,
            loss_mask: torch.Tensor | None = None, prefix_fraction: float = 0.0, block_size: int | None = None):
    """Absorbing-state noise: t ~ U[eps, 1] per row (unless given), each token masked with prob t.
    `loss_mask` [b, n] bool: where masking may happen (False at a prompt's positions, which stay
    clean and are never scored, as the `loss_mask` of Megatron-LM's diffusion data).

    `prefix_fraction` of the rows (drawn per row) get prefix noise instead (`prefix_noise`): the
    blocks as decoding meets them, a clean prefix and the rest masked.

    Returns (noisy [b, n], masked [b, n] bool, t [b])."""
    b, n = ids.shape
    if t is None:
        t = (1 - T_EPS) * torch.rand(b, generator=generator, device="cpu").to(ids.device) + T_EPS
    masked = torch.rand(b, n, generator=generator, device="cpu").to(ids.device) < t[:, None]
    if prefix_fraction:
        if block_size is None:
            raise ValueError("prefix noise needs the block size")
        chosen = (torch.rand(b, generator=generator, device="cpu") < prefix_fraction).to(ids.device)
        prefix_masked, prefix_t = prefix_noise(b, n, block_size, generator, ids.device)
        masked = torch.where(chosen[:, None], prefix_masked, masked)
        t = torch.where(chosen, prefix_t, t)
    if loss_mask is not None:
        masked &= loss_mask.to(masked.device).bool()
    return ids.masked_fill(masked, mask_token_id), masked, t


def prefix_noise(b: int, n: int, block_size: int, generator: torch.Generator | None = None, device=None):
    """Blocks as the decoders meet them: per row, every block of `block_size` keeps its first j
    tokens clean and masks the rest, j ~ U{0, ..., block_size - 1} (0: a block about to be drafted
    from all-masked; 1: a speculative draft after its pending token; more: a diffusion block after
    left-to-right commits). t is the masked fraction of a whole block, (block_size - j) /
    block_size, as `sampler.block_time` gives at decoding. Returns (masked [b, n] bool, t [b])."""
    j = torch.randint(0, block_size, (b,), generator=generator, device="cpu").to(device)
    masked = (torch.arange(n, device=device) % block_size)[None, :] >= j[:, None]
    return masked, (block_size - j).float() / block_size


def prompt_loss_mask(ids: torch.Tensor, prompt_tokens: int) -> torch.Tensor:
    """[b, n] bool, False at the first `prompt_tokens` positions of every row (the prompt of a
    distillation row, see `twotower.distill`), True after them."""
    return (torch.arange(ids.shape[1], device=ids.device) >= prompt_tokens).expand_as(ids)


def certainty_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Certainty forcing (dParallel, Chen et al. 2025): the entropy of the predicted distribution,
    summed over the positions whose argmax already is the target. Minimising it makes right
    predictions confident, so more of them pass the sampler's threshold in one step; wrong ones are
    left to the cross-entropy. logits [n, v] float, targets [n] -> scalar."""
    logp = logits.float().log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return entropy[logits.argmax(-1) == targets].sum()


def teacher_kl_sum(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Word-level knowledge distillation (Hinton et al. 2015; Kim & Rush 2016, who combine it with
    the sequence-level kind): KL(teacher || student) of the two next-token distributions, summed
    over positions. It carries what the AR tower's greedy tokens alone do not: how sure AR is, and
    its runners-up. logits, teacher_logits [n, v] -> scalar (float32)."""
    teacher = teacher_logits.float().log_softmax(-1)
    return (teacher.exp() * (teacher - logits.float().log_softmax(-1))).sum()


@torch.no_grad()
def context_block_states(model, clean: torch.Tensor, block_size: int):
    """One causal pass of the frozen context tower over clean [b, n].

    Returns (states, hidden): per layer, (k, v) [b, kv_heads, n, d] for attention, the (conv, ssm)
    state entering every block [b, blocks, ...] for Mamba, None otherwise; and the tower's normed
    output [b, n, d], from which its head predicts each next token."""
    tower = model.context_tower
    h = tower.embeddings(clean)
    states = []
    for layer in tower.layers:
        h, state = layer(h, mask=CAUSAL, block_states=block_size)
        states.append(state)
    return states, tower.norm_f(h)


def mamba_by_blocks(layer, h: torch.Tensor, state, modulation, block_size: int) -> torch.Tensor:
    """A denoiser Mamba block over h [b, n, d] one block of `block_size` at a time, every block
    starting from its own entering state (conv, ssm) [b, blocks, ...] (None: zeros): the blocks
    run as a batch of b * blocks sequences."""
    b, n, d = h.shape
    blocks = -(-n // block_size)
    pad = blocks * block_size - n
    per_block = (F.pad(h, (0, 0, 0, pad)) if pad else h).reshape(b * blocks, block_size, d)
    if modulation is not None and blocks > 1:
        modulation = [m.repeat_interleave(blocks, dim=0) for m in modulation]
    start = None if state is None else tuple(s.flatten(0, 1) for s in state)
    out, _ = layer(per_block, start, modulation=modulation, keep_state=False)
    return out.reshape(b, blocks * block_size, d)[:, :n]


def block_causal_mask(n: int, block_size: int, device=None) -> torch.Tensor:
    """[1, 1, n, 2n] bool over keys [context ; denoiser]: a query in block N sees context blocks
    0..N-1 and every denoiser position of block N."""
    block = torch.arange(n, device=device) // block_size
    context = block[None, :] < block[:, None]
    own = block[None, :] == block[:, None]
    return torch.cat([context, own], dim=1)[None, None]


@dataclass
class MaskedDiffusionOutput(ModelOutput):
    """The two-tower forward's training output: `loss`, the mean over the masked positions, and its
    parts, so that accumulation and data parallelism can average exactly."""

    loss: torch.Tensor | None = None
    masked_loss_sum: torch.Tensor | None = None
    num_masked: torch.Tensor | None = None


def diffusion_loss(model, ids: torch.Tensor, block_size: int | None = None,
                   generator: torch.Generator | None = None, noise=None, loss_mask: torch.Tensor | None = None,
                   certainty_weight: float = 0.0, prefix_fraction: float = 0.0, ar_kl_weight: float = 0.0):
    """Masked-diffusion loss over clean ids [b, n]: (sum of CE at masked positions, #masked),
    plus `certainty_weight` times `certainty_sum` at those positions, plus `ar_kl_weight` times
    `teacher_kl_sum` against the context tower's next-token prediction there (from the clean
    prefix; a row's first position has none and gets no such term).

    Runs through `model(..., diffusion_block_size=...)` so that a DDP/FSDP wrapper sees it.
    `noise` = (noisy, masked, t) fixes the corruption; otherwise it is drawn here (`corrupt`, with
    `prefix_fraction` of the rows under prefix noise), never at positions where `loss_mask` is
    False."""
    out = model(ids, diffusion_block_size=block_size or 0, noise=noise, generator=generator,
                loss_mask=loss_mask, certainty_weight=certainty_weight, prefix_fraction=prefix_fraction,
                ar_kl_weight=ar_kl_weight)
    return out.masked_loss_sum, out.num_masked


def masked_diffusion_output(model, ids: torch.Tensor, block_size: int, generator: torch.Generator | None = None,
                            noise=None, loss_mask: torch.Tensor | None = None, certainty_weight: float = 0.0,
                            prefix_fraction: float = 0.0, ar_kl_weight: float = 0.0) -> MaskedDiffusionOutput:
    """The computation behind `diffusion_loss` (block_size 0: the model's)."""
    L = block_size or model.config.block_size
    noisy, masked, t = noise if noise is not None else corrupt(ids, model.config.mask_token_id, generator,
                                                               loss_mask=loss_mask, prefix_fraction=prefix_fraction,
                                                               block_size=L)
    states, hidden = context_block_states(model, ids, L)
    mask = block_causal_mask(ids.shape[1], L, ids.device)
    logits = model.denoise(noisy, t, states, mask, L, positions=masked)
    targets = ids[masked]
    total = F.cross_entropy(logits, targets, reduction="sum")
    if certainty_weight:
        total = total + certainty_weight * certainty_sum(logits, targets)
    if ar_kl_weight:  # the AR tower predicts position i from position i - 1 (masked positions in row-major order)
        with torch.no_grad():
            teacher = model.context_lm_head(hidden[:, :-1][masked[:, 1:]])
        has_teacher = masked.nonzero()[:, 1] >= 1
        total = total + ar_kl_weight * teacher_kl_sum(logits[has_teacher], teacher)
    count = masked.sum()
    return MaskedDiffusionOutput(loss=total / count.clamp(min=1), masked_loss_sum=total, num_masked=count)


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
