"""Cost of the two-tower's per-block work relative to one AR decode step, on CPU.

For a ~20M-parameter hybrid with random weights and a context of --context tokens, times (median
of --repeats, the three measurements interleaved so machine drift hits all alike):
  * one AR decode step of the context tower (1 token, cached);
  * one denoiser forward over a block of --block tokens seeded from the context cache, half of
    them masked, with the head on the masked positions only, as generation runs it;
  * advancing the context tower by one committed block of --block tokens.
--model embedded measures the embedded model instead; --compile measures the compiled path
(`twotower.compiled`) beside the eager one, interleaved, its compilation in the untimed warm-up.
Targets: denoiser forward and context advance each <= 1.3x a decode step.

    python benchmarks/bench_two_tower.py [--model bench|embedded] [--dtype float32 bfloat16] [--context 256]
        [--block 16] [--device cpu] [--threads N] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from twotower import TwoTowerConfig, TwoTowerForCausalLM
from twotower.compiled import compile_for_decoding, compile_seconds
from twotower.cpu_memory import add_malloc_option, apply_malloc_option


# ~20M parameters per tower with every layer kind (shared with bench_train.py)
BENCH_MODEL = dict(
    vocab_size=8192, hidden_size=384, hybrid_override_pattern="MEM*EMEM*EM",
    num_attention_heads=6, num_key_value_heads=2, head_dim=64,
    mamba_num_heads=12, mamba_head_dim=64, ssm_state_size=64, n_groups=2, chunk_size=128,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=384,
    moe_shared_expert_intermediate_size=768, routed_scaling_factor=2.5,
)


def bench_config() -> TwoTowerConfig:
    return TwoTowerConfig(**BENCH_MODEL)


def timed(fn, device: torch.device) -> float:
    """Seconds `fn` takes, its queued device work included."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def load(model_name: str, dtype: torch.dtype, device: torch.device) -> TwoTowerForCausalLM:
    """The ~20M random model ("bench") or the embedded model ("embedded"), in `dtype` on `device`."""
    if model_name == "embedded":
        from twotower import load_default

        model = load_default()[0]
    else:
        torch.manual_seed(0)
        model = TwoTowerForCausalLM(bench_config())
    return model.eval().to(device, dtype)


def block_work(model: TwoTowerForCausalLM, context_len: int, block: int) -> dict:
    """The three measured calls (and a cache copy, subtracted from two of them) on `model`."""
    device, vocab = model.context_device, model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    context = model.encode_context(torch.randint(4, vocab, (1, context_len), generator=g).to(device))
    x = torch.full((1, block), model.config.mask_token_id)
    x[0, : block // 2] = torch.randint(4, vocab, (block // 2,), generator=g)
    x, t = x.to(device), torch.tensor([0.5], device=device)
    token = torch.randint(4, vocab, (1, 1), generator=g).to(device)
    committed = torch.randint(4, vocab, (1, block), generator=g).to(device)
    masked = x == model.config.mask_token_id

    def decode():
        cache = context.clone()
        model.context_lm_head(model.context_tower(token, cache)[:, -1])

    def denoise():
        model.denoise_block(x, t, context, positions=masked)

    def advance():
        cache = context.clone()
        model.context_tower(committed, cache)

    def clone_only():
        context.clone()

    return {"decode": decode, "denoise": denoise, "advance": advance, "clone": clone_only}


@torch.no_grad()
def measure(dtype: torch.dtype, context_len: int, block: int, repeats: int, device: str = "cpu",
            model_name: str = "bench", compiled: bool = False) -> dict:
    """{path: {"decode", "denoise", "advance": median seconds}, "params": tower parameters}; paths
    "eager" and, with `compiled`, "compiled" (a copy of the model on `twotower.compiled`'s path, its
    compilation in the untimed warm-up), all measurements interleaved."""
    device = torch.device(device)
    model = load(model_name, dtype, device)
    paths = {"eager": model}
    if compiled:
        paths["compiled"] = compile_for_decoding(copy.deepcopy(model))
    work = {path: block_work(m, context_len, block) for path, m in paths.items()}
    for calls in work.values():  # warm-up (and compilation)
        for fn in calls.values():
            fn()
            fn()
    runs = {(path, name): [] for path in work for name in work[path]}
    for _ in range(repeats):
        for path, calls in work.items():
            for name, fn in calls.items():
                runs[(path, name)].append(timed(fn, device))
    med = {key: statistics.median(v) for key, v in runs.items()}
    result = {"params": sum(p.numel() for p in model.context_tower.parameters()) + model.context_lm_head.weight.numel()}
    for path in work:
        clone = med[(path, "clone")]  # decode and advance clone the cache to stay repeatable: not part of the work
        result[path] = {"decode": med[(path, "decode")] - clone, "denoise": med[(path, "denoise")],
                        "advance": med[(path, "advance")] - clone}
    if compiled:
        result["compile_seconds"] = compile_seconds(paths["compiled"])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("bench", "embedded"), default="bench",
                   help="the ~20M random model (default) or the embedded model")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--compile", action="store_true", help="also measure the compiled path (twotower.compiled)")
    add_malloc_option(p)
    args = p.parse_args()
    malloc = apply_malloc_option(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.model} model, context {args.context} tokens, block {args.block}, medians of {args.repeats}, "
          f"on {args.device}, {torch.get_num_threads()} threads, malloc {malloc}\n")
    print("| dtype | path | tower params | AR decode step (ms) | denoiser block forward (ms) | ratio | "
          "context advance by a block (ms) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.dtype:
        r = measure(getattr(torch, name), args.context, args.block, args.repeats, args.device, args.model, args.compile)
        for path in ("eager", "compiled") if args.compile else ("eager",):
            m = r[path]
            print(f"| {name} | {path} | {r['params'] / 1e6:.1f}M | {m['decode'] * 1e3:.2f} | {m['denoise'] * 1e3:.2f} | "
                  f"{m['denoise'] / m['decode']:.2f}x | {m['advance'] * 1e3:.2f} | {m['advance'] / m['decode']:.2f}x |")
        if args.compile:
            e, c = r["eager"], r["compiled"]
            print(f"| {name} | compiled vs eager | | {e['decode'] / c['decode']:.2f}x faster | "
                  f"{e['denoise'] / c['denoise']:.2f}x faster | | {e['advance'] / c['advance']:.2f}x faster | |"
                  f"  <- {r['compile_seconds']:.0f}s compiling")


if __name__ == "__main__":
    main()
