"""Batched decoding throughput of the embedded model: AR and diffusion tokens/s by batch size.

Each batch holds ragged prompts drawn (seeded) from the model's shipped held-out story and task
prompts, left-padded with an attention mask, as a server or the recipe's distillation stage batches
them. Every row generates --max-new-tokens greedy tokens (no EOS, so the batch keeps its size to the
end); tokens/s counts generated tokens over the wall time of the whole call, medians of --repeats
with AR and diffusion interleaved. The thread count is set deliberately (--threads, default 1) and
printed: on a shared machine, processes whose OpenMP threads outnumber the cores slow eager
decoding by more than 10x.

    python benchmarks/bench_batch.py [--batch-sizes 1 4 16 64] [--max-new-tokens 32] [--threads 1]
        [--block-size 16] [--threshold 0.8] [--dtype float32] [--device cpu] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from twotower.bench import load_prompts
from twotower.default import DEFAULT_MODEL_DIR, load_model
from twotower.evaluate import left_pad
from twotower.modes import run_mode


@dataclass(frozen=True)
class BatchBench:
    """What to measure; validated when made."""

    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    max_new_tokens: int = 32
    repeats: int = 3
    block_size: int = 16
    threshold: float = 0.8
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self):
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        for name in ("max_new_tokens", "repeats", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    def modes(self) -> dict[str, dict]:
        """mode -> its generation settings (greedy)."""
        return {"ar": {}, "diffusion": dict(block_size=self.block_size, confidence_threshold=self.threshold)}


def held_out_prompts() -> list[str]:
    """The embedded model's held-out story and task prompts (ragged lengths)."""
    stories, tasks = load_prompts(DEFAULT_MODEL_DIR)
    return stories + [t.prompt for t in tasks]


def batch_inputs(tokenizer, prompts: list[str], batch: int, seed: int, device: str):
    """`batch` prompts drawn with `seed`, tokenized and left-padded -> (ids, mask or None)."""
    picked = random.Random(seed).choices(prompts, k=batch)
    ids, mask = left_pad([tokenizer(p).input_ids for p in picked], tokenizer.pad_token_id)
    return ids.to(device), None if mask is None else mask.to(device)


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_once(model, ids, mask, mode: str, settings: BatchBench, kwargs: dict) -> dict:
    """One timed batched generation -> {seconds, tokens, denoiser_forwards}."""
    _synchronize(settings.device)
    start = time.perf_counter()
    out = run_mode(model, mode, ids, settings.max_new_tokens, attention_mask=mask, return_dict_in_generate=True,
                   temperature=0.0, **kwargs)
    _synchronize(settings.device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": out.stats.generated_tokens, "denoiser_forwards": out.stats.denoiser_forwards}


def measure(model, tokenizer, settings: BatchBench) -> list[dict]:
    """One row per batch size: median tokens/s of each mode, and the tokens a row gets per denoiser
    forward in diffusion (a batch's forwards run until its slowest row finishes each block)."""
    prompts, rows = held_out_prompts(), []
    for batch in settings.batch_sizes:
        ids, mask = batch_inputs(tokenizer, prompts, batch, settings.seed + batch, settings.device)
        runs = {mode: [] for mode in settings.modes()}
        for mode, kwargs in settings.modes().items():  # warm-up: allocations and first-call costs
            generate_once(model, ids, mask, mode, settings, kwargs)
        for _ in range(settings.repeats):
            for mode, kwargs in settings.modes().items():
                runs[mode].append(generate_once(model, ids, mask, mode, settings, kwargs))
        row = {"batch": batch, "prompt_lengths": [int(n) for n in (ids.shape[1] - (mask == 0).sum(1)).tolist()]
               if mask is not None else [ids.shape[1]] * batch}
        for mode, results in runs.items():
            row[f"{mode}_tokens_per_s"] = statistics.median(r["tokens"] / r["seconds"] for r in results)
        diffusion = runs["diffusion"][0]
        row["diffusion_tokens_per_forward"] = diffusion["tokens"] / max(1, diffusion["denoiser_forwards"]) / batch
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| batch | AR tokens/s | x batch 1 | diffusion tokens/s | x batch 1 | diffusion / AR | "
             "diffusion tokens per forward and row |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['ar_tokens_per_s']:,.1f} | {r['ar_tokens_per_s'] / base['ar_tokens_per_s']:.2f}x | "
            f"{r['diffusion_tokens_per_s']:,.1f} | "
            f"{r['diffusion_tokens_per_s'] / base['diffusion_tokens_per_s']:.2f}x | "
            f"{r['diffusion_tokens_per_s'] / r['ar_tokens_per_s']:.2f}x | {r['diffusion_tokens_per_forward']:.2f} |")
    return "\n".join(lines)


def load(settings: BatchBench):
    """The embedded model in the settings' dtype on their device, and its tokenizer."""
    model, tokenizer = load_model(None, getattr(torch, settings.dtype))
    return model.to(settings.device).eval(), tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(BatchBench.batch_sizes))
    p.add_argument("--max-new-tokens", type=int, default=BatchBench.max_new_tokens)
    p.add_argument("--repeats", type=int, default=BatchBench.repeats)
    p.add_argument("--block-size", type=int, default=BatchBench.block_size)
    p.add_argument("--threshold", type=float, default=BatchBench.threshold)
    p.add_argument("--dtype", default=BatchBench.dtype)
    p.add_argument("--device", default=BatchBench.device)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    try:
        settings = BatchBench(tuple(args.batch_sizes), args.max_new_tokens, args.repeats, args.block_size,
                              args.threshold, args.dtype, args.device)
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(args.threads)
    model, tokenizer = load(settings)
    print(f"embedded model, {settings.dtype} on {settings.device}, {torch.get_num_threads()} torch threads "
          f"(set by --threads), {settings.max_new_tokens} greedy tokens per row, diffusion block "
          f"{settings.block_size} threshold {settings.threshold}, medians of {settings.repeats}\n")
    rows = measure(model, tokenizer, settings)
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"settings": asdict(settings), "threads": args.threads, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
