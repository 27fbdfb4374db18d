"""The benchmark scripts run: gpu_check says in one line that there is no GPU (and exits 0), and
the benchmarks that take --device run on the CPU at a tiny setting. No timing is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    proc = run_script("gpu_check.py", "--out", str(tmp_path / "gpu.json"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [
        "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to check."]


def test_gpu_check_kernels_part_reports_what_imports(tmp_path):
    from twotower.kernels import MAMBA_KERNELS, kernels_available

    out = tmp_path / "kernels.json"
    proc = run_script("gpu_check.py", "--part", "kernels", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["available"] == kernels_available() and set(result["available"]) == set(MAMBA_KERNELS)


def test_bench_batch_on_cpu_at_a_tiny_setting(tmp_path):
    out = tmp_path / "batch.json"
    proc = run_script("bench_batch.py", "--batch-sizes", "1", "3", "--max-new-tokens", "2", "--repeats", "1",
                      "--block-size", "4", "--device", "cpu", "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "1 torch threads (set by --threads)" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    assert len(rows[1]["prompt_lengths"]) == 3 and len(set(rows[1]["prompt_lengths"])) > 1  # ragged
    assert all(r["ar_tokens_per_s"] > 0 and r["diffusion_tokens_per_s"] > 0 for r in rows)
    assert proc.stdout.count("\n| ") == 3  # header and a row per batch size (the separator starts "|---")


def test_bench_two_tower_on_cpu_at_a_tiny_setting():
    proc = run_script("bench_two_tower.py", "--device", "cpu", "--dtype", "float32", "--context", "8", "--block", "4",
                      "--repeats", "1")
    assert proc.returncode == 0, proc.stderr
    assert "on cpu" in proc.stdout and "| float32 | eager | 23.9M |" in proc.stdout
