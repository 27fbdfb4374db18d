"""Checks to run by hand on a machine with a CUDA GPU; where there is none it says so and exits 0.

Parts, each in a process of its own with a time limit, so one that fails or hangs (or leaves the
GPU in an error state) does not stop the others; each part's error is printed:

  tests       the key exactness tests on the GPU (TWOTOWER_TEST_DEVICE): backbone against
              transformers' logits, chunked scan against the recurrence, cached generation against
              recompute-from-scratch in every mode, greedy speculative decoding against AR, and
              each installed kernel against ours;
  two_tower   benchmarks/bench_two_tower.py on the GPU, float32 and bfloat16, eager and compiled;
  batch       AR against diffusion tokens/s of the embedded model (benchmarks/bench_batch.py);
  kernels     which of the causal-conv1d / mamba-ssm kernels import, and, where any does, the
              model with them against the model with ours only (logits, caches, greedy tokens).

It prints one summary table and writes every result as JSON to --out. About 2-4 minutes on an
H200; the time limits keep it under 8.

    python benchmarks/gpu_check.py --out gpu_check.json [--device cuda:0] [--parts tests kernels]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PART_LIMITS_S = {"tests": 200, "two_tower": 150, "batch": 90, "kernels": 60}
TOTAL_LIMIT_S = 450  # all parts together: a part gets the smaller of its own limit and what is left
EXACTNESS_TESTS = [
    "tests/test_backbone.py", "tests/test_two_tower.py", "tests/test_speculative.py", "tests/test_kernels.py",
    "-k", "matches_transformers or chunked_scan_equals or recompute_from_scratch or greedy_equals_ar "
          "or kernels_equal_ours",
]


# ---------------------------------------------------------------- the parts (each runs in a child process)

def part_tests(device: str) -> dict:
    env = {**os.environ, "TWOTOWER_TEST_DEVICE": device}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *EXACTNESS_TESTS],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=PART_LIMITS_S["tests"] - 10)
    lines = proc.stdout.strip().splitlines()
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return {"ok": proc.returncode == 0, "summary": lines[-1] if lines else proc.stderr[-300:], "failed": failed}


def part_two_tower(device: str) -> dict:
    from bench_two_tower import measure

    rows = []
    for dtype in ("float32", "bfloat16"):
        r = measure(getattr(torch, dtype), context_len=256, block=16, repeats=15, device=device, compiled=True)
        for path in ("eager", "compiled"):
            m = r[path]
            rows.append({"dtype": dtype, "path": path, "decode_ms": m["decode"] * 1e3, "denoise_ms": m["denoise"] * 1e3,
                         "advance_ms": m["advance"] * 1e3, "denoise_ratio": m["denoise"] / m["decode"],
                         "advance_ratio": m["advance"] / m["decode"]})
    return {"ok": True, "rows": rows}


def part_batch(device: str) -> dict:
    from bench_batch import BatchBench, load, measure

    results = {}
    for dtype in ("float32", "bfloat16"):
        settings = BatchBench(batch_sizes=(1, 4, 16, 64), max_new_tokens=32, repeats=3, dtype=dtype, device=device)
        model, tokenizer = load(settings)
        results[dtype] = measure(model, tokenizer, settings)
        del model
    return {"ok": True, "rows": results}


@torch.no_grad()
def _compare_with_and_without_kernels(device: str) -> dict:
    """A random model of every layer kind (tiny, conv channels a multiple of 8) and the embedded
    model, run with the kernels and with ours only, on `device`."""
    from twotower import NemotronHForCausalLM, kernels, load_default
    from twotower.config import NemotronHConfig

    torch.manual_seed(0)
    config = NemotronHConfig(vocab_size=97, hidden_size=64, hybrid_override_pattern="M*EM-E*M",
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_num_heads=4,
                             mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=16, n_routed_experts=8,
                             num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
                             intermediate_size=40)
    model = NemotronHForCausalLM(config).eval().to(device)
    ids = torch.randint(4, 97, (2, 45), device=device)

    def run():
        cache = model.new_cache()
        logits = [model(ids[:, :37], past_key_values=cache).logits]  # prefill: conv + chunked scan
        logits.append(model(ids[:, 37:39], past_key_values=cache).logits)  # a chunk shorter than the conv
        for t in range(39, 45):  # decoding steps: conv update + state update
            logits.append(model(ids[:, t:t + 1], past_key_values=cache).logits)
        return torch.cat(logits, dim=1).float()

    before = dict(kernels.kernel_calls)
    with kernels.use_kernels(True):
        fused = run()
    used = {k: v - before.get(k, 0) for k, v in kernels.kernel_calls.items() if v - before.get(k, 0)}
    with kernels.use_kernels(False):
        ours = run()
    diff = (fused - ours).abs().max().item()

    embedded, tokenizer = load_default()
    embedded = embedded.to(device)
    prompt = tokenizer("Once upon a time", return_tensors="pt").input_ids.to(device)
    tokens = {}
    for enabled in (True, False):
        with kernels.use_kernels(enabled):
            tokens[enabled] = {mode: embedded.generate_ar(prompt, 32).tolist() if mode == "ar" else
                               embedded.generate_mask_diffusion(prompt, 32, block_size=16).tolist()
                               for mode in ("ar", "diffusion")}
    same_tokens = tokens[True] == tokens[False]
    return {"kernel_calls": used, "max_logit_diff": diff, "same_greedy_tokens": same_tokens,
            "ok": diff <= 1e-3 and same_tokens}


def part_kernels(device: str) -> dict:
    from twotower import kernels

    found = kernels.kernels_available()
    result = {"available": found, "ok": True}
    if any(found.values()):
        try:
            result.update(_compare_with_and_without_kernels(device))
        except Exception as e:  # noqa: BLE001 - reported with what imported
            result.update(ok=False, error=f"{type(e).__name__}: {e}")
    return result


# the longest-running part last, so that the overall limit cuts the least
PARTS = {"tests": part_tests, "kernels": part_kernels, "batch": part_batch, "two_tower": part_two_tower}


# ---------------------------------------------------------------- running them

def run_part(name: str, device: str, limit_s: float | None = None) -> dict:
    """Run one part in a child process (at most `limit_s`, by default the part's own limit); its
    result, or its error and the tail of its output."""
    limit_s = PART_LIMITS_S[name] if limit_s is None else limit_s
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "part.json"
        start = time.perf_counter()
        # a session of its own, so that a part over its limit is ended with everything it started
        proc = subprocess.Popen([sys.executable, __file__, "--part", name, "--device", device, "--out", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"ok": False, "error": f"over its {limit_s:.0f} s limit", "seconds": limit_s}
        seconds = time.perf_counter() - start
        if proc.returncode != 0 or not out.exists():
            tail = (stderr or stdout).strip().splitlines()[-15:]
            last = tail[-1][:200] if tail else "no output"
            return {"ok": False, "error": f"exit status {proc.returncode}: {last}", "output": tail, "seconds": seconds}
        return {**json.loads(out.read_text()), "seconds": seconds}


def headline(name: str, r: dict) -> str:
    """One line of the summary for a part's result."""
    if "error" in r:
        return str(r["error"])
    if name == "tests":
        return r["summary"]
    if name == "two_tower":
        return "; ".join(f"{row['dtype']} {row['path']}: block {row['denoise_ratio']:.2f}x, advance {row['advance_ratio']:.2f}x "
                         f"an AR step ({row['decode_ms']:.2f} ms)" for row in r["rows"])
    if name == "batch":
        return "; ".join(f"{dtype}: " + ", ".join(f"b{row['batch']} AR {row['ar_tokens_per_s']:,.0f} / diffusion "
                                                 f"{row['diffusion_tokens_per_s']:,.0f} tok/s" for row in rows)
                         for dtype, rows in r["rows"].items())
    found = ", ".join(k for k, v in r["available"].items() if v) or "none installed: ours everywhere"
    if "max_logit_diff" not in r:
        return f"kernels: {found}"
    return (f"kernels: {found}; ran: {r['kernel_calls']}; max logit diff vs ours {r['max_logit_diff']:.2e}; "
            f"same greedy tokens: {r['same_greedy_tokens']}")


def summary_table(results: dict) -> str:
    lines = ["| part | status | seconds | result |", "|---|---|---|---|"]
    for name, r in results.items():
        status = "ok" if r.get("ok") else "FAILED"
        lines.append(f"| {name} | {status} | {r.get('seconds', 0):.0f} | {headline(name, r)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="where to write the results as JSON")
    p.add_argument("--device", default="cuda", help="the CUDA device to check (default cuda)")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # one part, in a child process
    args = p.parse_args(argv)
    if args.part:
        result = PARTS[args.part](args.device)
        Path(args.out).write_text(json.dumps(result, indent=2))
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to check.")
        return 0
    print(f"gpu_check on {torch.cuda.get_device_name(args.device)}, torch {torch.__version__}", flush=True)
    results, start = {}, time.perf_counter()
    for name in args.parts:
        limit_s = min(PART_LIMITS_S[name], TOTAL_LIMIT_S - (time.perf_counter() - start))
        if limit_s < 10:
            results[name] = {"ok": False, "error": f"not run: the {TOTAL_LIMIT_S} s for all parts are spent"}
            print(f"{name}: {results[name]['error']}", flush=True)
            continue
        print(f"running {name} (limit {limit_s:.0f} s) ...", flush=True)
        results[name] = run_part(name, args.device, limit_s)
        if "error" in results[name]:
            print(f"{name} failed: {results[name]['error']}", *results[name].get("output", []), sep="\n  ", flush=True)
    print()
    print(summary_table(results))
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(args.device),
                                          "torch": torch.__version__, "parts": results}, indent=2))
    print(f"\nresults written to {args.out}")
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
