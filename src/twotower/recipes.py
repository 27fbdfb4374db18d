"""The recipes that `twotower recipe NAME` runs (their settings, a `Recipe` each) and its command
line, importable without torch; the stages that carry a recipe out are in `recipe.py`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple


class NewRows(NamedTuple):
    """Distillation rows a pass adds (`recipe.new_rows_stage`): `count` prompts, a `task_fraction`
    of them exact-answer tasks, continued by the AR tower (greedily, or sampled at `temperature`),
    drawn with the recipe's seed + `seed`."""

    count: int
    task_fraction: float
    seed: int
    temperature: float = 0.0


class DistillPass(NamedTuple):
    """One pass of masked diffusion on the distillation rows (`recipe.distill_stage`)."""

    steps: int
    lr: float  # peak learning rate
    warmup_frac: float = 0.0  # a later pass starts from a trained model
    prefix_noise: float = 0.0  # fraction of rows under prefix noise (`objectives.prefix_noise`)
    certainty_weight: float = 0.0  # certainty forcing (`objectives.certainty_sum`), 0 = off
    ar_kl_weight: float = 0.0  # the AR tower's soft targets (`objectives.teacher_kl_sum`), 0 = off
    new_rows: tuple = ()  # `NewRows` that join the rows from this pass on
    seed: int = 0  # added to the recipe's seed: the row order and the noise


@dataclasses.dataclass
class Recipe:
    model: dict  # NemotronHConfig fields (vocab_size is the tokenizer's)
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    ar_steps: int = 1600
    ar_lr: float = 2e-3
    diffusion_stages: tuple = ((32, 300), (16, 2000))  # (block size, steps)
    diffusion_lr: float = 1e-3
    train_tasks: int = 20000
    heldout_tasks: int = 100
    story_prompts: int = 40
    # grown-up and long, old-fashioned books are left out: simple story text trains best at this size
    exclude: tuple = ("austen.txt", "tinyshakespeare.txt", "forest.txt", "gulliver.txt", "coral.txt", "vice.txt",
                      "wind.txt", "holiday.txt", "water.txt", "duke.txt")
    heldout_stories_from: str = "tinystories_val_head.txt"
    eval_new_tokens: int = 48
    # distillation from the AR tower (`twotower.distill`); 0 rows: no distillation stages
    distill_rows: int = 24000
    distill_prompt_tokens: int = 16  # a multiple of the block size: blocks start where the prompt ends
    distill_continuation_tokens: int = 64
    distill_task_fraction: float = 0.25
    # the passes over the rows, measured in the README's ablation
    distill_stages: tuple = (DistillPass(1200, 3e-4, warmup_frac=0.02),
                             DistillPass(2500, 2e-4, warmup_frac=0.01, new_rows=(NewRows(8000, 1.0, 5),), seed=2),
                             DistillPass(2000, 1e-4, new_rows=(NewRows(12000, 1.0, 6),), seed=4),
                             DistillPass(1000, 5e-5, certainty_weight=0.4, seed=6))
    seed: int = 0
    choices: str = ""  # the measured alternatives behind the settings (markdown), for the model card


