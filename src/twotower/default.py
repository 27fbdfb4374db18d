"""The embedded default model: a small TwoTower model trained by the project's own recipe and
shipped inside the package, used whenever no model is named."""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


def resolve_model_dir(path: str | Path | None) -> Path:
    """`path` (a folder, or a Hub repository id resolved through the Hugging Face cache), or the
    embedded model's folder when None; a clear error if it holds no model."""
    if path is not None and not Path(path).exists():
        from .loading import LoadOptions, resolve_checkpoint
        return resolve_checkpoint(path, LoadOptions())
    folder = Path(path) if path is not None else DEFAULT_MODEL_DIR
    if not (folder / "config.json").exists():
        hint = "" if path is not None else " (the embedded model is missing from this installation)"
        raise FileNotFoundError(f"no model at {folder}: config.json not found{hint}")
    return folder


def load_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """(TwoTowerForCausalLM, tokenizer) from a model folder, the embedded model by default."""
    from .tokenizer import load_tokenizer
    from .two_tower import TwoTowerForCausalLM

    folder = resolve_model_dir(path)
    return TwoTowerForCausalLM.from_pretrained(folder, dtype=dtype), load_tokenizer(folder)


def load_default(dtype: torch.dtype = torch.float32):
    """The embedded default model and its tokenizer."""
    return load_model(None, dtype)
