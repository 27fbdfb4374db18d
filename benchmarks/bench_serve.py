"""Load test of the inference server: throughput and latency at several numbers of concurrent
clients, diffusion against AR mode, on loopback.

Starts `twotower.serve` in this process, sends a bounded number of greedy completion requests per
(mode, clients) cell from a pool of client threads, and prints a Markdown table: generated tokens
per second over the cell, median and p95 request latency, and the mean rows per decoded batch.

    python benchmarks/bench_serve.py [--model PATH] [--requests 32] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from twotower.default import load_model
from twotower.serve import ServeConfig, background_server, create_app

PROMPTS = ["Once upon a time", "The little dog ran to the", "Lily and Tom went to the park",
           "One day, a big red ball", "Mom said", "The sun was hot and the"]


def run_cell(http: httpx.Client, mode: str, clients: int, requests: int, max_tokens: int,
             block_size: int | None) -> dict:
    """`requests` completions from `clients` threads; returns the cell's measurements."""
    def one(i: int) -> tuple[float, int]:
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.0, "mode": mode}
        if block_size is not None:
            body["block_size"] = block_size
        start = time.perf_counter()
        r = http.post("/v1/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]

    before = http.get("/health").json()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    after = http.get("/health").json()
    latencies = sorted(t for t, _ in results)
    return {
        "tokens_per_s": sum(n for _, n in results) / wall,
        "median": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "rows_per_batch": (after["rows"] - before["rows"]) / max(1, after["batches"] - before["batches"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--requests", type=int, default=32, help="requests per cell")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=None, help="diffusion block size (default: the model's)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--modes", nargs="+", default=["diffusion", "ar"], choices=["diffusion", "mock-ar", "ar"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_model(args.model)
    except FileNotFoundError as e:
        print(f"{e}; pass --model PATH to benchmark another model", file=sys.stderr)
        return 1

    config = ServeConfig(max_queue=max(64, max(args.clients)), max_batch_size=max(16, max(args.clients)))
    app = create_app(model, tokenizer, config)
    with background_server(app) as url, httpx.Client(base_url=url, timeout=600) as http:
        for mode in args.modes:  # warm-up
            run_cell(http, mode, 1, 2, args.max_tokens, args.block_size)
        print(f"{args.requests} requests per cell, max_tokens {args.max_tokens}, greedy, "
              f"torch threads {torch.get_num_threads()}\n")
        print("| mode | clients | tokens/s | median latency (s) | p95 latency (s) | rows per batch |")
        print("|---|---:|---:|---:|---:|---:|")
        for mode in args.modes:
            for clients in args.clients:
                cell = run_cell(http, mode, clients, args.requests, args.max_tokens, args.block_size)
                print(f"| {mode} | {clients} | {cell['tokens_per_s']:.1f} | {cell['median']:.3f} | "
                      f"{cell['p95']:.3f} | {cell['rows_per_batch']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
