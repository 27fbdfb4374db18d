"""What every generation mode shares: prompt checks, the state of one call (`Run`), the AR loop,
the end of a call, statistics and the row streamer."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from .compiled import compile_for_decoding, compile_seconds, is_compiled
from .params import GenerateOptions, SamplingParams, generation_settings, split_settings
from .sampler import sample_next


@dataclass
class RowSpeculation:
    """One row's draft-and-verify rounds in speculative decoding: every round commits the
    accepted drafted tokens and one token of the AR tower's."""

    drafted_per_round: list[int] = field(default_factory=list)  # tokens the denoiser proposed, per round
    accepted_per_round: list[int] = field(default_factory=list)  # of those, accepted, per round

    @property
    def drafted(self) -> int:
        return sum(self.drafted_per_round)

    @property
    def accepted(self) -> int:
        return sum(self.accepted_per_round)

    @property
    def rounds(self) -> int:
        return len(self.accepted_per_round)

    @property
    def tokens_per_round(self) -> float:
        """Tokens a round commits: the accepted drafts and the AR tower's own token."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


def acceptance_counts(rounds) -> tuple[list[int], list[int]]:
    """How far into a block drafts agree with AR, from rounds given as (drafted, accepted) pairs.

    Returns (reached, accepted), lists over draft positions k = 1, 2, ...: reached[k-1] counts the
    rounds that proposed a k-th draft after accepting the k-1 before it, accepted[k-1] those that
    accepted it too; accepted[k-1] / reached[k-1] is the chance that draft k agrees with AR given
    that the drafts before it did. Lists from several calls add up position by position."""
    rounds = list(rounds)
    length = max((d for d, _ in rounds), default=0)
    reached, accepted = [0] * length, [0] * length
    for drafted, kept in rounds:
        if not 0 <= kept <= drafted:
            raise ValueError(f"a round accepts 0 to {drafted} drafts, got {kept}")
        for k in range(min(kept + 1, drafted)):
            reached[k] += 1
            accepted[k] += k < kept
    return reached, accepted


@dataclass
class GenerationStats:
    """What a generate call cost. Counts exclude prompt and padding tokens.

    `first_block_latency`: seconds from the call to the first committed output, the first block in
    mask diffusion and the first token (a block of one) in the token-by-token modes.
    `speculation`: speculative decoding's rounds, one entry per row of the batch (empty in the
    other modes); the properties below sum them."""

    generated_tokens: int = 0
    denoiser_forwards: int = 0
    context_forwards: int = 0
    wall_time: float = 0.0
    first_block_latency: float | None = None
    compile_seconds: float = 0.0  # of wall_time, in calls that compiled a graph (`twotower.compiled`)
    speculation: list[RowSpeculation] = field(default_factory=list)

    @property
    def drafted_tokens(self) -> int:
        return sum(r.drafted for r in self.speculation)

    @property
    def accepted_tokens(self) -> int:
        return sum(r.accepted for r in self.speculation)

    @property
    def acceptance_counts(self) -> tuple[list[int], list[int]]:
        """`acceptance_counts` over every row's rounds."""
        return acceptance_counts(pair for r in self.speculation
                                 for pair in zip(r.drafted_per_round, r.accepted_per_round))

    @property
    def rounds(self) -> int:
        """Draft-and-verify rounds, counted per row."""
        return sum(r.rounds for r in self.speculation)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens a round commits: the accepted drafts and the AR tower's own token."""
        return (self.accepted_tokens + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_denoiser_forward(self) -> float:
        return self.generated_tokens / self.denoiser_forwards if self.denoiser_forwards else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_time if self.wall_time else 0.0


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [b, prompt + generated], finished rows padded with pad_token_id
    stats: GenerationStats = field(default_factory=GenerationStats)


class StopGeneration(Exception):
    """Raised by a streamer's `put` to end a generate call early (see `RowStreamer`)."""


class RowStreamer:
    """A streamer that hands each row of a batch its committed tokens, and ends the generate call
    once no row wants more (each met a stop string, or its client went away).

    `take(row, tokens)` gets a row's new tokens (a block, or one token in the token-by-token modes;
    row: the index in the batch); `done(row)` says whether the row wants no more. After the prompt,
    each `put` holds the rows still in the model's batch, which rows leave after their EOS (`take`
    must count a row that got its EOS as done); a row done for another reason rides along. Once
    every row is done, `put` raises StopGeneration for the caller to catch; the call's statistics
    so far are in the `stats` it was given.
    """

    def __init__(self, rows: int, take, done, eos_token_id: int | None):
        self.rows, self.take, self.done, self.eos_token_id = rows, take, done, eos_token_id
        self.active = torch.arange(rows)
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # the first put is the prompt
            self.seen_prompt = True
            return
        tokens = value.reshape(len(self.active), -1)
        for row, row_tokens in zip(self.active.tolist(), tokens.tolist()):
            if not self.done(row):
                self.take(row, row_tokens)
        if self.eos_token_id is not None:
            self.active = self.active[~(tokens == self.eos_token_id).any(-1)]
        if all(self.done(row) for row in range(self.rows)):
            raise StopGeneration

    def end(self) -> None:
        pass


def left_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row of attention_mask [b, n] is zeros then ones (padding only on the left)."""
    mask = attention_mask.bool()
    return bool((mask[:, 1:] >= mask[:, :-1]).all())


def validate_prompt(input_ids: torch.Tensor, vocab_size: int, attention_mask: torch.Tensor | None = None,
                    forbidden_id: int | None = None) -> None:
    """Raise ValueError for prompts a model cannot take: empty, out-of-vocabulary, a forbidden id."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
            torch.int64, torch.int32):
        raise ValueError("input_ids must be an integer tensor of shape [batch, length]")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if not bool(attention_mask.bool().any(-1).all()):
            raise ValueError("empty prompt: a row of attention_mask has no real token")
        if not left_padded(attention_mask):
            raise ValueError("attention_mask has padding after a real token (right padding?): generation needs "
                             "prompts padded on the left; set tokenizer.padding_side = 'left'")
    real = input_ids if attention_mask is None else input_ids[attention_mask.bool()]
    lo, hi = int(real.min()), int(real.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab_size})")
    if forbidden_id is not None and bool((real == forbidden_id).any()):
        raise ValueError(f"the prompt contains token id {forbidden_id} (the mask token), which only the "
                         "sampler may place")


