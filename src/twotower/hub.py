"""Weights on disk: the hub layout of the NVIDIA checkpoints and transformers' own layout.

* hub layout (what we save): `backbone.*`, per-expert `mixer.experts.{e}.up_proj.weight`,
  one `model.safetensors` or shards `model-0000i-of-0000n.safetensors` with
  `model.safetensors.index.json`;
* transformers layout (its in-memory names, which `transformers.NemotronHForCausalLM.save_pretrained`
  writes with `save_original_format=False`; by default it writes the hub layout): `model.*` and
  fused expert tensors `mixer.experts.up_proj` [E, I, H], `down_proj` [E, H, I].

Loading builds the model on the `meta` device and fills it from memory-mapped safetensors: a
file whose tensors need no conversion is used in place (no copy), any other file is copied once
and unmapped, so peak memory stays near the size of the weights plus one shard. Weights are
only ever read from safetensors, never from pickles.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SAFE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_FUSED_EXPERT = re.compile(r"^(.*\.mixer\.experts)\.(up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint folder that does not match the model: names the file and the key."""


def shard_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, checked against its index if sharded."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                keys = [k for k, v in weight_map.items() if v == f.name][:3]
                raise CheckpointError(f"{index} names {f.name} (holding e.g. {keys}) but {f} does not exist")
        return files
    single = folder / SAFE_NAME
    if single.exists():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{folder}: no {SAFE_NAME}, {INDEX_NAME} or *.safetensors file")
    return found


def iter_shards(folder: str | Path):
    """Yield (file, [(key, tensor), ...]) per safetensors file; the tensors are memory-mapped views."""
    for path in shard_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = [(key, f.get_tensor(key)) for key in f.keys()]
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
        yield path, tensors


def to_hub_names(key: str, tensor: torch.Tensor):
    """Map one transformers-layout tensor to hub-layout (name, tensor) pairs."""
    if key.startswith("model."):
        key = "backbone." + key[len("model."):]
    fused = _FUSED_EXPERT.match(key)
    if fused:
        return [(f"{fused[1]}.{e}.{fused[2]}.weight", t) for e, t in enumerate(tensor.unbind(0))]
    return [(key, tensor)]


def to_transformers_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub layout -> transformers layout (fused experts, `model.` prefix)."""
    out, experts = {}, {}
    for key, t in state_dict.items():
        if key.startswith("backbone."):
            key = "model." + key[len("backbone."):]
        m = _PER_EXPERT.match(key)
        if m:
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = t
        else:
            out[key] = t
    for (prefix, proj), by_id in experts.items():
        out[f"{prefix}.{proj}"] = torch.stack([by_id[e] for e in range(len(by_id))])
    return out


FLOAT32_KEYS = re.compile(r"(\.gate\.weight|\.e_score_correction_bias|\.A_log)$")
DEFAULT_SHARD_BYTES = 5 * 2**30


def kept_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor named `name` gets when a model goes to `dtype`: float32 for the router
    and A_log, which loading, casting and saving all keep in float32."""
    return torch.float32 if FLOAT32_KEYS.search(name) else dtype


def to_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(dtype)` in place, except the router and A_log, which stay float32 as loading and
    saving keep them."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(kept_dtype(name, dtype))
    return model


def load_into(model: torch.nn.Module, folder: str | Path, dtype: torch.dtype | None = None,
              device: str | torch.device = "cpu", rename=None) -> None:
    """Fill `model` (possibly on `meta`) from a checkpoint folder in either layout.

    Tensors are cast to `dtype` (default: as stored), except the router and A_log, which stay
    float32. `rename(key) -> key or None` maps checkpoint names (hub layout) to the model's
    names (None drops the tensor). Missing, unexpected and misshapen keys are errors naming them.
    """
    expected = dict(model.state_dict(keep_vars=True))
    seen = set()
    for path, tensors in iter_shards(folder):
        seen.update(_load_file(model, path, tensors, expected, dtype, device, rename))
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{folder}: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _load_file(model, path, tensors, expected, dtype, device, rename) -> list[str]:
    """Check one file's tensors against the model, then assign them; returns the names filled."""
    items = []
    for key, tensor in tensors:
        for name, t in to_hub_names(key, tensor):
            name = rename(name) if rename else name
            if name is None:
                continue
            if name not in expected:
                raise CheckpointError(f"{path.name}: unexpected key {name!r} (not in the model)")
            if tuple(t.shape) != tuple(expected[name].shape):
                raise CheckpointError(
                    f"{path.name}: key {name!r} has shape {tuple(t.shape)}, the model expects "
                    f"{tuple(expected[name].shape)}"
                )
            items.append((name, t, kept_dtype(name, dtype or t.dtype)))
    # One view left in the model keeps the whole file mapped: either no tensor of the file needs
    # converting and all stay views (no copy), or all are copied and the file is unmapped after.
    copy = any(t.dtype != want for _, t, want in items)  # (a move to another device copies anyway)
    for name, t, want in items:
        _assign(model, name, t.to(device=device, dtype=want, copy=copy))
    return [name for name, _, _ in items]


def _assign(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = value


def save_state_dict(state_dict: dict[str, torch.Tensor], folder: str | Path,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict | None = None) -> list[str]:
    """Write safetensors shards (one file if small enough) and, when sharded, the index.

    Files are written under temporary names and renamed, so an interrupted save never leaves a
    complete-looking but partial checkpoint.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for key, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t.detach().contiguous().cpu()
        size += nbytes
    shards.append(current)
    names = [SAFE_NAME] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    meta = {"format": "pt", **(metadata or {})}
    for name, shard in zip(names, shards):
        tmp = folder / (name + ".tmp")
        save_file(unshare(shard), str(tmp), metadata=meta)
        os.replace(tmp, folder / name)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())},
            "weight_map": {k: n for n, s in zip(names, shards) for k in s},
        }
        tmp = folder / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, folder / INDEX_NAME)
    return names


def unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings) or are not contiguous: give
    repeats their own copy, and every tensor a contiguous layout."""
    seen, out = set(), {}
    for name, t in tensors.items():
        storage = t.untyped_storage().data_ptr()
        out[name] = t.clone(memory_format=torch.contiguous_format) if storage in seen else t.contiguous()
        seen.add(storage)
    return out
