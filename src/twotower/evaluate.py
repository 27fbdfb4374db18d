"""Quality measures shared by the recipe's model card, `twotower bench` and the lm-eval adapter.

* AR perplexity through the context tower (exact: one causal forward, no Monte-Carlo);
* the AR tower's perplexity of generated continuations (how fluent a mode's output is);
* exact-match accuracy on the project's exact-answer tasks.
"""

from __future__ import annotations

import math
import time
from itertools import zip_longest

import torch
import torch.nn.functional as F

from .generation import through_eos
from .modes import run_mode
from .tasks import score_exact


def ar_parts(model):
    """(tower, head) that make a causal LM out of a two-tower model (its context side) or a
    single-tower one."""
    if hasattr(model, "context_tower"):
        return model.context_tower, model.context_lm_head
    return model.backbone, model.lm_head


@torch.no_grad()
def token_scores(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None):
    """(log p(ids[:, t] | ids[:, :t]), whether ids[:, t] is the AR tower's greedy choice) for t >= 1.
    ids [b, n] -> ([b, n-1] float32, [b, n-1] bool). With `positions` (bool [b, n-1]) the head
    runs at those targets only (a continuation after a long context); elsewhere 0 and True."""
    tower, head = ar_parts(model)
    h, targets = tower(ids, None, attention_mask)[:, :-1], ids[:, 1:]
    if positions is not None:
        h, targets = h[positions], targets[positions]
    logits = head(h).float()
    logprobs, greedy = F.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0], logits.argmax(-1) == targets
    if positions is None:
        return logprobs, greedy
    return (torch.zeros(positions.shape, device=ids.device).masked_scatter(positions, logprobs),
            torch.ones_like(positions).masked_scatter(positions, greedy))


def token_logprobs(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, :t]) for t >= 1 under the AR tower. ids [b, n] -> [b, n-1] float32."""
    return token_scores(model, ids, attention_mask)[0]


@torch.no_grad()
def continuation_nll(model, prompt: list[int], continuation: list[int]) -> tuple[float, int]:
    """(sum of -log p of the continuation's tokens given the prompt, number of tokens)."""
    if not continuation:
        return 0.0, 0
    ids = torch.tensor([prompt + continuation])
    lp = token_logprobs(model, ids)[0, len(prompt) - 1:]
    return float(-lp.sum()), len(continuation)


def perplexity(nll_and_counts) -> float:
    nll_and_counts = list(nll_and_counts)  # read twice below; a generator would be empty the second time
    total = sum(n for n, _ in nll_and_counts)
    count = sum(c for _, c in nll_and_counts)
    return math.exp(total / count) if count else float("nan")


def left_pad(rows: list[list[int]], pad_id: int):
    """[b, n] ids left-padded with pad_id, and the attention mask (None when nothing is padded)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, None if bool(mask.all()) else mask


@torch.no_grad()
def run_generation(model, tokenizer, prompts: list[str], mode: str, max_new_tokens: int, batch_size: int = 1,
                   **kw) -> tuple[list[list[int]], dict]:
    """Generate for every prompt in batches; returns (generated ids per prompt, summed statistics,
    and `first_block_latency`, the first batch's).

    Only generated tokens count (prompt and padding never do)."""
    eos = tokenizer.eos_token_id
    counted = ("generated_tokens", "denoiser_forwards", "context_forwards", "drafted_tokens", "accepted_tokens", "rounds")
    outputs, totals = [], {**dict.fromkeys(counted, 0), "wall_time": 0.0}
    for i in range(0, len(prompts), batch_size):
        rows = [tokenizer(p).input_ids for p in prompts[i:i + batch_size]]
        ids, mask = left_pad(rows, tokenizer.pad_token_id)
        start = time.perf_counter()
        out = run_mode(model, mode, ids, max_new_tokens, attention_mask=mask, eos_token_id=eos,
                       return_dict_in_generate=True, **kw)
        elapsed = time.perf_counter() - start
        outputs += [through_eos(row, eos)[0] for row in out.sequences[:, ids.shape[1]:].tolist()]
        for key in counted:
            totals[key] += getattr(out.stats, key)
        totals["acceptance_counts"] = add_counts(totals.get("acceptance_counts"), out.stats.acceptance_counts)
        totals["wall_time"] += elapsed
        totals.setdefault("first_block_latency", out.stats.first_block_latency)
    return outputs, totals


def add_counts(a: tuple[list[int], ...] | None, b: tuple[list[int], ...] | None) -> tuple[list[int], ...] | None:
    """Per-position counts (as `GenerationStats.acceptance_counts`) added position by position."""
    if a is None or b is None:
        return b if a is None else a
    return tuple([x + y for x, y in zip_longest(u, v, fillvalue=0)] for u, v in zip(a, b))


def story_quality(model, tokenizer, prompts: list[str], generated: list[list[int]]) -> float:
    """The AR tower's perplexity of the generated continuations (EOS excluded)."""
    eos = tokenizer.eos_token_id
    return perplexity(continuation_nll(model, tokenizer(p).input_ids, [t for t in g if t != eos])
                      for p, g in zip(prompts, generated))


def task_accuracy(tokenizer, tasks, generated: list[list[int]]) -> float:
    """Fraction of tasks whose generated answer (up to the first newline) is exactly right."""
    if not tasks:
        return float("nan")
    right = sum(score_exact(t, tokenizer.decode(g, skip_special_tokens=True)) for t, g in zip(tasks, generated))
    return right / len(tasks)


__all__ = ["ar_parts", "token_scores", "token_logprobs", "continuation_nll", "perplexity",
           "left_pad", "run_generation", "add_counts", "story_quality", "task_accuracy"]
