"""A TwoTower model as an lm-evaluation-harness model named `twotower`.

    python -m twotower.lm_eval_adapter --model twotower \\
        --model_args pretrained=PATH,mode=diffusion,confidence_threshold=0.8,block_size=16 --tasks ...

lm_eval 0.4.13 finds models only in its registry (it has no plugin entry points, and its
--include_path is for task files), so the `twotower` name exists once this module is imported:
run as above, the module registers it and hands its arguments to lm_eval's own command line;
from Python, `import twotower.lm_eval_adapter` before `lm_eval.simple_evaluate(model="twotower")`.

* `loglikelihood`, `loglikelihood_rolling`: exact, through the AR context tower (one causal
  forward per batch of requests, no Monte-Carlo);
* `generate_until`: the chosen mode (`diffusion`, `speculative`, `mock-ar` or `ar`). The text is cut at the
  first stop string. A batch is one generate call, which ends as soon as every row has met a stop
  string or EOS (a row done early rides along until then; with EOS it leaves the batch).

Model arguments: pretrained (default: the embedded model), mode, block_size,
confidence_threshold, steps_per_block, unmasking, draft_steps (speculative), max_length (context,
default 2048), max_gen_toks
(default 256), dtype, plus lm_eval's batch_size and device. A throughput summary is printed
after each kind of request.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .default import load_model
from .evaluate import left_pad, token_scores
from .generation import GenerationStats, RowStreamer, StopGeneration, through_eos
from .modes import get_mode, run_mode
from .params import DiffusionParams
from .tokenizer import IncrementalText

logger = logging.getLogger(__name__)

SAMPLING_KEYS = ("temperature", "top_k", "top_p")


@register_model("twotower")
class TwoTowerLM(TemplateLM):
    """lm_eval's model interface over a TwoTower model folder."""

    def __init__(self, pretrained: str | None = None, mode: str = "diffusion", block_size: int | None = None,
                 confidence_threshold: float | None = None, steps_per_block: int | None = None,
                 unmasking: str = "confidence", draft_steps: int = 1, max_length: int = 2048, max_gen_toks: int = 256,
                 dtype: str = "float32",
                 batch_size: int | str = 1, max_batch_size: int | None = None, device: str | None = None):
        # lm_eval passes max_batch_size, which only matters for batch_size "auto" (not supported here)
        super().__init__()
        self.mode = get_mode(mode).name
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size 'auto' is not supported by the twotower model; give a number")
        model, self.tokenizer = load_model(pretrained, getattr(torch, dtype))
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm_eval's command line asks for cuda:0
        self.model = model.to(device)
        self._device = torch.device(device)
        self.diffusion = DiffusionParams(*(None if v is None else kind(v) for kind, v in (
            (int, block_size), (int, steps_per_block), (float, confidence_threshold))), unmasking=unmasking,
            draft_steps=int(draft_steps))
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        self.counts = {}

    # ---------------------------------------------------------------- tokens

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=False).input_ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # ---------------------------------------------------------------- throughput

    def _count(self, kind: str, **amounts) -> None:
        totals = self.counts.setdefault(kind, dict.fromkeys(amounts, 0))
        for key, value in amounts.items():
            totals[key] += value

    def throughput(self, kind: str) -> str:
        """One line on what the requests of `kind` cost so far."""
        c = self.counts[kind]
        rate = c["tokens"] / c["seconds"] if c["seconds"] else 0.0
        if kind != "generate_until":
            return (f"{kind}: {c['requests']} requests, {c['tokens']} tokens scored in {c['forwards']} AR-tower "
                    f"forwards, {c['seconds']:.1f}s, {rate:.1f} tokens/s")
        per_forward = f"{c['tokens'] / c['denoiser_forwards']:.2f}" if c["denoiser_forwards"] else "-"
        shown = {k: v for k, v in dataclasses.asdict(self.diffusion).items() if v is not None}
        settings = "".join(f", {k}={v}" for k, v in shown.items()) if get_mode(self.mode).uses_diffusion else ""
        return (f"generate_until ({self.mode}{settings}): "
                f"{c['requests']} requests, {c['tokens']} tokens generated in {c['seconds']:.1f}s, {rate:.1f} "
                f"tokens/s, {per_forward} tokens per denoiser forward, {c['context_forwards']} context forwards")

    def _report(self, kind: str) -> None:
        line = self.throughput(kind)
        logger.info(line)
        print(f"[twotower] {line}", flush=True)

    # ---------------------------------------------------------------- scoring

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) for
        each (context tokens, continuation tokens), in batches of similar length. Rows are padded on
        the right, which a causal model never sees from the real positions."""
        results = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for first in range(0, len(order), self.batch_size):
            chunk = order[first:first + self.batch_size]
            rows = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):] for i in chunk]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])
            spans = [(len(rows[j]) - 1 - len(pairs[i][1]), len(rows[j]) - 1) for j, i in enumerate(chunk)]
            scored = torch.zeros(len(chunk), width - 1, dtype=torch.bool)  # the continuations' targets
            for j, (start, end) in enumerate(spans):
                scored[j, start:end] = True
            device = self.model.context_device
            logprobs, greedy = token_scores(self.model, ids.to(device), positions=scored.to(device))
            for j, (i, (start, end)) in enumerate(zip(chunk, spans)):
                results[i] = (float(logprobs[j, start:end].sum()), bool(greedy[j, start:end].all()))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        start = time.perf_counter()
        results = self._score([(context, continuation) for _, context, continuation in requests])
        for (strings, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", strings, result)
        self._count("loglikelihood", requests=len(requests), tokens=sum(len(r[2]) for r in requests),
                    forwards=-(-len(requests) // self.batch_size), seconds=time.perf_counter() - start)
        self._report("loglikelihood")
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts after the EOS prefix, in windows of `max_length` tokens that
        each predict new tokens only."""
        start = time.perf_counter()
        windows, owner = [], []
        for i, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1):
                windows.append(make_disjoint_window(window))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score(windows)):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        self._count("loglikelihood_rolling", requests=len(requests), tokens=sum(len(w[1]) for w in windows),
                    forwards=-(-len(windows) // self.batch_size), seconds=time.perf_counter() - start)
        self._report("loglikelihood_rolling")
        return totals

    # ---------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations in the chosen mode, each cut at its first stop string. Requests with the
        same generation arguments are batched together."""
        groups = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        results = [None] * len(requests)
        for indices in groups.values():
            until, max_new, sampling = self._generation_args(requests[indices[0]].args[1])
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in chunk], until, max_new, sampling)
                for i, text in zip(chunk, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        self._report("generate_until")
        return results

    def _generation_args(self, kwargs: dict) -> tuple[list[str], int, dict]:
        """(stop strings, token budget, sampling settings) from a request's generation arguments."""
        kwargs = dict(kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = kwargs.pop("do_sample", False)
        sampling = {k: kwargs.pop(k) for k in SAMPLING_KEYS if k in kwargs}
        if kwargs:
            logger.warning("twotower ignores the generation arguments %s", sorted(kwargs))
        if not do_sample:
            return until, max_new, {}
        sampling.setdefault("temperature", 1.0)
        return until, max_new, sampling

    def _generate(self, contexts: list[str], until: list[str], max_new: int, sampling: dict) -> list[str]:
        """One generate call for a batch of contexts. A row is done once its text holds a stop string
        or it emitted EOS; the call ends when every row is done, or at `max_new` tokens."""
        start = time.perf_counter()
        eos, keep = self.eot_token_id, max(self.max_length - max_new, 1)
        prompts = [(self.tok_encode(c) or [self.prefix_token_id])[-keep:] for c in contexts]
        texts = [IncrementalText(self.tok_decode, tuple(s for s in until if s)) for _ in contexts]
        done, tokens = [False] * len(contexts), [0] * len(contexts)

        def take(row: int, new: list[int]) -> None:
            new, hit_eos = through_eos(new, eos)
            tokens[row] += len(new)
            _, stopped = texts[row].feed(new[:-1] if hit_eos else new, final=hit_eos)
            done[row] = stopped or hit_eos

        stats = GenerationStats()
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)
        try:
            run_mode(self.model, self.mode, ids, max_new, attention_mask=mask, diffusion=self.diffusion,
                     eos_token_id=eos, streamer=RowStreamer(len(contexts), take, done.__getitem__, eos), stats=stats,
                     **sampling)
        except StopGeneration:
            pass
        for row, text in enumerate(texts):
            if not done[row]:  # ran to max_new: let go of any text held back as a possible stop string
                text.feed([], final=True)
        self._count("generate_until", requests=len(contexts), seconds=time.perf_counter() - start,
                    tokens=sum(tokens), denoiser_forwards=stats.denoiser_forwards,
                    context_forwards=stats.context_forwards)
        return [text.text for text in texts]


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
