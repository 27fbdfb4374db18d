"""Cost of one two-tower diffusion training step relative to one AR training step, on CPU.

Same ~20M-parameter backbone, same batch: an AR step is forward + backward of the backbone; a
diffusion step is a frozen context forward (no graph) + denoiser forward + backward, so its floor
is about 4/3 of an AR step. Target: at most 1.5x. Steps are interleaved (AR, diffusion, AR, ...)
and medians reported, for float32 and bfloat16 autocast.

    python benchmarks/bench_train.py [--batch 8] [--seq-len 256] [--block 16] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from twotower import NemotronHConfig, NemotronHForCausalLM, TwoTowerForCausalLM
from twotower.objectives import ar_loss, diffusion_loss

from bench_two_tower import BENCH_MODEL  # the same ~20M-parameter model


def step_time(model, loss_fn, batch, bf16: bool) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        total, count = loss_fn(model, batch)
    (total / count).backward()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.manual_seed(0)
    backbone = NemotronHForCausalLM(NemotronHConfig(**BENCH_MODEL)).train()
    two_tower = TwoTowerForCausalLM.from_single_tower(backbone).train()
    batch = torch.randint(4, 8192, (args.batch, args.seq_len + 1))
    tokens = args.batch * args.seq_len
    params = sum(q.numel() for q in backbone.parameters())
    print(f"backbone {params / 1e6:.1f}M parameters, batch {args.batch}x{args.seq_len}, block {args.block}, "
          f"medians of {args.repeats}, {torch.get_num_threads()} threads\n")
    print("| precision | AR step (s) | AR tokens/s | diffusion step (s) | diffusion tokens/s | diffusion / AR |")
    print("|---|---|---|---|---|---|")
    ar = lambda m, b: ar_loss(m, b)  # noqa: E731
    diffusion = lambda m, b: diffusion_loss(m, b[:, :-1], args.block)  # noqa: E731
    for bf16 in (False, True):
        step_time(backbone, ar, batch, bf16)  # warm-up
        step_time(two_tower, diffusion, batch, bf16)
        times = {"ar": [], "diffusion": []}
        for _ in range(args.repeats):
            times["ar"].append(step_time(backbone, ar, batch, bf16))
            times["diffusion"].append(step_time(two_tower, diffusion, batch, bf16))
        a, d = statistics.median(times["ar"]), statistics.median(times["diffusion"])
        print(f"| {'bfloat16 autocast' if bf16 else 'float32'} | {a:.3f} | {tokens / a:.0f} | {d:.3f} | "
              f"{tokens / d:.0f} | {d / a:.2f}x |")


if __name__ == "__main__":
    main()
