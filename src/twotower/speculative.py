"""Speculative decoding with the two towers: the denoiser drafts a block, the context tower
verifies it, and the output is exactly the context tower's own AR output.

A round, for every row of the batch:

1. **Draft.** The block's first position holds the row's pending token (the AR tower's last
   choice, not yet in the context cache); the other L-1 are masked. The denoiser fills them in
   `draft_steps` steps: one step predicts every position at once; more commit by the unmasking
   rule of `DiffusionParams` (`twotower.sampler`) and fill the rest at the last step.
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
   tower's and the denoiser's distributions with the same `SamplingParams` (temperature and
   filters).
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

import torch

from .cache import kept_columns
from .compiled import is_compiled
from .generation import RowSpeculation, finish_generation, streamed_part
from .params import DiffusionParams, GenerateOptions, SamplingParams, split_settings
from .sampler import DenoiseStep, block_time, commit_most_confident, sample_next, token_probs


@dataclass
class Draft:
    """A drafted block and what the acceptance rule needs of it."""

    tokens: torch.Tensor  # [b, L] the pending token, then the drafts
    steps: torch.Tensor  # [b, L] the draft step that committed each position (-1: the pending token)
    probs: torch.Tensor | None  # [b, L, v] each position's draft distribution (sampling only)


def draft_predictions(logits: torch.Tensor, mask_token_id: int, sampling: SamplingParams):
    """Draft tokens at masked positions from denoiser logits [n, v]: (tokens [n], confidence [n],
    draft distribution [n, v] or None when greedy). Confidence is the model's top probability,
    which for greedy drafts is the drawn token's, as in diffusion; the mask is never drafted."""
    logits = logits.float().index_fill(-1, torch.tensor([mask_token_id], device=logits.device), float("-inf"))
    confidence = logits.softmax(-1).amax(-1)
    if sampling.greedy:
        return logits.argmax(-1), confidence, None
    q = token_probs(logits, sampling)
    return torch.multinomial(q, 1, generator=sampling.generator)[:, 0], confidence, q


def draft_block(denoise, pending: torch.Tensor, length: int, diffusion: DiffusionParams, sampling: SamplingParams,
                vocab_size: int, on_step=None) -> Draft:
    """Fill `length` - 1 masked positions after the pending tokens [b] in up to
    `diffusion.draft_steps` steps. `denoise(x, t, masked)` -> logits at the masked positions;
    `on_step(step, tokens, committed)` follows every step."""
    b, device, mask_id, steps = pending.shape[0], pending.device, diffusion.mask_token_id, diffusion.draft_steps
    x = torch.full((b, length), mask_id, dtype=torch.long, device=device)
    x[:, 0] = pending
    masked = torch.ones(b, length, dtype=torch.bool, device=device)
    masked[:, 0] = False  # the pending token may be the mask id itself (AR may choose it)
    step_of = torch.full((b, length), -1, dtype=torch.long, device=device)
    probs = None if sampling.greedy else torch.zeros(b, length, vocab_size, device=device)
    rule = diffusion.rule()
    for step in range(steps):
        if not bool(masked.any()):
            break
        tokens, confidence, q = draft_predictions(denoise(x, block_time(masked), masked), mask_id, sampling)
        confidence = torch.full(x.shape, float("-inf"), device=device).masked_scatter(masked, confidence)
        count = rule.commit_count(masked, confidence, step, steps)
        x, committed = commit_most_confident(x, x.masked_scatter(masked, tokens), confidence, count)
        if probs is not None:
            probs[masked] = q  # kept at a position once it is committed
        step_of[committed] = step
        masked &= ~committed
        if on_step is not None:
            on_step(step, x, committed)
    return Draft(x, step_of, probs)


