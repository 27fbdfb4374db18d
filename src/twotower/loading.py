"""What `from_pretrained` takes besides the checkpoint, as one validated object, and where the
checkpoint is: a local folder, or a Hub repository id resolved through the Hugging Face cache
(`huggingface_hub.snapshot_download`, which honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE).

The arguments follow transformers' `PreTrainedModel.from_pretrained`; those that ask for something
this loader cannot do (quantisation, weights split over several devices, pickled weights) are
refused with a message rather than ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

# what a model folder needs: config, weights, generation config, tokenizer, chat template, remote code
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.py", "*.txt", "*.jinja", "*.model", "*.md"]
# arguments transformers' Auto classes and pipelines pass that concern neither loading nor the config
_PASSED_BY_TRANSFORMERS = {"trust_remote_code", "code_revision", "proxies", "adapter_kwargs", "_from_auto",
                           "_from_pipeline", "_commit_hash", "attn_implementation", "output_loading_info"}
_QUANTISATION = ("load_in_8bit", "load_in_4bit", "quantization_config")


@dataclass
class LoadOptions:
    """dtype: a torch dtype, its name, or "auto"/None (as stored). device: where the weights go
    (`device_map` of one device, or {"": device}). Hub: revision, cache_dir, local_files_only,
    token, force_download, subfolder. Loading is always low-memory (the model is built on `meta`
    and filled from memory-mapped safetensors), so `low_cpu_mem_usage` is accepted either way."""

    dtype: torch.dtype | None = None
    device: torch.device = torch.device("cpu")
    revision: str | None = None
    cache_dir: str | None = None
    local_files_only: bool = False
    token: str | bool | None = None
    force_download: bool = False
    subfolder: str = ""

    @classmethod
    def from_kwargs(cls, kwargs: dict, dtype=None, device=None) -> "LoadOptions":
        """Take the loading arguments out of `kwargs` (what is left are config overrides)."""
        for name in _QUANTISATION:
            if kwargs.pop(name, None):
                raise ValueError(f"{name}: quantised loading is not supported; load in a float dtype "
                                 "(dtype=torch.bfloat16 halves the memory)")
        if kwargs.pop("use_safetensors", None) is False:
            raise ValueError("use_safetensors=False: this loader reads safetensors only (never pickled weights)")
        kwargs.pop("low_cpu_mem_usage", None)
        for name in _PASSED_BY_TRANSFORMERS:
            kwargs.pop(name, None)
        dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
        device_map = kwargs.pop("device_map", None)
        if device is not None and device_map is not None:
            raise ValueError("give device or device_map, not both")
        hub = {f.name: kwargs.pop(f.name) for f in fields(cls)[2:] if f.name in kwargs}
        if hub.get("subfolder") is None:
            hub.pop("subfolder", None)
        return cls(dtype=parse_dtype(dtype), device=parse_device(device if device is not None else device_map),
                   **hub)


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype if isinstance(dtype, torch.dtype) else None
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, dtype.removeprefix("torch."))
    raise ValueError(f"dtype must be a torch dtype, its name or 'auto', got {dtype!r}")


def parse_device(device_map) -> torch.device:
    """One device from transformers' `device_map`: a device (name, index or torch.device), "auto"
    (the first accelerator if any, else the CPU), or {"": device}. Maps that split the model over
    several devices are refused (the two towers can go to two devices with
    `place_towers_on_devices`)."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(f"device_map {device_map!r} splits the model over devices, which this loader does "
                             "not do: give one device (or {'': device}); TwoTowerForCausalLM."
                             "place_towers_on_devices puts the towers on two")
        device_map = device_map[""]
    if device_map == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device_map in ("balanced", "balanced_low_0", "sequential"):
        raise ValueError(f"device_map={device_map!r} is not supported: give one device")
    if isinstance(device_map, int) and not isinstance(device_map, bool):  # an accelerator index, as transformers
        return torch.device("cuda", device_map)
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device_map {device_map!r} is not a device: {e}") from None


def resolve_checkpoint(name_or_path: str | Path, options: LoadOptions) -> Path:
    """The local folder of a checkpoint: `name_or_path` itself if it is a folder, else the snapshot
    of the Hub repository of that id (from the cache when offline or `local_files_only`)."""
    folder = Path(name_or_path)
    if folder.is_dir():
        return folder / options.subfolder if options.subfolder else folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        snapshot = snapshot_download(str(name_or_path), revision=options.revision, cache_dir=options.cache_dir,
                                     local_files_only=options.local_files_only, token=options.token,
                                     force_download=options.force_download, allow_patterns=CHECKPOINT_FILES)
    except HFValidationError:
        raise FileNotFoundError(f"no model folder at {name_or_path} (and it is not a Hub repository id)") from None
    except Exception as e:  # not in the cache while offline, no such repository, no network
        raise FileNotFoundError(f"no model folder at {name_or_path}, and the Hub repository {name_or_path!r} "
                                f"could not be loaded ({type(e).__name__}: {e})") from None
    folder = Path(snapshot) / options.subfolder if options.subfolder else Path(snapshot)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"the Hub repository {name_or_path!r} has no config.json"
                                + (f" in {options.subfolder!r}" if options.subfolder else ""))
    return folder
