"""CPU throughput of our NemotronH backbone against transformers' `NemotronHForCausalLM`.

Both models load the same checkpoint folder with their own `from_pretrained`, in float32 and in
bfloat16. Prefill: the time to the first token of a 512-token prompt (batch 1), each model's
generate asked for one token (both compute the last position's logits only). Decode: greedy
generation of 64 tokens after a 32-token prompt (its prefill included), with `generate_ar` for
ours and `generate(do_sample=False)` for transformers. Also timed: one forward over the 512-token
prompt returning every position's logits and filling a cache. Runs alternate between
the two models; every figure is a median. Threads and OpenMP settings are torch's defaults, what a
user gets (set OMP_NUM_THREADS or OMP_WAIT_POLICY to measure others); run it on an otherwise idle
machine. Prints a Markdown table.

With --compile both models decode compiled: ours on `twotower.compiled`'s path (its decoding
steps; a prefill stays eager), transformers' with its forward through `torch.compile` (dynamic
shapes). Their compilation happens in the untimed warm-up.

    python benchmarks/bench_backbone.py [--runs 5] [--breakdown] [--default-malloc] [--compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import transformers

from twotower import NemotronHConfig, NemotronHForCausalLM
from twotower.compiled import compile_for_decoding
from twotower.cpu_memory import add_malloc_option, apply_malloc_option

PROMPT, DECODE_PROMPT, NEW_TOKENS = 512, 32, 64


def bench_config() -> NemotronHConfig:
    """~20M parameters with every layer kind: 5 Mamba-2, 2 attention and 4 MoE layers."""
    return NemotronHConfig(
        vocab_size=8192, hidden_size=256, hybrid_override_pattern="MEM*EMEM*EM",
        num_attention_heads=8, num_key_value_heads=2, head_dim=32,
        mamba_num_heads=8, mamba_head_dim=64, ssm_state_size=64, n_groups=2, conv_kernel=4, chunk_size=128,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=640,
        moe_shared_expert_intermediate_size=1024, intermediate_size=1024,
        routed_scaling_factor=2.5, initializer_range=0.1,
        # transformers' torch prefill clamps dt at time_step_min, its decode does not: a tiny floor
        # keeps the two implementations computing the same thing (checked before timing)
        time_step_min=1e-6,
        eos_token_id=2, pad_token_id=0, bos_token_id=1,
    )


def load_pair(folder, dtype):
    ours = NemotronHForCausalLM.from_pretrained(folder, dtype=dtype)
    theirs = transformers.NemotronHForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return ours, theirs


@torch.no_grad()
def forward(model, ids):
    """One forward over the whole prompt with every position's logits, filling a cache."""
    return model(ids, use_cache=True).logits


@torch.no_grad()
def generate(model, ids, new_tokens: int):
    """Greedy generation of exactly `new_tokens` tokens with each model's own generate."""
    if isinstance(model, NemotronHForCausalLM):
        out = model.generate_ar(ids, max_new_tokens=new_tokens)
    else:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return out


def prefill(model, ids):
    """Time to the first token: the prompt's forward with the last position's logits (both
    generates keep only those) and the choice of one token."""
    return generate(model, ids, 1)


def decode(model, ids):
    return generate(model, ids, NEW_TOKENS)


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure(ours, theirs, fn, ids, runs: int) -> tuple[float, float]:
    """Median seconds of `fn(model, ids)` for each model, alternating which goes first."""
    fn(ours, ids), fn(theirs, ids)  # warm-up
    times = {id(ours): [], id(theirs): []}
    for r in range(runs):
        for model in (ours, theirs) if r % 2 == 0 else (theirs, ours):
            times[id(model)].append(seconds(fn, model, ids))
    return statistics.median(times[id(ours)]), statistics.median(times[id(theirs)])


PRODUCTS = ("aten::mm", "aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::addmm")


