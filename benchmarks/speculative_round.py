"""Where a speculative round's time goes, against an AR decode step (embedded model, batch 1).

Generates --max-new-tokens greedy tokens from each of the first --prompts held-out story prompts,
first with `generate_ar`, then with `generate_speculative`, and times the parts of each by wrapping
them for the run (the wrappers are the only change): the denoiser's draft (`denoise_block`), the
context tower's forwards (AR steps and prompt prefills; in speculative decoding the verify chunks),
the output heads, the cache rollback (`HybridCache.keep_prefixes`) and the acceptance rule. The
rest of the wall time is the loop itself (sampling, bookkeeping, the streamer). A warm-up pass
comes first (on the compiled path it compiles). Prints milliseconds per AR token and per
speculative round, and each part as a multiple of one AR token's time.

    python benchmarks/speculative_round.py [--block-size 8] [--draft-steps 1] [--prompts 12]
        [--max-new-tokens 32] [--dtype bfloat16] [--threads 1] [--compile]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

import twotower.speculative as speculative
from twotower.bench import load_prompts
from twotower.cache import HybridCache
from twotower.compiled import compile_for_decoding
from twotower.default import DEFAULT_MODEL_DIR, load_model


@contextmanager
def timed(parts: dict, calls: dict, target, name: str, key: str):
    """Time every call of target.name into parts[key] while the block runs."""
    original = getattr(target, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            parts[key] += time.perf_counter() - start
            calls[key] += 1

    setattr(target, name, wrapper)
    try:
        yield
    finally:
        if isinstance(target, torch.nn.Module):
            del target.__dict__[name]  # the instance's wrapper; the class's method shows again
        else:
            setattr(target, name, original)


def run(model, prompts, generate, parts, calls) -> float:
    """Wall seconds of generate(ids) over the prompts, with the parts timed."""
    with (timed(parts, calls, model, "denoise_block", "draft (denoiser)"),
          timed(parts, calls, model.context_tower, "forward", "context (verify, prefill)"),
          timed(parts, calls, model.context_lm_head, "forward", "context head"),
          timed(parts, calls, HybridCache, "keep_prefixes", "rollback"),
          timed(parts, calls, speculative, "greedy_accept", "accept")):
        start = time.perf_counter()
        for ids in prompts:
            generate(ids)
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--draft-steps", type=int, default=1)
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(None, getattr(torch, args.dtype))
    model.eval()
    if args.compile:
        compile_for_decoding(model)
    stories, _ = load_prompts(DEFAULT_MODEL_DIR)
    prompts = [tokenizer(s, return_tensors="pt").input_ids for s in stories[:args.prompts]]
    n = args.max_new_tokens
    modes = {
        "ar": lambda ids: model.generate_ar(ids, n),
        "speculative": lambda ids: model.generate_speculative(ids, n, block_size=args.block_size,
                                                              draft_steps=args.draft_steps),
    }
    print(f"{args.dtype}, {torch.get_num_threads()} thread(s), {'compiled' if args.compile else 'eager'}; "
          f"{len(prompts)} prompts x {n} tokens; block {args.block_size}, {args.draft_steps} draft step(s)")
    result = {}
    for mode, generate in modes.items():
        run(model, prompts, generate, defaultdict(float), defaultdict(int))  # warm-up
        parts, calls = defaultdict(float), defaultdict(int)
        wall = run(model, prompts, generate, parts, calls)
        result[mode] = (wall, parts, calls)
    ar_token = result["ar"][0] / (len(prompts) * n)
    print(f"AR: {ar_token * 1e3:.2f} ms per token (all in: prefill, step, head, sampling)")
    wall, parts, calls = result["speculative"]
    rounds = calls["accept"]
    tokens = len(prompts) * n
    print(f"speculative: {rounds} rounds, {tokens / rounds:.2f} tokens per round, {wall / rounds * 1e3:.2f} ms per "
          f"round = {wall / rounds / ar_token:.2f} AR tokens; speed-up {result['ar'][0] / wall:.2f}x")
    parts["loop and sampling"] = wall - sum(parts.values())
    for key, seconds in parts.items():
        per_round = seconds / rounds
        print(f"  {key:26s} {per_round * 1e3:6.2f} ms per round ({per_round / ar_token:.2f} AR tokens)"
              + (f", {calls[key]} calls" if key in calls else ""))


if __name__ == "__main__":
    main()
