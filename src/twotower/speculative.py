"""Speculative decoding with the two towers: the denoiser drafts a block, the context tower
verifies it, and the output is exactly the context tower's own AR output.

A round, for every row of the batch:

1. **Draft.** The block's first position holds the row's pending token (the AR tower's last
   choice, not yet in the context cache); the other L-1 are masked. The denoiser fills them in
   `draft_steps` steps: one step predicts every position at once; more commit by the confidence
   rule (`twotower.sampler`) and fill the rest at the last step.
2. **Verify.** The context tower runs over the whole block in one tentative chunk from the cache
   after the committed prefix. Its logits at block position i are the AR prediction for position
   i+1: the drafted tokens are checked against positions 0..L-2, and position L-1 gives a bonus
   token when every draft is accepted.
3. **Accept.** Greedy: the longest prefix of drafts equal to the AR argmax, then the AR argmax
   after it (the correction, or the bonus). Sampling: the speculative-sampling rule (Leviathan
   et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et al. 2023,
   "Accelerating Large Language Model Decoding with Speculative Sampling"): draft d with draft
   probability q(d) is accepted with probability min(1, p(d) / q(d)); at the first rejection the
   token is drawn from max(0, p - q) renormalised, after a full accept from p. p and q are the AR
   tower's and the denoiser's distributions with the same temperature, top-k and top-p.
4. **Commit.** The pending token and the accepted drafts stay in the context cache
   (`HybridCache.keep_prefixes`: K/V kept, Mamba states at the accepted position); the new AR
   token becomes the next round's pending token. A round commits between 1 and L tokens.

The exactness argument for sampling needs the draft of position j, given the tokens before it,
to be distributed as the q used to test it. With one draft step every position is drawn
independently from its q. With several steps a position depends on the positions committed
before it, and which positions commit must not depend on the values drawn: a sampled draft
commits by the denoiser's top probability at each position (not by the drawn token's); and the
test stops (a plain AR draw from p) at the first position committed at an earlier step than
some position before it, whose value the later draw has seen. Greedy decoding needs none of
this: any draft gives AR's tokens.

Batches: rows accept different lengths; `keep_prefixes` right-aligns them, so the rows'
sequences stay left-padded (`kept_columns` lays out the token rows the same way) and every
row's cache is exact. `use_cache=False` recomputes the context tower over the committed tokens
every round and verifies from that fresh cache without rolling anything back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .cache import kept_columns
from .generation import RowSpeculation, filter_logits, finish_generation, sample_next, until_eos
from .sampler import DenoiseStep, block_time, positions_to_commit


@dataclass(frozen=True)
class SpeculativeParams:
    """The drafting settings: block length (the pending token and L-1 drafts), denoising steps
    for a draft, the confidence threshold of the steps before the last, the mask token."""

    block_size: int = 16
    draft_steps: int = 1
    confidence_threshold: float = 0.8
    mask_token_id: int = 3

    def __post_init__(self):
        for name in ("block_size", "draft_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= float(self.confidence_threshold) <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}")


class Sampling(NamedTuple):
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution a token is drawn from: temperature, then top-k and top-p."""
        return filter_logits(logits.float() / self.temperature, self.top_k, self.top_p).softmax(-1)


@dataclass
class Draft:
    tokens: torch.Tensor  # [b, L] the pending token, then the drafts
    steps: torch.Tensor  # [b, L] the draft step that committed each position (-1: the pending token)
    probs: torch.Tensor | None  # [b, L, v] each position's draft distribution (sampling only)


def draft_predictions(logits: torch.Tensor, mask_token_id: int, sampling: Sampling, generator=None):
    """Draft tokens at masked positions from denoiser logits [n, v]: (tokens [n], confidence [n],
    draft distribution [n, v] or None when greedy). Confidence is the model's top probability,
    which for greedy drafts is the drawn token's, as in diffusion; the mask is never drafted."""
    logits = logits.float().index_fill(-1, torch.tensor([mask_token_id], device=logits.device), float("-inf"))
    confidence = logits.softmax(-1).amax(-1)
    if sampling.greedy:
        return logits.argmax(-1), confidence, None
    q = sampling.probs(logits)
    return torch.multinomial(q, 1, generator=generator)[:, 0], confidence, q