def greedy_accept(draft: Draft, ar_logits: torch.Tensor):
    """(tokens kept per row [b]: the pending one and the accepted drafts; the AR token after
    them [b]). ar_logits [b, L, v]: position i predicts block position i+1."""
    target = ar_logits.argmax(-1)
    accepted = (draft.tokens[:, 1:] == target[:, :-1]).long().cumprod(-1).sum(-1)
    return accepted + 1, target.gather(1, accepted[:, None])[:, 0]


def sampled_accept(draft: Draft, ar_logits: torch.Tensor, sampling: SamplingParams):
    """The speculative-sampling rule; returns what `greedy_accept` returns."""
    b, length = draft.tokens.shape
    p = token_probs(ar_logits, sampling)  # [b, L, v]
    drafts = draft.tokens[:, 1:, None]
    p_draft = p[:, :-1].gather(-1, drafts)[..., 0]
    q_draft = draft.probs[:, 1:].gather(-1, drafts)[..., 0]
    steps = draft.steps[:, 1:]
    in_order = steps == steps.cummax(-1).values  # no position before it committed at a later step
    u = torch.rand(p_draft.shape, generator=sampling.generator, device=p.device)
    accepted = (in_order & (u * q_draft < p_draft)).long().cumprod(-1).sum(-1)
    rows = torch.arange(b, device=p.device)
    dist = p[rows, accepted]
    if length > 1:
        rejected = (accepted < length - 1) & in_order[rows, accepted.clamp(max=length - 2)]
        residual = (dist - draft.probs[rows, (accepted + 1).clamp(max=length - 1)]).clamp(min=0)
        dist = torch.where((rejected & (residual.sum(-1) > 0))[:, None], residual, dist)
    return accepted + 1, torch.multinomial(dist, 1, generator=sampling.generator)[:, 0]


class LockstepStream:
    """Hands a streamer the rows' tokens in lockstep, as the other modes do, although rows of a
    round commit different numbers: each put holds the same columns for every row still in the
    streamer's view (rows leave it after the put holding their EOS; what follows an EOS is
    padding, and no column follows the last row's EOS); a column goes out once every such row
    has it."""

    def __init__(self, run, out: torch.Tensor):
        self.run, self.out = run, out
        self.view = torch.arange(out.shape[0])
        self.sent = 0

    def flush(self, counts: torch.Tensor, ended: torch.Tensor, last: bool = False) -> None:
        """counts [b]: tokens each row has in `out`; ended [b]: rows that hold their EOS. `last`:
        the call ends (at max_time: rows with fewer tokens get padding, as in the result)."""
        if self.run.options.streamer is None or len(self.view) == 0:
            return
        ready = torch.where(ended[self.view], self.out.shape[1], counts[self.view])
        upto = int(counts[self.view].max()) if last else int(ready.min())
        if upto <= self.sent:
            return
        eos = self.run.options.eos_token_id
        tokens = streamed_part(self.out[self.view, self.sent:upto], eos, self.run.pad_token_id)
        self.sent = upto
        if eos is not None:
            self.view = self.view[~(tokens == eos).any(-1)]
        if tokens.shape[1]:
            self.run.put(tokens)


class Committed:
    """The tokens each row of the batch has committed: `out` [b, max_new_tokens], how many, and
    whether a row holds its EOS."""

    def __init__(self, run, batch: int, max_new_tokens: int):
        self.run, self.max_new_tokens = run, max_new_tokens
        self.out = torch.full((batch, max_new_tokens), run.pad_token_id, dtype=torch.long)
        self.counts, self.ended = torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.bool)
        self.stream = LockstepStream(run, self.out)

    def add(self, rows: torch.Tensor, tokens: list[list[int]]) -> None:
        eos = self.run.options.eos_token_id
        for r, row_tokens in zip(rows.tolist(), tokens):
            have = int(self.counts[r])
            row_tokens = row_tokens[:self.max_new_tokens - have]
            self.out[r, have:have + len(row_tokens)] = torch.tensor(row_tokens, dtype=torch.long)
            self.counts[r] = have + len(row_tokens)
            self.ended[r] = eos is not None and eos in row_tokens
        stats = self.run.stats
        if stats.first_block_latency is None:
            stats.first_block_latency = time.perf_counter() - self.run.start
        self.stream.flush(self.counts, self.ended)

    def going(self, rows: torch.Tensor) -> torch.Tensor:
        """Which of `rows` still generate."""
        return ~self.ended[rows] & (self.counts[rows] < self.max_new_tokens)

    def result(self) -> torch.Tensor:
        self.stream.flush(self.counts, self.ended, last=True)
        return self.out[:, :int(self.counts.max())]


