"""The NemotronH hybrid tower and the single-tower causal LM.

A tower is embeddings -> pre-norm residual blocks (Mamba-2 'M', attention '*', MoE 'E',
dense MLP '-') -> norm_f. Parameter names follow the hub checkpoints (`backbone.*`,
per-expert `experts.{e}`), so their state dicts load as they are.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.utils import GENERATION_CONFIG_NAME

from .attention import CAUSAL, Attention
from .cache import HybridCache
from .config import BLOCK_TYPES, NemotronHConfig
from .generation import generate_ar
from .hub import DEFAULT_SHARD_BYTES, load_into, save_state_dict
from .linear import Linear
from .mamba2 import Mamba2Mixer
from .mlp import MLP
from .moe import MoE, Router
from .norm import GatedRMSNorm, RMSNorm
from .time_conditioning import modulate


def causal_mask(key_mask: torch.Tensor | None, past: int, length: int, device) -> torch.Tensor | None:
    """Bool mask [b or 1, 1, length, past+length]: query i sees keys 0..past+i that are not padding.

    Returns None for a single query without padding (it sees everything).
    """
    if length == 1 and key_mask is None:
        return None
    q = torch.arange(past, past + length, device=device)[:, None]
    k = torch.arange(past + length, device=device)[None, :]
    mask = (k <= q)[None, None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
    return mask


class Block(nn.Module):
    """h + mixer(norm(h)); with `modulation` (shift, scale, gate) [b, d] each, the denoiser form:

    Mamba and attention modulate before the norm, MoE and MLP after it, and the gate scales
    the mixer output before the residual add (adaLN-single, PixArt-alpha, arXiv:2310.00426).
    `kind` is the block type: "mamba", "attention",
    "moe" or "mlp" (`config.BLOCK_TYPES`).
    """

    def __init__(self, config: NemotronHConfig, letter: str):
        super().__init__()
        self.kind = BLOCK_TYPES[letter]
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        if self.kind == "mamba":
            self.mixer = Mamba2Mixer(config)
        elif self.kind == "attention":
            self.mixer = Attention(config)
        elif self.kind == "moe":
            self.mixer = MoE(config)
        else:
            self.mixer = MLP(config.hidden_size, config.intermediate_size, config.mlp_bias)

    def forward(self, h, state=None, *, mask=None, pad_mask=None, modulation=None, block_states=None,
                keep_state=True, tentative=False):
        """-> (h [b, l, d], the mixer's new state). `state`: the mixer's (attention K/V, Mamba conv
        and SSM state); `mask`: attention's; `pad_mask` [b, l]: Mamba's (False at padding);
        `block_states`: Mamba returns the state entering every block of that size; `tentative`:
        Mamba returns a `MambaChunk` (see `NemotronHModel.forward`). The state is None for MoE/MLP
        and with `keep_state=False`."""
        if modulation is None:
            u = self.norm(h)
        elif self.kind in ("mamba", "attention"):
            u = self.norm(modulate(h, modulation[0], modulation[1]))
        else:
            u = modulate(self.norm(h), modulation[0], modulation[1])
        if self.kind == "mamba":
            y, state = self.mixer(u, state, pad_mask=pad_mask, block_states=block_states, keep_state=keep_state,
                                  tentative=tentative)
        elif self.kind == "attention":
            y, state = self.mixer(u, state, mask)
        else:
            y, state = self.mixer(u), None
        if modulation is not None:
            y = y * modulation[2][:, None].to(y.dtype)
        return h + y, state if keep_state else None


class NemotronHModel(nn.Module):
    """The tower: embeddings, blocks, norm_f. forward(ids [b, l]) -> hidden states [b, l, d]."""

    def __init__(self, config: NemotronHConfig):
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, kind) for kind in config.layer_kinds)
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def new_cache(self) -> HybridCache:
        return HybridCache.empty(len(self.layers))

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None,
                attention_mask: torch.Tensor | None = None, tentative: bool = False) -> torch.Tensor:
        """Causal forward. `attention_mask` [b, l] marks the real tokens of `input_ids` (0 = left
        padding). With a `cache`, the input continues the cached sequence and the cache is updated
        in place; inputs longer than `config.prefill_chunk_size` are run chunk by chunk.

        `tentative=True` (with a cache) runs the input as one chunk whose every prefix may be
        kept: attention keeps all its K/V and the Mamba layers a `MambaChunk` in place of their
        state, until `cache.keep_prefixes(lengths)` keeps the first lengths[r] positions of row r.
        """
        chunk = self.config.prefill_chunk_size
        if tentative and cache is None:
            raise ValueError("a tentative forward continues a cache; pass one")
        if cache is None or input_ids.shape[1] <= chunk or tentative:
            return self._forward(input_ids, cache, attention_mask, tentative)
        outs = [
            self._forward(input_ids[:, i:i + chunk], cache,
                          None if attention_mask is None else attention_mask[:, i:i + chunk])
            for i in range(0, input_ids.shape[1], chunk)
        ]
        return torch.cat(outs, dim=1)

    def _forward(self, input_ids, cache, attention_mask, tentative=False):
        b, l = input_ids.shape
        if l == 0:
            raise ValueError("empty input: input_ids has no positions")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if cache is not None and cache.tentative:
            raise ValueError("the cache holds a tentative chunk; keep_prefixes() must settle it first")
        past = cache.length if cache is not None else 0
        new_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        past_mask = cache.pad_mask if cache is not None else None
        key_mask = None  # [b, past + l], True at real tokens; None while nothing is padded
        if new_mask is not None or past_mask is not None:
            ones = lambda n: torch.ones(b, n, dtype=torch.bool, device=input_ids.device)  # noqa: E731
            key_mask = torch.cat([ones(past) if past_mask is None else past_mask,
                                  ones(l) if new_mask is None else new_mask], dim=1)
        # a fresh unpadded prefill needs no mask tensor: attention runs it as CAUSAL
        mask = CAUSAL if key_mask is None and past == 0 else causal_mask(key_mask, past, l, input_ids.device)
        pad_mask = None if key_mask is None else key_mask[:, past:]
        h = self.embeddings(input_ids)
        for i, layer in enumerate(self.layers):
            h, state = layer(h, cache.states[i] if cache is not None else None, mask=mask, pad_mask=pad_mask,
                             tentative=tentative)
            if cache is not None:
                cache.states[i] = state
        if cache is not None:
            cache.length += l
            cache.pad_mask = key_mask
            cache.tentative = l if tentative else 0
        return self.norm_f(h)


# What transformers' Auto classes and pipelines pass to `from_pretrained` besides the folder.
_DOWNLOAD_ARGUMENTS = {"trust_remote_code", "revision", "code_revision", "cache_dir", "force_download",
                       "local_files_only", "proxies", "token", "adapter_kwargs", "_from_auto", "_from_pipeline"}


class NemotronHPreTrainedModel(PreTrainedModel):
    config_class = NemotronHConfig
    base_model_prefix = "backbone"
    _no_split_modules = ["Block"]

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP2 shards as units: every block, and the embeddings, heads and norms
        outside blocks. Each is only ever used through its own forward (the towers are not: the
        denoiser and the training objective call their parts one by one)."""
        units = [m for m in self.modules() if isinstance(m, Block)]
        inside = {id(p) for b in units for p in b.parameters()}
        units += [m for m in self.modules() if isinstance(m, (nn.Embedding, nn.Linear, RMSNorm))
                  and id(next(m.parameters())) not in inside]
        return units

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype | str | None = None, device="cpu", config=None,
                        **config_overrides):
        """Load a checkpoint folder (hub or transformers layout, sharded or not) without a second
        copy of the weights in memory: the model is built on `meta` and filled from mmap'd shards.

        `dtype` may also be a name or "auto" (as stored). `config` replaces the folder's
        config.json, as transformers' Auto classes pass it; their download arguments (revision,
        trust_remote_code, ...) are accepted and ignored, since `folder` is a local folder.
        """
        overrides = {k: v for k, v in config_overrides.items() if k not in _DOWNLOAD_ARGUMENTS}
        dtype = overrides.pop("torch_dtype", dtype)
        if isinstance(dtype, str):
            dtype = None if dtype == "auto" else getattr(torch, dtype)
        if config is None:
            config = cls.config_class.from_pretrained(folder, **overrides)
        elif overrides:
            raise TypeError(f"from_pretrained got {sorted(overrides)} together with `config`")
        with torch.device("meta"):
            model = cls(config)
        load_into(model, folder, dtype=dtype, device=device)
        if model.can_generate() and (Path(folder) / GENERATION_CONFIG_NAME).exists():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        return model.eval()

    def save_pretrained(self, folder, max_shard_bytes: int = DEFAULT_SHARD_BYTES, **_):
        """Write config.json and the weights in the hub layout (sharded above `max_shard_bytes`)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(folder)
        save_state_dict(self.state_dict(), folder, max_shard_bytes)

    @torch.no_grad()
    def _init_weights(self, module):
        """Initialisation for training from scratch (checkpoint loading overwrites all of it)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, Router):
            nn.init.normal_(module.weight, std=std)
            module.e_score_correction_bias.zero_()
        elif isinstance(module, (RMSNorm, GatedRMSNorm)):
            module.weight.fill_(1.0)
        elif isinstance(module, nn.Conv1d):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, Mamba2Mixer):
            cfg = self.config
            module.A_log.copy_(torch.log(torch.arange(1, module.num_heads + 1, dtype=torch.float32)))
            module.D.fill_(1.0)
            dt = torch.exp(torch.rand(module.num_heads) * (math.log(cfg.time_step_max) - math.log(cfg.time_step_min))
                           + math.log(cfg.time_step_min)).clamp(min=cfg.time_step_floor)
            module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus


class NemotronHForCausalLM(NemotronHPreTrainedModel):
    """Single-tower NemotronH LM: `backbone` (the tower) and an untied `lm_head`."""

    def __init__(self, config: NemotronHConfig):
        super().__init__(config)
        self.backbone = NemotronHModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def new_cache(self) -> HybridCache:
        return self.backbone.new_cache()

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None,
                attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """Float32 logits [b, l, vocab] (only the last `logits_to_keep` positions if > 0)."""
        h = self.backbone(input_ids, cache, attention_mask)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(h).float()

    def generate_ar(self, input_ids, **kwargs):
        """Cached AR generation; see `twotower.generation.generate_ar`."""
        return generate_ar(self, input_ids, **kwargs)
