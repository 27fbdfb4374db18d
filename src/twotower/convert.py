"""`twotower convert`: single-tower NemotronH checkpoints to two-tower folders and back.

* `to_two_tower`: a NemotronH folder, in the hub layout (`backbone.*`, per-expert keys) or as
  transformers' `NemotronHForCausalLM.save_pretrained` writes it (`model.*`, fused experts), becomes
  a two-tower folder initialised as the release was (`TwoTowerForCausalLM.from_single_tower`: the
  body in both towers, the head in both heads, fresh time conditioning), written by
  `twotower.export.save_for_hub`, so it also loads with `trust_remote_code=True`.
* `to_single_tower`: the context tower and `context_lm_head` of a two-tower folder as a plain
  NemotronH AR model in the hub layout, with a config.json that transformers reads as its own
  `NemotronHForCausalLM` (no remote code needed).

Tokenizer files are copied along. The router and A_log stay float32 whatever the dtype. The
command line is in `convert_cli.py`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from .choices import WEIGHT_DTYPES
from .export import check_empty, save_for_hub
from .hub import DEFAULT_SHARD_BYTES
from .modeling import NemotronHForCausalLM
from .two_tower import TwoTowerForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
DTYPES = {name: getattr(torch, name) for name in WEIGHT_DTYPES}  # --dtype


def copy_tokenizer(source: str | Path, target: str | Path) -> None:
    """Copy the tokenizer files present in `source` to `target`."""
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(target) / name)


def to_two_tower(source: str | Path, target: str | Path, dtype: torch.dtype | None = None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, **diffusion_settings) -> Path:
    """Two-tower folder from a single-tower NemotronH folder. `dtype` defaults to the source's;
    `diffusion_settings` (block_size, mask_token_id, ...) go to the new config."""
    check_empty(target)
    single = NemotronHForCausalLM.from_pretrained(source, dtype=dtype)  # cast while loading: no second copy
    model = TwoTowerForCausalLM.from_single_tower(single, **diffusion_settings)
    save_for_hub(model, target, max_shard_bytes=max_shard_bytes)
    copy_tokenizer(source, target)
    return Path(target)


def to_single_tower(source: str | Path, target: str | Path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """AR model folder (context tower + context_lm_head) from a two-tower folder."""
    check_empty(target)
    single = TwoTowerForCausalLM.from_pretrained(source, dtype=dtype).context_model()
    single.config.architectures = ["NemotronHForCausalLM"]
    single.save_pretrained(target, max_shard_bytes)
    copy_tokenizer(source, target)
    return Path(target)


# ---------------------------------------------------------------------------- command line

def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB or a number of bytes)")
    unit = (m[2] or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    return int(float(m[1]) * scale)


def check_source(source: str | Path, to: str) -> None:
    """A ValueError that says what is wrong with the source folder for the direction asked."""
    source = Path(source)
    if not source.is_dir():
        raise ValueError(f"source folder {source} does not exist")
    if not (source / "config.json").is_file():
        raise ValueError(f"{source} holds no config.json: not a checkpoint folder")
    config = json.loads((source / "config.json").read_text())
    two_tower = any("TwoTower" in a for a in config.get("architectures") or []) or "mask_token_id" in config
    if to == "two-tower" and two_tower:
        raise ValueError(f"{source} is already a two-tower checkpoint; --to single-tower extracts its AR model")
    if to == "single-tower" and not two_tower:
        raise ValueError(f"{source} is a single-tower NemotronH checkpoint, not a two-tower one; "
                         "--to two-tower builds a two-tower model from it")
