"""From logits to tokens: filtering and sampling, and the block sampler of mask diffusion with its
pluggable unmasking rules.

`sample_block(denoise, rule, x, ...)` denoises one block: each step `denoise(x, t)` gives logits
at the block's masked positions (committed positions never change, so the head is not run there),
every masked position gets a prediction and a confidence, and `rule.commit_count` says how many of
the most confident each row commits. The mask token can never be predicted; confidence is the
model's unscaled probability of the predicted token, also when sampling. Every rule commits at
least ceil(masked / steps left) positions so the block finishes in time, and everything on the
last step. The rules (`UNMASKING_RULES`, a name for the command line and the server):

* "confidence": every position above `confidence_threshold`, at least one (the release's rule;
  Megatron-LM's `DiffusionProcess.sample_block` in the same spirit);
* "fixed": exactly ceil(masked / steps left), the most confident first: block_size /
  steps_per_block tokens per step (LLaDA's `generate.py` with `remasking="low_confidence"`).

A new rule is a small class with `from_params(diffusion)` and `commit_count(masked, confidence,
step, steps)`, added to `UNMASKING_RULES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# ---------------------------------------------------------------------------- filtering and sampling

def _keep_probable(logits: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """logits with `drop` positions at -inf, except each row's most likely token."""
    drop = drop & (logits < logits.max(-1, keepdim=True).values)
    return logits.masked_fill(drop, float("-inf"))


def filter_logits(logits: torch.Tensor, sampling) -> torch.Tensor:
    """Set logits [..., v] outside the filters of `sampling` (a `SamplingParams`) to -inf: top-k,
    the top-p nucleus, then epsilon and eta truncation, as transformers orders its warpers."""
    top_k, top_p = sampling.top_k, sampling.top_p
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix reaching top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if sampling.epsilon_cutoff:
        logits = _keep_probable(logits, logits.softmax(-1) < sampling.epsilon_cutoff)
    if sampling.eta_cutoff:
        probs = logits.softmax(-1)
        entropy = -(probs * logits.log_softmax(-1).masked_fill(probs == 0, 0.0)).sum(-1, keepdim=True)
        eta = torch.minimum(torch.tensor(sampling.eta_cutoff), sampling.eta_cutoff ** 0.5 * torch.exp(-entropy))
        logits = _keep_probable(logits, probs < eta)
    return logits


def token_probs(logits: torch.Tensor, sampling) -> torch.Tensor:
    """The distribution a sampled token is drawn from: logits [..., v] scaled by the temperature,
    filtered, normalised."""
    return filter_logits(logits.float() / sampling.temperature, sampling).softmax(-1)


def sample_next(logits: torch.Tensor, sampling) -> torch.Tensor:
    """Next token per row from logits [b, v]: argmax when greedy, else drawn from `token_probs`
    with `sampling.generator`."""
    if sampling.greedy:
        return logits.argmax(-1)
    return torch.multinomial(token_probs(logits, sampling), 1, generator=sampling.generator)[:, 0]


def predict(logits: torch.Tensor, mask_token_id: int, sampling):
    """Prediction and its confidence at every position. logits [..., v] -> (pred [...], conf [...]).

    Greedy: argmax. Sampling: Gumbel-max over the temperature-scaled, filtered logits."""
    logits = logits.float().index_fill(-1, torch.tensor([mask_token_id], device=logits.device), float("-inf"))
    probs = logits.softmax(-1)
    if sampling.greedy:
        pred = logits.argmax(-1)
    else:
        scaled = filter_logits(logits / sampling.temperature, sampling)
        u = torch.rand(scaled.shape, generator=sampling.generator, device=scaled.device).clamp_(1e-20, 1.0)
        pred = (scaled - torch.log(-torch.log(u))).argmax(-1)
    return pred, probs.gather(-1, pred[..., None])[..., 0]


# ---------------------------------------------------------------------------- unmasking rules

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


def finish_in_time(masked_count: torch.Tensor, step: int, steps: int) -> torch.Tensor:
    """ceil(masked / steps left): the fewest commits per row that still finish the block. [b] -> [b]."""
    left = max(steps - step, 1)
    return torch.div(masked_count + left - 1, left, rounding_mode="floor")


@dataclass(frozen=True)
class ConfidenceThreshold:
    """Commit every masked position whose confidence exceeds `threshold` (at least one)."""

    threshold: float

    @classmethod
    def from_params(cls, diffusion) -> "ConfidenceThreshold":
        return cls(float(diffusion.confidence_threshold))

    def commit_count(self, masked: torch.Tensor, confidence: torch.Tensor, step: int, steps: int) -> torch.Tensor:
        m = masked.sum(-1)
        confident = (masked & (confidence > self.threshold)).sum(-1)
        return torch.minimum(torch.maximum(confident.clamp(min=1), finish_in_time(m, step, steps)), m)


@dataclass(frozen=True)
class FixedSchedule:
    """Commit ceil(masked / steps left) positions per step whatever their confidence."""

    @classmethod
    def from_params(cls, diffusion) -> "FixedSchedule":
        return cls()

    def commit_count(self, masked: torch.Tensor, confidence: torch.Tensor, step: int, steps: int) -> torch.Tensor:
        return finish_in_time(masked.sum(-1), step, steps)


UNMASKING_RULES = {"confidence": ConfidenceThreshold, "fixed": FixedSchedule}


def commit_most_confident(x: torch.Tensor, pred: torch.Tensor, confidence: torch.Tensor,
                          count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Commit each row's `count` most confident predictions (ties: the earlier position).
    x, pred [b, L]; confidence [b, L] (-inf where not masked); count [b].
    Returns (new x, committed [b, L] bool)."""
    order = confidence.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(x.shape[1], device=x.device).expand_as(order))
    committed = (confidence > float("-inf")) & (rank < count[:, None])
    return torch.where(committed, pred, x), committed


def denoise_step(x: torch.Tensor, logits: torch.Tensor, rule, step: int, steps: int, mask_token_id: int,
                 sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """One denoising step on a block. x [b, L] (mask_token_id where still masked); logits [n, v] for
    the n masked positions of x in row-major order. Returns (new x, committed [b, L] bool)."""
    masked = x == mask_token_id
    pred, conf = predict(logits, mask_token_id, sampling)
    pred = x.masked_scatter(masked, pred)
    conf = torch.full(x.shape, float("-inf"), device=x.device).masked_scatter(masked, conf)
    count = rule.commit_count(masked, conf, step, steps)
    return commit_most_confident(x, pred, conf, count)


def sample_block(denoise, rule, x: torch.Tensor, steps: int, mask_token_id: int, sampling,
                 on_step=None) -> torch.Tensor:
    """Denoise block x [b, L] (mask_token_id where unknown) in up to `steps` steps; returns it
    filled. `denoise(x, t)` -> logits [n, v] at the n masked positions of x (row-major), t [b] the
    masked fraction of each row; `on_step(step, x, committed)` sees each step's result."""
    for step in range(steps):
        masked = x == mask_token_id
        if not bool(masked.any()):
            break
        x, committed = denoise_step(x, denoise(x, block_time(masked)), rule, step, steps, mask_token_id, sampling)
        if on_step is not None:
            on_step(step, x, committed)
    return x
