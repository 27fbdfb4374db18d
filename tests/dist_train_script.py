"""Train a tiny language model with `twotower.trainer`, alone or under torchrun (for the trainer tests).

    torchrun --nproc_per_node=2 --standalone tests/dist_train_script.py --out DIR --steps 4 --parallel fsdp

The model is built from a fixed seed, so every process and every run starts from the same weights.
The trainer checkpoints after the last step, so DIR/checkpoint/model.safetensors holds the final
parameters. The test file imports the model, data and loss from here.
"""

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from conftest import tiny_config  # this file's folder is on the path, run directly or imported by the tests
from twotower import NemotronHForCausalLM, TwoTowerForCausalLM
from twotower.trainer import Trainer, TrainConfig, exit_distributed

VOCAB = 32
PAD = 0


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class TinyLM(nn.Module):
    """Embedding, residual MLP blocks, LayerNorm and a linear head: enough to learn a counting task."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, n_blocks: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build_model(freeze: bool = False) -> TinyLM:
    """The same weights every time; `freeze` freezes blocks[0].fc1, so blocks[0] mixes both kinds."""
    torch.manual_seed(0)
    model = TinyLM()
    if freeze:
        model.blocks[0].fc1.requires_grad_(False)
    return model


def next_token_loss(model, batch):
    """Summed cross-entropy of predicting each token from the previous one; PAD targets don't count."""
    logits = model(batch[:, :-1])
    targets = batch[:, 1:]
    loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=PAD, reduction="sum")
    return loss_sum, (targets != PAD).sum()


class CountingData:
    """Rows count up by one (over 1..VOCAB-1, wrapping) from a random start and end in PAD padding of
    random length, so micro-batches and ranks hold different numbers of targets.

    `requested` records the batch indices asked for; from index `slow_from` on, each batch takes
    `delay` seconds (to give a test time to kill the process at a known point).
    """

    def __init__(self, batch_size: int = 8, seq_len: int = 16, seed: int = 0, slow_from: int | None = None):
        self.batch_size, self.seq_len, self.seed, self.slow_from = batch_size, seq_len, seed, slow_from
        self.delay = 0.25
        self.requested = []

    def batch(self, i: int) -> torch.Tensor:
        self.requested.append(i)
        if self.slow_from is not None and i >= self.slow_from:
            time.sleep(self.delay)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        start = torch.randint(1, VOCAB, (self.batch_size, 1), generator=g)
        position = torch.arange(self.seq_len)
        rows = (start - 1 + position) % (VOCAB - 1) + 1
        pad = torch.randint(0, self.seq_len // 2, (self.batch_size, 1), generator=g)
        return rows.masked_fill(position >= self.seq_len - pad, PAD)


def config(out: str, steps: int, grad_accum: int = 2, checkpoint_every: int = 0, parallel: str = "ddp") -> TrainConfig:
    return TrainConfig(
        max_steps=steps,
        lr=1e-2,
        final_lr=1e-3,
        warmup_frac=0.25,
        decay_frac=0.25,
        weight_decay=0.1,
        grad_accum=grad_accum,
        eval_every=0,
        eval_batches=2,
        checkpoint_every=checkpoint_every,
        log_every=1,
        out_dir=out,
        parallel=parallel,
    )


def build_two_tower():
    """A tiny two-tower model (every layer kind), the same weights every time."""
    torch.manual_seed(0)
    return TwoTowerForCausalLM.from_single_tower(NemotronHForCausalLM(tiny_config("M*E", vocab_size=VOCAB)))


def row_noise_diffusion_loss(model, batch):
    """The diffusion loss with each row's noise drawn from a generator seeded by that row alone, so
    that the loss of a global batch does not depend on how ranks split it."""
    from twotower.objectives import corrupt, diffusion_loss

    parts = [corrupt(row[None], 3, torch.Generator().manual_seed(int(row.sum()) * 31 + int(row[0])))
             for row in batch]
    noise = tuple(torch.cat(p) for p in zip(*parts))
    return diffusion_loss(model, batch, 8, noise=noise)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--freeze", action="store_true", help="freeze blocks[0].fc1")
    parser.add_argument("--slow-from", type=int, help="make batches from this index on slow")
    parser.add_argument("--two-tower", action="store_true", help="the diffusion objective on a two-tower model")
    args = parser.parse_args(argv)

    cfg = config(args.out, args.steps, args.grad_accum, args.checkpoint_every, args.parallel)
    data = CountingData(slow_from=args.slow_from)
    model, loss = (build_two_tower(), row_noise_diffusion_loss) if args.two_tower else \
        (build_model(args.freeze), next_token_loss)
    return Trainer(model, loss, data, cfg, eval_data=CountingData(seed=1)).train()


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        exit_distributed()
