"""The generation modes, in one table that everything reads: the model's `generate`, the command
line, the server, the benchmark, the recipe and the lm-eval adapter.

A mode is a name, the function that runs it, called as

    mode.generate(model, input_ids, max_new_tokens, attention_mask=..., sampling=SamplingParams,
                  options=GenerateOptions[, diffusion=DiffusionParams])

whether it takes `DiffusionParams` (and a `step_callback`), and which of their fields `twotower
bench` sweeps besides the block size. `register_mode` adds one; `TwoTowerForCausalLM`'s module
registers "diffusion", "speculative", "mock-ar" and "ar".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from .params import split_settings

MODES: dict = {}  # name -> Mode, in registration order


@dataclass(frozen=True)
class Mode:
    name: str
    generate: Callable
    uses_diffusion: bool  # takes `diffusion` and a step_callback
    summary: str
    swept: str = "confidence_threshold"  # the DiffusionParams field the benchmark sweeps with block_size


def register_mode(mode: Mode) -> Mode:
    if mode.name in MODES and MODES[mode.name] != mode:
        raise ValueError(f"a different generation mode named {mode.name!r} is already registered")
    MODES[mode.name] = mode
    return mode


def get_mode(name: str) -> Mode:
    """The mode called `name` (underscores read as hyphens: "mock_ar"); ValueError naming the modes."""
    mode = MODES.get(str(name).replace("_", "-"))
    if mode is None:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {name!r}")
    return mode


def run_mode(model, name: str, input_ids, max_new_tokens: int = 128, *, attention_mask=None, sampling=None,
             diffusion=None, options=None, **kwargs):
    """Generate with the mode called `name`. Settings as objects or as their fields by keyword;
    the diffusion settings and the step callback are dropped for modes that do not take them, so one
    set of settings serves every mode."""
    mode = get_mode(name)
    sampling, diffusion, options = split_settings("run_mode", kwargs, sampling, diffusion, options)
    if not mode.uses_diffusion:
        return mode.generate(model, input_ids, max_new_tokens, attention_mask=attention_mask, sampling=sampling,
                             options=dataclasses.replace(options, step_callback=None))
    return mode.generate(model, input_ids, max_new_tokens, attention_mask=attention_mask, sampling=sampling,
                         diffusion=diffusion, options=options)
