"""`twotower bench`: the command line of `bench.py`, which it imports (and with it torch) only when it
runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from .choices import BLOCK_SIZES, DRAFT_STEPS, MAX_NEW_TOKENS, TASK_NEW_TOKENS, THRESHOLDS, WEIGHT_DTYPES

# a run of a minute or two; explicit options still win
QUICK = dict(stories=2, tasks=5, thresholds=(0.5, 0.8, 0.95), block_sizes=(8, 16), draft_steps=(1, 2),
             max_new_tokens=16)


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, metavar="PATH", help="model folder (default: the embedded model)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="JSONL of prompts (prompt, optional answer and kind; default: the model's held-out prompts)")
    p.add_argument("--thresholds", type=float, nargs="+", default=None, metavar="T",
                   help=f"confidence thresholds (default: {' '.join(map(str, THRESHOLDS))})")
    p.add_argument("--block-sizes", type=int, nargs="+", default=None, metavar="S",
                   help=f"block sizes (default: {' '.join(map(str, BLOCK_SIZES))})")
    p.add_argument("--draft-steps", type=int, nargs="+", default=None, metavar="D",
                   help=f"draft steps of the speculative rows (default: {' '.join(map(str, DRAFT_STEPS))})")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help=f"new tokens per prompt (default: {MAX_NEW_TOKENS}; tasks get at most {TASK_NEW_TOKENS})")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="prompts per generate call (default: 1)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the measurements here")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of quality retained versus speed-up here")
    p.add_argument("--markdown", default=None, metavar="PATH", help="write the Markdown table here")
    p.add_argument("--compile", action="store_true",
                   help="run every mode on the compiled decoding path (torch.compile); the compile time is paid "
                        "in an untimed warm-up per mode and block size, and reported")
    p.add_argument("--dtype", choices=sorted(WEIGHT_DTYPES), default="float32",
                   help="dtype the model runs in (default: float32)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op threads (default: torch's, one per core); timings need a machine otherwise idle")
    p.add_argument("--quick", action="store_true",
                   help="a run of a minute or two: 2 story prompts and 5 tasks, thresholds 0.5 0.8 0.95, block "
                        "sizes 8 16, draft steps 1 2, 16 new tokens (explicit options still win)")


def run(args) -> int:
    from .bench import HEADLINE, headline, load_prompts, markdown_table, plot, run_bench, sweep
    from .compiled import compile_for_decoding, compile_seconds
    from .default import load_model, resolve_model_dir

    if args.plot and importlib.util.find_spec("matplotlib") is None:  # say so before the run, not after it
        print("error: --plot needs matplotlib, which is not installed: pip install 'twotower[bench]'",
              file=sys.stderr)
        return 2
    import torch

    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    model, tokenizer = load_model(model_dir, getattr(torch, args.dtype))
    print(f"bench: {args.dtype}, {torch.get_num_threads()} thread(s)", file=sys.stderr)
    stories, tasks = load_prompts(model_dir, args.prompts)
    quick = QUICK if args.quick else {}
    if quick:
        stories, tasks = stories[:quick["stories"]], tasks[:quick["tasks"]]
    thresholds = args.thresholds or quick.get("thresholds", THRESHOLDS)
    block_sizes = args.block_sizes or quick.get("block_sizes", BLOCK_SIZES)
    draft_steps = args.draft_steps or quick.get("draft_steps", DRAFT_STEPS)
    max_new_tokens = args.max_new_tokens or quick.get("max_new_tokens", MAX_NEW_TOKENS)
    if args.compile:
        compile_for_decoding(model)
    rows, _ = run_bench(model, tokenizer, stories, tasks, sweep(thresholds, block_sizes, draft_steps), max_new_tokens,
                        args.batch_size)
    if args.compile:
        print(f"compiled path: {compile_seconds(model):.1f}s compiling, in the warm-up", file=sys.stderr)
    table = markdown_table(rows)
    print(table)
    top = headline(rows)
    if top is not None:
        print(f"headline (diffusion, block {HEADLINE[0]}, threshold {HEADLINE[1]}): "
              f"{top['speedup_vs_ar']:.2f}x AR's tokens/s, "
              f"{top['tokens_per_denoiser_forward']:.2f} tokens per denoiser forward, quality retained "
              + ("-" if top["quality_retained"] is None else f"{top['quality_retained']:.1%}"))
    fastest = max((r for r in rows if r["draft_steps"] is not None), key=lambda r: r["speedup_vs_ar"], default=None)
    if fastest is not None:
        print(f"fastest speculative (block {fastest['block_size']}, {fastest['draft_steps']} draft steps): "
              f"{fastest['speedup_vs_ar']:.2f}x AR's tokens/s, {fastest['acceptance_rate'] or 0:.1%} of drafts "
              f"accepted, {fastest['tokens_per_round']:.2f} tokens per round")
        if fastest["acceptance_by_position"]:
            print("  draft k agrees with AR, given the drafts before it did: "
                  + " ".join(f"{k}:{p:.0%}" for k, p in enumerate(fastest["acceptance_by_position"], 1)))
    if args.json:
        ran_in = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")  # as loaded, not as asked
        report = {"model": str(model_dir), "compiled": args.compile, "dtype": ran_in,
                  "threads": torch.get_num_threads(), "batch_size": args.batch_size, "max_new_tokens": max_new_tokens,
                  "task_new_tokens": min(TASK_NEW_TOKENS, max_new_tokens),
                  "prompts": {"stories": len(stories), "tasks": len(tasks)}, "rows": rows, "headline": top}
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.plot:
        plot(rows, args.plot)
    return 0
