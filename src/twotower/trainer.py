"""A generic training loop: AdamW with a warmup-stable-decay schedule, gradient accumulation, bf16
autocast, DDP or FSDP2 data parallelism, and atomic checkpoints that resume bit-identically.

The objective is a `loss_fn(model, batch) -> (loss_sum, n_targets)` returning the *sum* of the
per-target losses and the number of targets. The trainer adds both up over the micro-batches and
the ranks and divides once, so every step minimizes the mean over all targets of the global batch
however it is split (gradient accumulation, data parallel, rows with different numbers of targets).
`loss_fn` must run the forward pass through the `model` it is given (the DDP wrapper under DDP).

Data is any object with `batch(i) -> LongTensor[global_batch, T]`, a pure function of `i`. Step `s`
reads micro-batches `s * grad_accum + m` (m < grad_accum) and every data-parallel rank takes its own
contiguous block of rows, so what a step sees depends neither on the process layout nor on restarts.

Under `torchrun` (WORLD_SIZE > 1) the trainer starts the process group itself (gloo for a CPU model,
nccl for a CUDA model, which it moves to cuda:LOCAL_RANK) and wraps the model in DDP, or in FSDP2
with `parallel: fsdp`. Every rank must build the same initial model (same seed): FSDP2 shards each
rank's own copy, one group per module of `model.fsdp_units()` if the model has it (modules whose
parameters are only used through their own forward), else per child (see `_shard_submodules`). Parameters with requires_grad=False never reach the optimizer; DDP leaves them out of
the gradient all-reduce, and FSDP2 shards them in groups of their own (see `_shard_submodules`).

A torchrun process ends with `exit_distributed()` (see there why it skips interpreter teardown).

Files in `out_dir` (written by rank 0 only):
    checkpoint/                   a model folder written through `hub`: config.json (for a model
                                  with a config) and the full state dict (model.safetensors, or
                                  shards and their index), so `from_pretrained` loads it whatever
                                  the parallelism (FSDP included); plus
    checkpoint/state.pt           step, data position, optimizer, RNG states (torch.load weights_only)
    metrics.jsonl                 one JSON record per logged step
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from .hub import iter_shards, save_state_dict

PARALLEL_MODES = ("ddp", "fsdp")


class Batches(Protocol):
    """A deterministic source of token batches: `batch(i)` is a pure function of `i`."""

    def batch(self, i: int) -> torch.Tensor: ...


LossFn = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor | int]]


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run. Steps count optimizer updates."""

    max_steps: int = 1000
    lr: float = 3e-4  # peak learning rate
    final_lr: float = 3e-5  # learning rate of the last step
    warmup_frac: float = 0.01  # share of the steps spent ramping up linearly to `lr`
    decay_frac: float = 0.2  # share of the steps, at the end, spent decaying linearly to `final_lr`
    weight_decay: float = 0.1  # applied to parameters with two or more dimensions only
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # largest global gradient norm; 0 turns clipping off
    grad_accum: int = 1  # micro-batches per optimizer step
    autocast_bf16: bool = False
    eval_every: int = 100  # steps between evaluations (0: only after the last step)
    eval_batches: int = 8
    checkpoint_every: int = 100  # steps between checkpoints (0: only after the last step)
    log_every: int = 10  # steps between metrics records
    out_dir: str = "runs/train"
    seed: int = 0
    parallel: str = "ddp"  # "ddp" or "fsdp", used when WORLD_SIZE > 1

    def __post_init__(self):
        # YAML reads `3e-4` (no dot) as a string; accept numeric strings for float settings
        for field in dataclasses.fields(self):
            if field.type == "float" and isinstance(getattr(self, field.name), str):
                setattr(self, field.name, float(getattr(self, field.name)))
        self.betas = tuple(self.betas)
        problems = [
            (self.max_steps < 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.grad_accum < 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.lr <= 0 or self.final_lr < 0, f"need lr > 0 and final_lr >= 0, got {self.lr}, {self.final_lr}"),
            (
                not (0 <= self.warmup_frac <= 1 and 0 <= self.decay_frac <= 1),
                f"warmup_frac and decay_frac must lie in [0, 1], got {self.warmup_frac}, {self.decay_frac}",
            ),
            (
                self.warmup_frac + self.decay_frac > 1,
                f"warmup_frac + decay_frac must be <= 1, got {self.warmup_frac} + {self.decay_frac}",
            ),
            (self.weight_decay < 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (
                len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas),
                f"betas must be two numbers in [0, 1), got {self.betas}",
            ),
            (self.grad_clip < 0, f"grad_clip must be >= 0 (0: off), got {self.grad_clip}"),
            (self.eval_every < 0 or self.checkpoint_every < 0, "eval_every and checkpoint_every must be >= 0"),
            (self.eval_batches < 1 or self.log_every < 1, "eval_batches and log_every must be >= 1"),
            (self.parallel not in PARALLEL_MODES, f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}"),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(f"TrainConfig: {message}")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"TrainConfig: unknown settings {unknown}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a flat mapping of settings from a .yaml/.yml or .json file."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            values = yaml.safe_load(path.read_text())
        elif path.suffix == ".json":
            values = json.loads(path.read_text())
        else:
            raise ValueError(f"TrainConfig: {path} is neither .yaml/.yml nor .json")
        return cls.from_dict(values or {})


def wsd_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based) under warmup-stable-decay.

    Linear warmup reaching `lr` at the last warmup step, constant `lr`, then a linear decay that
    reaches `final_lr` at the last step (`max_steps - 1`).
    """
    warmup = round(cfg.warmup_frac * cfg.max_steps)
    decay = min(round(cfg.decay_frac * cfg.max_steps), cfg.max_steps - warmup)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if step < cfg.max_steps - decay:
        return cfg.lr
    return cfg.final_lr + (cfg.lr - cfg.final_lr) * (cfg.max_steps - 1 - step) / decay


class Trainer:
    """Trains `model` on `loss_fn` over `data` as `cfg` says; `train()` resumes from `out_dir`."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Batches,
        cfg: TrainConfig,
        eval_data: Batches | None = None,
    ):
        self.loss_fn, self.data, self.cfg, self.eval_data = loss_fn, data, cfg, eval_data
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoint"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.device = next(model.parameters()).device
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
                torch.cuda.set_device(self.device)
                model.to(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.rank = dist.get_rank()
            if cfg.parallel == "ddp":
                model = DDP(model, device_ids=[self.device] if self.device.type == "cuda" else None)
            else:
                mesh = init_device_mesh(self.device.type, (self.world,))
                if hasattr(model, "fsdp_units"):  # the model knows which modules run only through forward
                    for unit in model.fsdp_units():
                        fully_shard(unit, mesh=mesh)
                else:
                    _shard_submodules(model, mesh)
                fully_shard(model, mesh=mesh)
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("Trainer: the model has no parameter with requires_grad=True")
        groups = [
            {"params": [p for p in self.params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
        self.step = 0  # optimizer steps done
        self.data_index = 0  # next micro-batch to read

    def train(self) -> dict:
        """Train (or resume) up to `cfg.max_steps`; returns the metrics of the last step.

        Seeds torch's and python's generators with `cfg.seed + rank`; a resumed run restores them.
        """
        cfg = self.cfg
        torch.manual_seed(cfg.seed + self.rank)
        random.seed(cfg.seed + self.rank)
        self._resume()
        self.model.train()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", disable=self.rank != 0)
        record = {"step": self.step}
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = wsd_lr(self.step, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, target count
            for micro in range(cfg.grad_accum):
                batch = self.data.batch(self.data_index)
                self.data_index += 1
                # DDP all-reduces after the last micro-batch only; FSDP reduce-scatters after each
                # one, which keeps the accumulated gradients sharded
                if isinstance(self.model, DDP):
                    self.model.require_backward_grad_sync = micro == cfg.grad_accum - 1
                with self._autocast():
                    loss_sum, n_targets = self.loss_fn(self.model, self._local_rows(batch))
                loss_sum.backward()
                totals += self._pair(loss_sum, n_targets)
            loss_total, count = self._all_reduce(totals).tolist()
            # DDP and FSDP average gradients over ranks: rescale them to the mean over all targets
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(self.world / max(count, 1.0))
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip or math.inf)
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
            self.optimizer.step()
            self.step += 1

            tokens = batch.numel() * cfg.grad_accum
            record = {
                "step": self.step,
                "loss": loss_total / max(count, 1.0),
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "tokens_per_s": tokens / (time.perf_counter() - t0),
            }
            if self.eval_data is not None and self._due(cfg.eval_every):
                record["eval_loss"] = self.evaluate()
            if "eval_loss" in record or self._due(cfg.log_every):
                self._log(record)
            if self._due(cfg.checkpoint_every):
                self.save_checkpoint()
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False
            )
            bar.update()
        bar.close()
        return record

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per target over the first `cfg.eval_batches` batches of `eval_data`."""
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(self.cfg.eval_batches):
            with self._autocast():
                loss_sum, n_targets = self.loss_fn(self.model, self._local_rows(self.eval_data.batch(i)))
            totals += self._pair(loss_sum, n_targets)
        self.model.train()
        loss_total, count = self._all_reduce(totals).tolist()
        return loss_total / max(count, 1.0)

    def save_checkpoint(self) -> None:
        """Write `out_dir/checkpoint` atomically: fill a temp directory, fsync it, rename it in.

        A `checkpoint` directory therefore always holds a complete checkpoint. Collective under
        data parallelism (every rank must call it); only rank 0 writes.
        """
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.model, options=options)
        state = {
            "step": self.step,
            "data_index": self.data_index,
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=options),
            "rng": self._gather(_rng_state(self.device)),
            "metrics_bytes": self.metrics_path.stat().st_size if self.metrics_path.exists() else 0,
        }
        if self.rank != 0:
            return
        tmp, old = self.out_dir / "checkpoint.tmp", self.out_dir / "checkpoint.old"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model = getattr(self.model, "module", self.model)  # DDP wraps the model
        if hasattr(model, "save_pretrained"):  # a model folder as every other save writes it
            model.save_pretrained(tmp, state_dict=weights)
        else:
            save_state_dict(weights, tmp)
        torch.save(state, tmp / "state.pt")
        for path in (*tmp.iterdir(), tmp):
            _fsync(path)
        if self.ckpt_dir.exists():
            self.ckpt_dir.rename(old)
        tmp.rename(self.ckpt_dir)
        _fsync(self.out_dir)
        shutil.rmtree(old, ignore_errors=True)  # from here on only the new checkpoint exists

    def _resume(self) -> None:
        """Load `out_dir/checkpoint` if present, first cleaning up after a write that was cut short."""
        tmp, old = self.out_dir / "checkpoint.tmp", self.out_dir / "checkpoint.old"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # killed while writing: the temp dir is incomplete
            if old.exists() and self.ckpt_dir.exists():  # killed after the new one was renamed in
                shutil.rmtree(old)
            elif old.exists():  # killed between the two renames: the old one is the latest complete
                old.rename(self.ckpt_dir)
        if self.world > 1:
            dist.barrier()
        if not self.ckpt_dir.exists():
            return
        state = torch.load(self.ckpt_dir / "state.pt", map_location="cpu", weights_only=True)
        options = StateDictOptions(full_state_dict=True)
        weights = {key: t for _, tensors in iter_shards(self.ckpt_dir) for key, t in tensors}
        set_model_state_dict(self.model, weights, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        self.step, self.data_index = state["step"], state["data_index"]
        if len(state["rng"]) == self.world:  # with another world size the random streams start afresh
            _set_rng_state(state["rng"][self.rank], self.device)
        if self.rank == 0:
            if self.metrics_path.exists():  # drop the records of steps done after the checkpoint
                os.truncate(self.metrics_path, min(state["metrics_bytes"], self.metrics_path.stat().st_size))
            print(f"resuming from {self.ckpt_dir} at step {self.step}", flush=True)

    def _due(self, every: int) -> bool:
        return self.step == self.cfg.max_steps or (every > 0 and self.step % every == 0)

    def _local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous block of rows of a global batch, on the model's device."""
        if batch.shape[0] % self.world:
            raise ValueError(f"Trainer: global batch of {batch.shape[0]} rows does not split over {self.world} ranks")
        rows = batch.shape[0] // self.world
        return batch[self.rank * rows : (self.rank + 1) * rows].to(self.device, non_blocking=True)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast_bf16)

    def _pair(self, loss_sum: torch.Tensor, n_targets: torch.Tensor | int) -> torch.Tensor:
        n = torch.as_tensor(n_targets, device=self.device).to(torch.float64)
        return torch.stack([loss_sum.detach().to(torch.float64), n])

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def _gather(self, obj) -> list:
        """`obj` of every rank, in rank order."""
        if self.world == 1:
            return [obj]
        objs = [None] * self.world
        dist.all_gather_object(objs, obj)
        return objs

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")


def exit_distributed(code: int = 0):
    """End a torchrun worker once its work is on disk: destroy the process group, flush, `os._exit`.

    Not a plain interpreter exit: a gloo worker thread drops a finished collective's tensors only once
    it holds the GIL, while the process group's destructor, run when exit collects the DDP wrapper,
    holds the GIL and waits for that thread. This deadlock hung about one run in 25 of
    `tests/dist_train_script.py` on a loaded machine (seen with py-spy); skipping teardown avoids it.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _shard_submodules(module: nn.Module, mesh) -> None:
    """Apply FSDP2 to the children of `module`, bottom-up, one communication group per child.

    Containers (ModuleList, ModuleDict) are split into their items, so each layer is its own group.
    A child mixing frozen and trainable parameters is split as well, so groups hold one kind only:
    frozen weights are sharded like the others, and their groups never reduce gradients. Parameters
    held directly by a split module fall to the root's group (which the caller shards last).
    """
    for child in module.children():
        kinds = {p.requires_grad for p in child.parameters()}
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) or len(kinds) > 1:
            _shard_submodules(child, mesh)
        elif kinds:
            fully_shard(child, mesh=mesh)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random generators' states, as tensors so that `torch.load(weights_only=True)` reads them."""
    _, mt, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(mt, dtype=torch.int64),
        "python_gauss": torch.tensor(math.nan if gauss is None else gauss, dtype=torch.float64),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    gauss = state["python_gauss"].item()
    random.setstate((random.Random.VERSION, tuple(state["python"].tolist()), None if math.isnan(gauss) else gauss))
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
