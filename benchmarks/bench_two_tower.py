"""Cost of the two-tower's per-block work relative to one AR decode step, on CPU.

For a ~20M-parameter hybrid with random weights and a context of --context tokens, times (median
of --repeats, the three measurements interleaved so machine drift hits all alike):
  * one AR decode step of the context tower (1 token, cached);
  * one denoiser forward over a block of --block tokens seeded from the context cache, half of
    them masked, with the head on the masked positions only, as generation runs it;
  * advancing the context tower by one committed block of --block tokens.
Targets: denoiser forward <= 2x a decode step; context advance <= 2x a decode step.

    python benchmarks/bench_two_tower.py [--dtype float32 bfloat16] [--context 256] [--block 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from twotower import TwoTowerConfig, TwoTowerForCausalLM
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


@torch.no_grad()
def measure(dtype: torch.dtype, context_len: int, block: int, repeats: int, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    device = torch.device(device)
    model = TwoTowerForCausalLM(bench_config()).eval().to(device, dtype)
    prompt = torch.randint(4, 8192, (1, context_len)).to(device)
    context = model.encode_context(prompt)
    x = torch.full((1, block), 3)
    x[0, : block // 2] = torch.randint(4, 8192, (block // 2,))
    x, t = x.to(device), torch.tensor([0.5], device=device)
    token = torch.randint(4, 8192, (1, 1)).to(device)
    committed = torch.randint(4, 8192, (1, block)).to(device)

    def decode():
        cache = context.clone()
        model.context_lm_head(model.context_tower(token, cache)[:, -1])

    def denoise():
        model.denoise_block(x, t, context, positions=x == 3)

    def advance():
        cache = context.clone()
        model.context_tower(committed, cache)

    def clone_only():
        context.clone()

    runs = {"decode": [], "denoise": [], "advance": [], "clone": []}
    for fn in (decode, denoise, advance):  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in (("decode", decode), ("denoise", denoise), ("advance", advance), ("clone", clone_only)):
            runs[name].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in runs.items()}
    # decode and advance both clone the cache to stay repeatable; that copy is not part of the work
    med["decode"] -= med["clone"]
    med["advance"] -= med["clone"]
    params = sum(p.numel() for p in model.context_tower.parameters()) + model.context_lm_head.weight.numel()
    return {"params": params, **med}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    add_malloc_option(p)
    args = p.parse_args()
    malloc = apply_malloc_option(args)
    print(f"context {args.context} tokens, block {args.block}, medians of {args.repeats}, on {args.device}, "
          f"{torch.get_num_threads()} threads, malloc {malloc}\n")
    print("| dtype | tower params | AR decode step (ms) | denoiser block forward (ms) | ratio | "
          "context advance by a block (ms) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in args.dtype:
        r = measure(getattr(torch, name), args.context, args.block, args.repeats, args.device)
        print(f"| {name} | {r['params'] / 1e6:.1f}M | {r['decode'] * 1e3:.2f} | {r['denoise'] * 1e3:.2f} | "
              f"{r['denoise'] / r['decode']:.2f}x | {r['advance'] * 1e3:.2f} | {r['advance'] / r['decode']:.2f}x |")


if __name__ == "__main__":
    main()