def breakdown(model, fn, ids) -> dict:
    """Profiled milliseconds of one `fn(model, ids)`, averaged over 3 runs: matrix products,
    attention (SDPA) and all other operators, by their own time (the profiler adds a little to
    each operator, so the last is an upper bound)."""
    fn(model, ids)
    with torch.profiler.profile() as prof:
        for _ in range(3):
            fn(model, ids)
    own = {e.key: e.self_cpu_time_total / 3e3 for e in prof.key_averages()}
    products = sum(own.get(k, 0.0) for k in PRODUCTS)
    attention = sum(v for k, v in own.items() if "scaled_dot_product" in k)
    return {"products": products, "attention": attention, "other": sum(own.values()) - products - attention}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compile", action="store_true",
                        help="decode compiled: ours on twotower.compiled's path, transformers' forward through "
                             "torch.compile")
    parser.add_argument("--breakdown", action="store_true",
                        help="also profile our prefill and decode: matrix products, attention, other operators")
    add_malloc_option(parser)
    args = parser.parse_args()
    malloc = apply_malloc_option(args)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    g = torch.Generator().manual_seed(0)
    long_ids = torch.randint(3, 8192, (1, PROMPT), generator=g)
    short_ids = torch.randint(3, 8192, (1, DECODE_PROMPT), generator=g)
    torch.manual_seed(0)
    model = NemotronHForCausalLM(bench_config()).eval()
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            ours, theirs = load_pair(folder, dtype)
            if args.compile:
                compile_for_decoding(ours)
                theirs.forward = torch.compile(theirs.forward, dynamic=True)
            logits = {"ours": forward(ours, long_ids).float(), "transformers": forward(theirs, long_ids).float()}
            gap = (logits["ours"] - logits["transformers"]).abs()
            same = torch.equal(decode(ours, short_ids), decode(theirs, short_ids))
            print(f"{name}: prefill logits differ by {gap.mean():.1e} on average, {gap.max():.1e} at most; "
                  f"same greedy tokens: {same}")
            if dtype == torch.float32:
                reference = logits["ours"]
            else:  # rounding makes the two differ: which one stays closer to float32?
                for who, x in logits.items():
                    print(f"  {who} against float32: {(x - reference).abs().mean():.4f} on average, "
                          f"argmax agrees at {(x.argmax(-1) == reference.argmax(-1)).float().mean():.1%} of positions")
            t_prefill = measure(ours, theirs, prefill, long_ids, args.runs)
            t_forward = measure(ours, theirs, forward, long_ids, args.runs)
            t_decode = measure(ours, theirs, decode, short_ids, args.runs)
            for phase, tokens, (a, b) in (("prefill", PROMPT, t_prefill), ("decode", NEW_TOKENS, t_decode),
                                          ("forward, all logits", PROMPT, t_forward)):
                rows.append(f"| {name} | {phase} | {tokens / a:,.0f} | {tokens / b:,.0f} | {b / a:.2f}x |")
            if args.breakdown:
                for phase, fn, ids, (_, theirs_s), target in (("prefill", prefill, long_ids, t_prefill, 1.5),
                                                              ("decode", decode, short_ids, t_decode, 2.0)):
                    ms = breakdown(ours, fn, ids)
                    print(f"  our {name} {phase}, profiled: products {ms['products']:.1f} ms, attention "
                          f"{ms['attention']:.1f} ms, other operators {ms['other']:.1f} ms; {target}x transformers "
                          f"allows {theirs_s * 1e3 / target:.1f} ms in all")

    print(f"\n{n_params / 1e6:.1f}M parameters, pattern {model.config.layer_kinds}, "
          f"{'both compiled, ' if args.compile else ''}{torch.get_num_threads()} "
          f"threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, malloc {malloc}, "
          f"median of {args.runs} runs; "
          f"tokens/s\n")
    print("| dtype | phase | ours | transformers | ours / transformers |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