def draft_block(model, pending: torch.Tensor, context, length: int, params: SpeculativeParams, sampling: Sampling,
                generator=None, on_step=None) -> Draft:
    """The denoiser fills `length` - 1 masked positions after the pending tokens [b] in up to
    `params.draft_steps` steps. `on_step(step, tokens, committed)` follows every step."""
    device = model.denoiser_device
    b = pending.shape[0]
    x = torch.full((b, length), params.mask_token_id, dtype=torch.long, device=device)
    x[:, 0] = pending.to(device)
    masked = torch.ones(b, length, dtype=torch.bool, device=device)
    masked[:, 0] = False  # the pending token may be the mask id itself (AR may choose it)
    steps = torch.full((b, length), -1, dtype=torch.long, device=device)
    probs = None if sampling.greedy else torch.zeros(b, length, model.config.vocab_size, device=device)
    for step in range(params.draft_steps):
        if not bool(masked.any()):
            break
        logits = model.denoise_block(x, block_time(masked), context, positions=masked)
        tokens, confidence, q = draft_predictions(logits, params.mask_token_id, sampling, generator)
        committed = positions_to_commit(masked, confidence, step, params.draft_steps, params.confidence_threshold)
        x = torch.where(committed, x.masked_scatter(masked, tokens), x)
        if probs is not None:
            probs[masked] = q  # kept at a position once it is committed
        steps[committed] = step
        masked &= ~committed
        if on_step is not None:
            on_step(step, x, committed)
    return Draft(x, steps, probs)


def greedy_accept(draft: Draft, ar_logits: torch.Tensor):
    """(tokens kept per row [b]: the pending one and the accepted drafts; the AR token after
    them [b]). ar_logits [b, L, v]: position i predicts block position i+1."""
    target = ar_logits.argmax(-1)
    accepted = (draft.tokens[:, 1:] == target[:, :-1]).long().cumprod(-1).sum(-1)
    return accepted + 1, target.gather(1, accepted[:, None])[:, 0]


def sampled_accept(draft: Draft, ar_logits: torch.Tensor, sampling: Sampling, generator=None):
    """The speculative-sampling rule; returns what `greedy_accept` returns."""
    b, length = draft.tokens.shape
    p = sampling.probs(ar_logits)  # [b, L, v]
    drafts = draft.tokens[:, 1:, None]
    p_draft = p[:, :-1].gather(-1, drafts)[..., 0]
    q_draft = draft.probs[:, 1:].gather(-1, drafts)[..., 0]
    steps = draft.steps[:, 1:]
    in_order = steps == steps.cummax(-1).values if length > 1 else steps.bool()
    u = torch.rand(p_draft.shape, generator=generator, device=p.device)
    accepted = (in_order & (u * q_draft < p_draft)).long().cumprod(-1).sum(-1)
    rows = torch.arange(b, device=p.device)
    dist = p[rows, accepted]
    if length > 1:
        rejected = (accepted < length - 1) & in_order[rows, accepted.clamp(max=length - 2)]
        residual = (dist - draft.probs[rows, (accepted + 1).clamp(max=length - 1)]).clamp(min=0)
        dist = torch.where((rejected & (residual.sum(-1) > 0))[:, None], residual, dist)
    return accepted + 1, torch.multinomial(dist, 1, generator=generator)[:, 0]


class LockstepStream:
    """Hands a streamer the rows' tokens in lockstep, as the other modes do, although rows of a
    round commit different numbers: each put holds the same columns for every row still in the
    streamer's view (rows leave it after the put holding their EOS); a column goes out once
    every such row has it."""

    def __init__(self, streamer, out: torch.Tensor, eos_token_id: int | None, pad_token_id: int):
        self.streamer, self.out, self.eos, self.pad = streamer, out, eos_token_id, pad_token_id
        self.view = torch.arange(out.shape[0])
        self.sent = 0

    def flush(self, counts: torch.Tensor, ended: torch.Tensor) -> None:
        """counts [b]: tokens each row has in `out`; ended [b]: rows that hold their EOS."""
        if self.streamer is None or len(self.view) == 0:
            return
        ready = torch.where(ended[self.view], self.out.shape[1], counts[self.view])
        upto = int(ready.min())
        if upto <= self.sent:
            return
        tokens = until_eos(self.out[self.view, self.sent:upto], self.eos, self.pad)
        self.sent = upto
        if self.eos is not None:
            self.view = self.view[~(tokens == self.eos).any(-1)]
        self.streamer.put(tokens)