@torch.no_grad()
def generate_speculative(model, input_ids: torch.Tensor, max_new_tokens: int = 128, *,
                         attention_mask: torch.Tensor | None = None, sampling: SamplingParams | None = None,
                         diffusion: DiffusionParams | None = None, options: GenerateOptions | None = None, **kwargs):
    """See `TwoTowerForCausalLM.generate_speculative`."""
    sampling, diffusion, options = split_settings("generate_speculative", kwargs, sampling, diffusion, options)
    diffusion = diffusion.resolve(model.config)
    rows, run = model._begin(input_ids, attention_mask, max_new_tokens, sampling, options)
    stats, use_cache = run.stats, options.use_cache
    stats.speculation = [RowSpeculation() for _ in range(input_ids.shape[0])]
    done = Committed(run, input_ids.shape[0], max_new_tokens)

    _, h = model._context_for(rows, rows.seq.shape[1], use_cache, stats)
    pending = sample_next(model.context_lm_head(h[:, -1]).float(), run.sampling).cpu()
    done.add(rows.index, pending[:, None].tolist())
    round_index = 0
    # the compiled path keeps one shape for every round, so one graph: a short last round drafts a
    # whole block, and the statistics count what the eager path drafts
    fixed_length = is_compiled(model)
    while not run.out_of_time():
        going = done.going(rows.index)
        if not bool(going.any()):
            break
        rows, pending = rows.select(going), pending[going]
        useful = min(diffusion.block_size, int((max_new_tokens - done.counts[rows.index]).max()))
        length = diffusion.block_size if fixed_length else useful
        context, _ = model._context_for(rows, rows.seq.shape[1], use_cache, stats)
        on_denoiser = context.to(model.denoiser_device)

        def denoise(x, t, masked):
            stats.denoiser_forwards += 1
            return model.denoise_block(x, t, on_denoiser, positions=masked)

        def on_step(step, x, committed):
            if options.step_callback is not None:
                options.step_callback(DenoiseStep(round_index, step, x.cpu(), committed.cpu(), rows.index.clone()))

        draft = draft_block(denoise, pending.to(model.denoiser_device), length, diffusion, run.sampling,
                            model.config.vocab_size, on_step)
        h = model.context_tower(draft.tokens.to(model.context_device), context, tentative=use_cache)
        stats.context_forwards += 1
        ar_logits = model.context_lm_head(h).float().to(model.denoiser_device)
        if run.sampling.greedy:
            kept, pending = greedy_accept(draft, ar_logits)
        else:
            kept, pending = sampled_accept(draft, ar_logits, run.sampling)
        kept, pending, block = kept.cpu(), pending.cpu(), draft.tokens.cpu()
        if use_cache:
            context.keep_prefixes(kept)
        rows.keep_prefixes(block, kept, run.pad_token_id)
        for r, k in zip(rows.index.tolist(), kept.tolist()):
            stats.speculation[r].drafted_per_round.append(useful - 1)
            stats.speculation[r].accepted_per_round.append(min(k, useful) - 1)
        done.add(rows.index, [block[i, 1:k].tolist() + [int(pending[i])] for i, k in enumerate(kept.tolist())])
        round_index += 1
    return finish_generation(input_ids, done.result(), run)
