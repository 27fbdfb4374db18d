"""Tests of twotower.trainer on a tiny MLP language model (defined in dist_train_script.py)."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_train_script import PAD, CountingData, build_model, build_two_tower, config, next_token_loss
from safetensors.torch import load_file

from twotower.trainer import Trainer, TrainConfig, wsd_lr

SCRIPT = Path(__file__).with_name("dist_train_script.py")
# One intra-op thread per process: on a busy machine several threads per process thrash, and a
# fixed thread count keeps float results identical between processes.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_script(*args, **kwargs):
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], env=ENV, **kwargs)


def params(out_dir) -> dict:
    return load_file(Path(out_dir) / "checkpoint" / "model.safetensors")


def records(out_dir) -> list:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_wsd_lr_shape():
    cfg = TrainConfig(max_steps=100, lr=1.0, final_lr=0.1, warmup_frac=0.1, decay_frac=0.2)
    lrs = [wsd_lr(step, cfg) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1)  # the first step already learns
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[9:80] == [1.0] * 71
    assert all(a > b for a, b in zip(lrs[79:], lrs[80:]))
    assert lrs[99] == pytest.approx(0.1)
    flat = TrainConfig(max_steps=5, lr=0.5, final_lr=0.0, warmup_frac=0.0, decay_frac=0.0)
    assert [wsd_lr(step, flat) for step in range(5)] == [0.5] * 5


def test_loss_goes_down(tmp_path):
    cfg = config(str(tmp_path), steps=40, grad_accum=1)
    cfg.autocast_bf16 = True
    cfg.eval_every = 20
    final = Trainer(build_model(), next_token_loss, CountingData(), cfg, eval_data=CountingData(seed=1)).train()
    logged = records(tmp_path)
    assert [r["step"] for r in logged] == list(range(1, 41))
    assert final == logged[-1]
    assert final["loss"] < 0.5 * logged[0]["loss"]
    evals = [r["eval_loss"] for r in logged if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert all(r["tokens_per_s"] > 0 for r in logged)


class Concatenated:
    """Batch i is micro-batches k*i .. k*i+k-1 of `data` stacked into one."""

    def __init__(self, data, k):
        self.data, self.k = data, k

    def batch(self, i):
        return torch.cat([self.data.batch(self.k * i + j) for j in range(self.k)])


def test_grad_accum_equals_one_big_batch(tmp_path):
    # Rows carry different amounts of padding, so only a mean over all targets (not a mean of
    # per-micro-batch means) makes the two runs agree.
    accum = config(str(tmp_path / "accum"), steps=2, grad_accum=2)
    big = config(str(tmp_path / "big"), steps=2, grad_accum=1)
    for cfg in (accum, big):
        cfg.warmup_frac = cfg.decay_frac = 0.0
        cfg.grad_clip = 0.0
    model_a, model_b = build_model(), build_model()
    data = CountingData(batch_size=4)
    metrics_a = Trainer(model_a, next_token_loss, data, accum).train()
    metrics_b = Trainer(model_b, next_token_loss, Concatenated(CountingData(batch_size=4), 2), big).train()
    assert data.requested == [0, 1, 2, 3]
    assert metrics_a["loss"] == pytest.approx(metrics_b["loss"], rel=1e-6)
    assert metrics_a["grad_norm"] == pytest.approx(metrics_b["grad_norm"], rel=1e-6)
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name
    # and the first step's gradient is that of the mean loss over all targets of the global batch
    model = build_model()
    loss_sum, n_targets = next_token_loss(model, Concatenated(CountingData(batch_size=4), 2).batch(0))
    (loss_sum / n_targets).backward()
    mean_loss_grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert records(accum.out_dir)[0]["grad_norm"] == pytest.approx(mean_loss_grad_norm, rel=1e-5)


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    args = ["--steps", "20", "--grad-accum", "2", "--checkpoint-every", "10", "--freeze"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_a = run_script(*args, "--out", str(whole), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Batches from step 10 on are slow, so the kill lands after the step-10 checkpoint and well
    # before the next one.
    with open(tmp_path / "killed.log", "w") as log:
        run_b = run_script(*args, "--out", str(killed), "--slow-from", "20", stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while not (killed / "checkpoint").exists():
            assert run_b.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint after 60 s"
            time.sleep(0.02)
        run_b.kill()
        run_b.wait()
    state = torch.load(killed / "checkpoint" / "state.pt", weights_only=True)
    assert (state["step"], state["data_index"]) == (10, 20)
    assert run_a.wait(timeout=60) == 0, run_a.stderr.read().decode()

    resumed = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(killed)], env=ENV, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 10" in resumed.stdout
    final_a, final_b = params(whole), params(killed)
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name
    assert [r["step"] for r in records(killed)] == list(range(1, 21))  # no duplicate records
    assert records(killed)[-1]["loss"] == records(whole)[-1]["loss"]


def random_targets_loss(model, batch):
    """Like next_token_loss over a random subset of the targets, drawn from torch's and python's
    generators (as a masked-diffusion loss does): resuming exactly needs their states restored."""
    logits = model(batch[:, :-1])
    keep = torch.rand(batch[:, 1:].shape) < 0.5 + 0.4 * random.random()
    targets = batch[:, 1:].masked_fill(~keep, PAD)
    loss_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD, reduction="sum")
    return loss_sum, (targets != PAD).sum()


class CrashingData(CountingData):
    """Raises at batch `crash_at`, like a process dying in the middle of a step."""

    def __init__(self, crash_at):
        super().__init__()
        self.crash_at = crash_at

    def batch(self, i):
        if i == self.crash_at:
            raise RuntimeError("simulated crash")
        return super().batch(i)


@pytest.mark.parametrize("cut", ["while writing", "between renames"])
def test_interrupted_checkpoint_write_falls_back(tmp_path, cut):
    ref_model = build_model()
    ref_cfg = config(str(tmp_path / "ref"), steps=6, checkpoint_every=2)
    Trainer(ref_model, random_targets_loss, CountingData(), ref_cfg).train()

    cfg = config(str(tmp_path / "run"), steps=6, checkpoint_every=2)
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies in step 6, after checkpoint 4
        Trainer(build_model(), random_targets_loss, CrashingData(crash_at=10), cfg).train()
    out = Path(cfg.out_dir)
    # What a kill during the next checkpoint write leaves behind: a temp dir with a torn file, and
    # when the kill came between the two renames, the complete checkpoint still under its old name.
    (out / "checkpoint.tmp").mkdir()
    (out / "checkpoint.tmp" / "model.safetensors").write_bytes(b"\x80\x00torn")
    if cut == "between renames":
        (out / "checkpoint").rename(out / "checkpoint.old")

    model, data = build_model(), CountingData()
    Trainer(model, random_targets_loss, data, cfg).train()
    assert data.requested[0] == 8  # resumed after step 4, not from scratch
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "metrics.jsonl"]
    assert [r["step"] for r in records(out)] == list(range(1, 7))  # step 5's first record was dropped
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), name


def test_checkpoint_with_tied_weights(tmp_path):
    def tied_model():
        model = build_model()
        model.head.weight = model.embed.weight
        return model

    cfg = config(str(tmp_path), steps=2, grad_accum=1)
    trained = tied_model()
    Trainer(trained, next_token_loss, CountingData(), cfg).train()
    restored = tied_model()
    Trainer(restored, next_token_loss, CountingData(), cfg).train()  # finished run: only loads
    assert restored.head.weight is restored.embed.weight
    assert not torch.equal(restored.embed.weight, tied_model().embed.weight)
    for (name, a), b in zip(trained.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--steps", "4", "--freeze"]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return {"out": out, "params": params(out)}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_matches_single_process(tmp_path, parallel, single_process_run):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(SCRIPT)]
    cmd += ["--out", str(tmp_path), "--steps", "4", "--freeze", "--parallel", parallel]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    final = params(tmp_path)
    reference = single_process_run["params"]
    assert final.keys() == reference.keys()
    for name in final:
        assert torch.allclose(final[name], reference[name], rtol=1e-5, atol=1e-5), name
    single, multi = records(single_process_run["out"]), records(tmp_path)
    for key in ("loss", "grad_norm", "eval_loss"):
        assert multi[-1][key] == pytest.approx(single[-1][key], rel=1e-5), key
    assert multi[0]["grad_norm"] == pytest.approx(single[0]["grad_norm"], rel=1e-5)
    frozen = build_model().blocks[0].fc1
    assert torch.equal(final["blocks.0.fc1.weight"], frozen.weight.detach())
    assert not torch.equal(final["blocks.0.fc2.weight"], build_model().blocks[0].fc2.weight.detach())


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_tower_diffusion_matches_single_process(tmp_path, parallel):
    """The real objective on the real model: a frozen context tower (replicated under DDP, sharded
    under FSDP2) and MoE experts that some ranks never route to."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    base = [str(SCRIPT), "--steps", "3", "--two-tower", "--parallel", parallel]
    result = subprocess.run([sys.executable, *base, "--out", str(single)], env=ENV, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *base,
           "--out", str(multi)]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    a, b = params(single), params(multi)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name
    start = build_two_tower().state_dict()
    assert all(torch.equal(a[k], start[k]) for k in a if k.startswith(("context_tower.", "context_lm_head.")))
    assert not torch.equal(a["lm_head.weight"], start["lm_head.weight"])


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"warmup_frac": 0.6, "decay_frac": 0.5}, "warmup_frac \\+ decay_frac"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"max_steps": 0}, "max_steps"),
        ({"parallel": "zero3"}, "parallel"),
        ({"learning_rate": 1e-3}, "unknown settings"),
    ],
)
def test_bad_config_raises(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(bad)


def test_config_from_yaml_and_json(tmp_path):
    (tmp_path / "train.yaml").write_text("max_steps: 50\nlr: 3e-4\nbetas: [0.9, 0.99]\nparallel: fsdp\n")
    (tmp_path / "train.json").write_text(json.dumps({"max_steps": 50, "lr": 3e-4, "betas": [0.9, 0.99]}))
    from_yaml = TrainConfig.from_file(tmp_path / "train.yaml")
    assert from_yaml == TrainConfig(max_steps=50, lr=3e-4, betas=(0.9, 0.99), parallel="fsdp")
    assert TrainConfig.from_file(tmp_path / "train.json") == TrainConfig(max_steps=50, lr=3e-4, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="warmup_frac"):
        (tmp_path / "bad.yaml").write_text("warmup_frac: 0.9\ndecay_frac: 0.2\n")
        TrainConfig.from_file(tmp_path / "bad.yaml")