@torch.no_grad()
def generate_speculative(model, input_ids: torch.Tensor, max_new_tokens: int, params: SpeculativeParams,
                         sampling: Sampling, eos_token_id: int | None = None, options: dict | None = None):
    """See `TwoTowerForCausalLM.generate_speculative`; `options` holds attention_mask, generator,
    streamer, step_callback, use_cache, return_dict_in_generate and stats."""
    o = {"attention_mask": None, "generator": None, "streamer": None, "step_callback": None, "use_cache": True,
         "return_dict_in_generate": False, "stats": None, **(options or {})}
    if not 0 <= params.mask_token_id < model.config.vocab_size:
        raise ValueError(f"mask_token_id {params.mask_token_id} is outside the vocabulary")
    rows, stats, start = model._begin(input_ids, o["attention_mask"], max_new_tokens, *sampling, o["streamer"],
                                      o["stats"])
    generator, use_cache, pad = o["generator"], o["use_cache"], model.config.pad_token_id or 0
    b = input_ids.shape[0]
    stats.speculation = [RowSpeculation() for _ in range(b)]
    out = torch.full((b, max_new_tokens), pad, dtype=torch.long)
    counts, ended = torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.bool)
    stream = LockstepStream(o["streamer"], out, eos_token_id, pad)

    def commit(tokens: list[list[int]]) -> None:
        for r, row_tokens in zip(rows.index.tolist(), tokens):
            have = int(counts[r])
            row_tokens = row_tokens[:max_new_tokens - have]
            out[r, have:have + len(row_tokens)] = torch.tensor(row_tokens, dtype=torch.long)
            counts[r] = have + len(row_tokens)
            ended[r] = eos_token_id is not None and eos_token_id in row_tokens
        if stats.first_block_latency is None:
            stats.first_block_latency = time.perf_counter() - start
        stream.flush(counts, ended)

    _, h = model._context_for(rows, rows.seq.shape[1], use_cache, stats)
    pending = sample_next(model.context_lm_head(h[:, -1]).float(), *sampling, generator).cpu()
    commit(pending[:, None].tolist())
    round_index = 0
    while True:
        going = ~ended[rows.index] & (counts[rows.index] < max_new_tokens)
        if not bool(going.any()):
            break
        rows, pending = rows.select(going), pending[going.cpu()]
        length = min(params.block_size, int((max_new_tokens - counts[rows.index]).max()))
        context, _ = model._context_for(rows, rows.seq.shape[1], use_cache, stats)

        def on_step(step, x, committed):
            stats.denoiser_forwards += 1
            if o["step_callback"] is not None:
                o["step_callback"](DenoiseStep(round_index, step, x.cpu(), committed.cpu(), rows.index.clone()))

        draft = draft_block(model, pending, context.to(model.denoiser_device), length, params, sampling, generator,
                            on_step)
        h = model.context_tower(draft.tokens.to(model.context_device), context, tentative=use_cache)
        stats.context_forwards += 1
        ar_logits = model.context_lm_head(h).float().to(model.denoiser_device)
        if sampling.greedy:
            kept, pending = greedy_accept(draft, ar_logits)
        else:
            kept, pending = sampled_accept(draft, ar_logits, sampling, generator)
        kept, pending, block = kept.cpu(), pending.cpu(), draft.tokens.cpu()
        if use_cache:
            context.keep_prefixes(kept)
        rows.keep_prefixes(block, kept, pad)
        for r, k in zip(rows.index.tolist(), kept.tolist()):
            stats.speculation[r].drafted += length - 1
            stats.speculation[r].accepted_per_round.append(k - 1)
        commit([block[i, 1:k].tolist() + [int(pending[i])] for i, k in enumerate(kept.tolist())])
        round_index += 1
    return finish_generation(input_ids, out[:, :int(counts.max())], eos_token_id, pad, stats, start, o["streamer"],
                             o["return_dict_in_generate"])
