"""`twotower train`: one training run of either objective on packed token shards.

    # AR pre-training of a new backbone described by a config.json
    twotower train --objective ar --model-config backbone.json --data shards/ --out runs/ar
    # masked diffusion; --model is a two-tower folder, or a single-tower one (both towers from it)
    twotower train --objective diffusion --model runs/ar/model --data shards/ --out runs/s16 --block-size 16
    # the same on distillation rows (`twotower.distill`): whole rows, prompts never masked or scored
    twotower train --objective diffusion --model runs/s16/model --data distill/shards --out runs/d \
        --certainty-weight 0.5

Optimiser and schedule settings come from `--config` (YAML or JSON, the fields of
`twotower.trainer.TrainConfig`) and the flags that override it. Rerunning the same command resumes.
Works under `torchrun` (DDP, or FSDP2 with `parallel: fsdp`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

# the training code (torch) is imported when the command runs, not for its --help


def add_arguments(p) -> None:
    p.add_argument("--objective", choices=("ar", "diffusion"), required=True)
    p.add_argument("--data", required=True, help="folder written by pack_corpus (train.bin, heldout.bin)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, model/")
    p.add_argument("--model", help="initial model folder")
    p.add_argument("--model-config", help="config.json of a new backbone (AR objective, no --model)")
    p.add_argument("--config", help="TrainConfig as YAML or JSON")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (distillation data: its row length)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (rows)")
    p.add_argument("--block-size", type=int, default=None, help="diffusion block size (default: the model's)")
    p.add_argument("--certainty-weight", type=float, default=0.0,
                   help="diffusion: weight of certainty forcing (entropy of right predictions), 0 = off")
    p.add_argument("--ar-kl-weight", type=float, default=0.0,
                   help="diffusion: weight of the KL from the AR tower's next-token distribution at masked "
                        "positions (word-level distillation), 0 = off")
    p.add_argument("--prefix-noise", type=float, default=0.0, metavar="FRACTION",
                   help="diffusion: the fraction of rows noised as decoding meets a block (a clean prefix, the "
                        "rest masked) instead of uniformly, 0 = off")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)


def build(args, prompt_tokens: int = 0):
    """(model, loss_fn) for the arguments; a clear ValueError for what does not fit. Diffusion rows
    whose first `prompt_tokens` positions are a prompt never mask or score them."""
    from .config import NemotronHConfig
    from .modeling import NemotronHForCausalLM
    from .objectives import ar_loss, diffusion_loss, prompt_loss_mask
    from .two_tower import TwoTowerForCausalLM

    if args.objective == "ar":
        if args.model:
            model = NemotronHForCausalLM.from_pretrained(args.model)
        elif args.model_config:
            model = NemotronHForCausalLM(NemotronHConfig.from_json_file(args.model_config))
        else:
            raise ValueError("the AR objective needs --model or --model-config")
        return model, ar_loss
    if not args.model:
        raise ValueError("the diffusion objective needs --model (a two-tower or single-tower folder)")
    config = json.loads((Path(args.model) / "config.json").read_text())
    if "TwoTower" in "".join(config.get("architectures") or []):
        model = TwoTowerForCausalLM.from_pretrained(args.model)
    else:
        model = TwoTowerForCausalLM.from_single_tower(NemotronHForCausalLM.from_pretrained(args.model))
    block = model.config.block_size if args.block_size is None else args.block_size
    if block < 1:
        raise ValueError(f"--block-size must be >= 1, got {block}")
    if args.seq_len < block:
        raise ValueError(f"--seq-len ({args.seq_len}) is below the block size ({block}): no block would be whole")
    for flag, weight in (("--certainty-weight", args.certainty_weight), ("--ar-kl-weight", args.ar_kl_weight)):
        if not weight >= 0:
            raise ValueError(f"{flag} is a loss weight, >= 0; got {weight}")
    if not 0 <= args.prefix_noise <= 1:
        raise ValueError(f"--prefix-noise is a fraction of rows, in [0, 1]; got {args.prefix_noise}")
    if prompt_tokens % block:
        raise ValueError(f"the data's prompts of {prompt_tokens} tokens do not end at a block boundary "
                         f"(block size {block})")
    model.config.block_size = block

    def loss_fn(m, batch):
        mask = prompt_loss_mask(batch, prompt_tokens) if prompt_tokens else None
        return diffusion_loss(m, batch, block, loss_mask=mask, certainty_weight=args.certainty_weight,
                              prefix_fraction=args.prefix_noise, ar_kl_weight=args.ar_kl_weight)

    return model, loss_fn


def run(args) -> int:
    import torch

    from .data import TokenBatches
    from .distill import DISTILLATION, read_meta
    from .hub import to_dtype
    from .trainer import Trainer, TrainConfig, exit_distributed

    try:
        values = TrainConfig.from_file(args.config).__dict__ if args.config else {}
        overrides = {"max_steps": args.max_steps, "lr": args.lr, "seed": args.seed}
        values.update({k: v for k, v in overrides.items() if v is not None}, out_dir=args.out)
        cfg = TrainConfig.from_dict(values)
        seq_len = args.seq_len + (1 if args.objective == "ar" else 0)  # AR: one more for the shifted targets
        meta = read_meta(args.data)
        prompt_tokens = 0
        if meta.get("kind") == DISTILLATION:
            if args.objective != "diffusion":
                raise ValueError(f"{args.data} holds distillation rows, which train the diffusion objective")
            seq_len, prompt_tokens = meta["row_tokens"], meta["prompt_tokens"]  # whole rows: prompt, continuation
        data = TokenBatches(args.data, "train", seq_len, args.batch_size, seed=cfg.seed)
        held = TokenBatches(args.data, "heldout", seq_len, args.batch_size, seed=cfg.seed)
        torch.manual_seed(cfg.seed)  # fresh weights equal on every rank: FSDP2 shards each rank's own copy
        model, loss_fn = build(args, prompt_tokens)
        to_dtype(model, torch.float32)  # float32 master weights (a shipped folder is bfloat16); autocast is a setting
        top = int(data.tokens.max())
        if top >= model.config.vocab_size:
            raise ValueError(f"the data holds token ids up to {top}, beyond the model's "
                             f"vocabulary of {model.config.vocab_size}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record = Trainer(model, loss_fn, data, cfg, eval_data=held).train()
    if os.environ.get("RANK", "0") == "0":
        if cfg.parallel == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # the parameters are sharded across ranks; the last checkpoint is the full model folder
            shutil.copytree(Path(args.out) / "checkpoint", Path(args.out) / "model", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("state.pt"))
        else:
            model.save_pretrained(Path(args.out) / "model")
    print(json.dumps(record))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_distributed(0)
    return 0