@dataclass
class Run:
    """One generate call in progress: its settings (the sampling generator fixed for the call),
    statistics, start time and padding id."""

    sampling: SamplingParams
    options: GenerateOptions
    stats: GenerationStats
    start: float
    pad_token_id: int
    model: object  # the model generating, whose compile time the call reports
    compile_start: float  # the model's compile seconds when the call began

    def out_of_time(self) -> bool:
        max_time = self.options.max_time
        return max_time is not None and time.perf_counter() - self.start > max_time

    def put(self, tokens: torch.Tensor) -> None:
        if self.options.streamer is not None:
            self.options.streamer.put(tokens.cpu())


def start_run(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
              sampling: SamplingParams, options: GenerateOptions, forbidden_id: int | None = None) -> Run:
    """Check a call's prompt against the model's config, switch the compiled path on if asked, hand
    the prompt to the streamer, start the clock."""
    config = model.config
    validate_prompt(input_ids, config.vocab_size, attention_mask, forbidden_id)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if options.compile or is_compiled(model):  # on, and with any replaced MoE weights packed again
        compile_for_decoding(model)
    stats = options.stats if options.stats is not None else GenerationStats()
    run = Run(sampling.for_call(), options, stats, time.perf_counter(), config.pad_token_id or 0, model,
              compile_seconds(model))
    run.put(input_ids)
    return run


@torch.no_grad()
def decode_ar(step, cache, logits: torch.Tensor, max_new_tokens: int, run: Run) -> torch.Tensor:
    """The AR loop: sample from `logits` [b, v], feed the token back through `step(ids [b', 1],
    cache) -> logits [b', v]`, until `max_new_tokens`, `max_time`, or every row has emitted EOS.
    The first token's time goes to `stats.first_block_latency`.

    Finished rows leave the batch (the cache keeps only active rows), so they cost nothing.
    Returns the generated tokens [b, n] (n <= max_new_tokens), pad after a row's EOS.
    """
    b, eos = logits.shape[0], run.options.eos_token_id
    out = torch.full((b, max_new_tokens), run.pad_token_id, dtype=torch.long, device=logits.device)
    active = torch.arange(b, device=logits.device)
    n = 0
    for n in range(1, max_new_tokens + 1):
        token = sample_next(logits, run.sampling)
        out[active, n - 1] = token
        if n == 1:
            run.stats.first_block_latency = time.perf_counter() - run.start
        run.put(token)
        if n == max_new_tokens or run.out_of_time():
            break
        if eos is not None:
            keep = token != eos
            if not bool(keep.all()):
                active, token, cache = active[keep], token[keep], cache.select(keep)
                if active.numel() == 0:
                    break
        logits = step(token[:, None], cache)
    return out[:, :n]