# What the tiny recipe's distillation passes were chosen against: `twotower bench` on the held-out
# mix (12 stories, 40 tasks, 32 new tokens, batch 1, 1 thread, AR in the same run), and quality at
# block 16 / 0.8 on the whole held-out set (40 stories, 100 tasks). The README has every run.
TINY_CHOICES = """\
| denoiser | block 16, t=0.8: tokens/fwd | speed-up | quality retained | block 16, t=0.5: tokens/fwd | speed-up | quality retained | whole held-out set, t=0.8 |
|---|---|---|---|---|---|---|---|
| natural text only (before distillation) | 1.08 | 0.48x | 41.1% | 1.20 | 0.53x | 51.1% | - |
| + distillation, 1,200 steps | 2.04 | 0.95x | 56.5% | 3.29 | 1.39x | 39.2% | 58.4% |
| + 2,500 steps with 8,000 task-only rows | 2.15 | 0.88x | 75.9% | 3.94 | 1.50x | 52.8% | 67.8% |
| the same with prefix noise on half the rows | 2.22 | 1.00x | 59.0% | 3.88 | 1.61x | 47.2% | 61.4% |
| + 2,000 steps with 12,000 more task-only rows | 2.20 | 0.95x | 81.9% | 3.86 | 1.50x | 59.4% | 75.7% |
| **+ 1,000 steps at 5e-5 on the same rows, certainty forcing at 0.4 (this model)** | **2.54** | **1.09x** | **82.3%** | 4.63 | 1.78x | 61.6% | **74.8%** |
| the same with certainty forcing at 0.25 | 2.42 | 1.05x | 82.2% | 4.49 | 1.81x | 63.1% | 74.5% |
| the same with certainty forcing at 0.35 | 2.49 | 1.06x | 82.4% | 4.65 | 1.73x | 62.0% | 74.5% |
| the same with certainty forcing at 0.5 | 2.58 | 1.09x | 75.8% | 4.74 | 1.84x | 61.4% | 72.4% |
| instead, 3,000 steps at 1e-4 with 24,000 more task-only rows | 2.31 | 0.94x | 78.9% | 4.06 | 1.60x | 60.7% | 73.2% |
| the same with certainty forcing at 0.25 (the previous model) | 2.63 | 1.10x | 78.8% | 4.41 | 1.69x | 65.5% | 70.7% |
| the same with certainty forcing at 0.5 | 2.99 | 1.20x | 78.7% | 4.79 | 1.84x | 64.1% | 69.1% |
| the same with 24,000 story-only rows too | 2.59 | 1.16x | 76.9% | 4.51 | 1.76x | 58.7% | 69.5% |
| its 24,000 rows sampled at temperature 0.5 | 2.42 | 0.98x | 60.9% | 4.38 | 1.64x | 56.8% | 62.2% |
| the previous model's pass plus the AR tower's soft targets | 1.40 | 0.61x | 67.2% | 2.84 | 1.17x | 72.4% | 70.5% |
"""


TINY_MODEL = dict(
    hidden_size=256, hybrid_override_pattern="M*EM*EM*E",
    num_attention_heads=8, num_key_value_heads=2, head_dim=32,
    mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=32, n_groups=2, chunk_size=64,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
    moe_shared_expert_intermediate_size=256, routed_scaling_factor=2.5, time_step_min=0.001,
)

RECIPES = {
    # ~11M parameters in all (two towers), about three hours and ten minutes on 2 CPU cores
    "tiny": Recipe(model=TINY_MODEL, choices=TINY_CHOICES),
    # a seconds-long run of every stage, for tests
    "smoke": Recipe(
        model=dict(TINY_MODEL, hidden_size=32, hybrid_override_pattern="M*E", num_attention_heads=4,
                   head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
                   moe_intermediate_size=16, moe_shared_expert_intermediate_size=32),
        vocab_size=300, seq_len=32, batch_size=4, ar_steps=6, diffusion_stages=((8, 3), (4, 3)),
        train_tasks=50, heldout_tasks=4, story_prompts=2, eval_new_tokens=8,
        distill_rows=8, distill_prompt_tokens=4, distill_continuation_tokens=8,
        distill_stages=(DistillPass(3, 3e-4, warmup_frac=0.02),
                        DistillPass(2, 2e-4, prefix_noise=0.5, new_rows=(NewRows(8, 1.0, 5),), seed=2),
                        DistillPass(2, 1e-4, certainty_weight=0.5, ar_kl_weight=1.0,
                                    new_rows=(NewRows(4, 1.0, 6), NewRows(4, 0.0, 7, temperature=0.7)), seed=4)),
    ),
}


# ---------------------------------------------------------------- command line

def add_arguments(p) -> None:
    p.add_argument("name", choices=sorted(RECIPES), help="which recipe")
    p.add_argument("--data", required=True, help="folder (or file) of training text")
    p.add_argument("--out", required=True, help="working folder; rerun with the same folder to resume")


def run(args) -> int:
    from .recipe import run_recipe

    result = run_recipe(args.name, args.data, args.out)
    print(json.dumps(result, indent=2))
    print(f"[recipe] the model is in {Path(args.out) / 'model'}")
    return 0