@torch.no_grad()
def generate_ar(model, input_ids: torch.Tensor, max_new_tokens: int = 128, *,
                attention_mask: torch.Tensor | None = None, sampling: SamplingParams | None = None,
                options: GenerateOptions | None = None, **kwargs):
    """Cached autoregressive generation with a single-tower model.

    Batches of prompts of different lengths are left-padded with `attention_mask` (0 = pad);
    every row gets the tokens it would get alone. Settings come as `SamplingParams` and
    `GenerateOptions`, or as their fields by keyword (temperature=..., eos_token_id=...).
    Returns [b, prompt + generated] or a `GenerateOutput` with statistics (also kept in
    `options.stats` when given, as they grow).
    """
    sampling, _, options = split_settings("generate_ar", kwargs, sampling, None, options,
                                          takes=("sampling", "options"))
    refuse_step_callback(options, "generate_ar")
    run = start_run(model, input_ids, attention_mask, max_new_tokens, sampling, options)
    cache = model.new_cache()
    logits = model(input_ids, attention_mask, cache, logits_to_keep=1).logits[:, -1]
    run.stats.context_forwards += 1

    def step(ids, cache):
        run.stats.context_forwards += 1
        return model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1]

    return finish_generation(input_ids, decode_ar(step, cache, logits, max_new_tokens, run), run)


def refuse_step_callback(options: GenerateOptions, caller: str) -> None:
    if options.step_callback is not None:
        raise ValueError(f"{caller}() has no denoising steps: step_callback is for mask diffusion")


def until_eos(new: torch.Tensor, eos_token_id: int | None, pad_token_id: int) -> torch.Tensor:
    """Replace every token after a row's first EOS by pad. new [b, n]."""
    if eos_token_id is None:
        return new
    return new.masked_fill(after_eos(new, eos_token_id), pad_token_id)


def through_eos(tokens: list[int], eos_token_id: int | None) -> tuple[list[int], bool]:
    """A row's tokens up to and including its first EOS (what follows is padding), and whether it
    holds one."""
    if eos_token_id is None or eos_token_id not in tokens:
        return tokens, False
    return tokens[:tokens.index(eos_token_id) + 1], True


def after_eos(new: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """True at the positions after a row's first EOS. new [b, n] -> bool [b, n]."""
    is_eos = (new == eos_token_id).long()
    return is_eos.cumsum(-1) - is_eos > 0


def streamed_part(block: torch.Tensor, eos_token_id: int | None, pad_token_id: int) -> torch.Tensor:
    """What of a committed block [b, L] a streamer gets: each row through its EOS, pad after it,
    and no column after the last row's EOS (a single row's stream ends at its EOS)."""
    if eos_token_id is None:
        return block
    after = after_eos(block, eos_token_id)
    return block.masked_fill(after, pad_token_id)[:, :int((~after).sum(-1).max())]


def finish_generation(input_ids: torch.Tensor, new: torch.Tensor, run: Run):
    """Trim after EOS (and the columns after every row's EOS), count generated tokens (up to and
    including EOS), close the streamer, build the result."""
    new, eos = new.cpu(), run.options.eos_token_id
    if eos is None:
        run.stats.generated_tokens = new.numel()
    else:
        after = after_eos(new, eos)
        new = new.masked_fill(after, run.pad_token_id)[:, :int((~after).sum(-1).max())]
        run.stats.generated_tokens = int((~after).sum())
    run.stats.wall_time = time.perf_counter() - run.start
    run.stats.compile_seconds = compile_seconds(run.model) - run.compile_start
    if run.options.streamer is not None:
        run.options.streamer.end()
    sequences = torch.cat([input_ids.cpu(), new], dim=1)
    return GenerateOutput(sequences, run.stats) if run.options.return_dict_in_generate else sequences


def transformers_generate(model, input_ids, generation_config, streamer, kwargs: dict, run) -> torch.Tensor:
    """transformers' `generate(input_ids, generation_config, streamer, **kwargs)` for either model
    class: `generation_config` (default: `model.generation_config`) updated by `kwargs` gives the
    settings (see `params.generation_settings`); keyword arguments that are not generation fields
    pass through. `run(config, input_ids, max_new_tokens, attention_mask, settings)` generates,
    `settings` being the settings objects' fields by name (`params.split_settings`). A generation
    config's `pad_token_id` other than the model's pads each row after its EOS."""
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    extra = config.update(**kwargs)
    if input_ids is None:
        raise ValueError("generate() needs input_ids (a prompt of at least one token)")
    max_new_tokens, settings = generation_settings(config, model.config, input_ids.shape[1])
    attention_mask = extra.pop("attention_mask", None)
    out = run(config, input_ids, max_new_tokens, attention_mask, {**settings, **extra, "streamer": streamer})
    eos, pad = settings.get("eos_token_id"), config.pad_token_id
    if pad is None or eos is None or pad == (model.config.pad_token_id or 0):
        return out
    n = input_ids.shape[1]

    def padded_after_eos(sequences):
        return torch.cat([sequences[:, :n], until_eos(sequences[:, n:], eos, pad)], dim=1)

    if isinstance(out, GenerateOutput):
        out.sequences = padded_after_eos(out.sequences)
        return out
    return padded_after_eos(out)
