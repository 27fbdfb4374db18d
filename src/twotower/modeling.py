"""The NemotronH hybrid tower and the single-tower causal LM.

A tower is embeddings -> pre-norm residual blocks (Mamba-2 'M', attention '*', MoE 'E',
dense MLP '-') -> norm_f. Parameter names follow the hub checkpoints (`backbone.*`,
per-expert `experts.{e}`), so their state dicts load as they are.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import GENERATION_CONFIG_NAME

from .attention import CAUSAL, Attention
from .cache import HybridCache
from .compiled import compiled_version, plain, plain_inputs
from .config import BLOCK_TYPES, NemotronHConfig
from .generation import generate_ar, transformers_generate
from .objectives import causal_lm_loss
from .params import split_settings
from .hub import DEFAULT_SHARD_BYTES, load_into, save_state_dict
from .linear import Linear
from .loading import LoadOptions, resolve_checkpoint
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
        self.gradient_checkpointing = False  # set by `PreTrainedModel.gradient_checkpointing_enable`

    def __call__(self, *args, **kwargs):
        """With gradient checkpointing on (training, gradients enabled), the block keeps no
        activations and runs again in backward; every path (tower, denoiser, the vectorised
        diffusion loss) calls its blocks through here."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(functools.partial(super().__call__, **kwargs), *args)
        return super().__call__(*args, **kwargs)

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

    compiled_methods = ("run_layers",)  # what `compiled.compile_for_decoding` compiles

    def __init__(self, config: NemotronHConfig):
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, kind) for kind in config.layer_kinds)
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def new_cache(self) -> HybridCache:
        return HybridCache.empty(len(self.layers))

    def forward(self, input_ids: torch.Tensor | None, cache: HybridCache | None = None,
                attention_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                hidden_states: list | None = None, tentative: bool = False) -> torch.Tensor:
        """Causal forward of `input_ids` [b, l] or of their embeddings `inputs_embeds` [b, l, d].
        `attention_mask` [b, l] marks the real tokens (0 = left padding). With a `cache`, the input
        continues the cached sequence and the cache is updated in place; inputs longer than
        `config.prefill_chunk_size` are run chunk by chunk. A list given as `hidden_states`
        receives each layer's input and the normed output (transformers' `output_hidden_states`).

        `tentative=True` (with a cache) runs the input as one chunk whose every prefix may be
        kept: attention keeps all its K/V and the Mamba layers a `MambaChunk` in place of their
        state, until `cache.keep_prefixes(lengths)` keeps the first lengths[r] positions of row r.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embeddings(input_ids)
        chunk = self.config.prefill_chunk_size
        if tentative and cache is None:
            raise ValueError("a tentative forward continues a cache; pass one")
        if cache is None or inputs_embeds.shape[1] <= chunk or tentative:
            return self._forward(inputs_embeds, cache, attention_mask, hidden_states, tentative)
        if hidden_states is not None:
            raise ValueError("output_hidden_states is not available for a cached prefill longer than "
                             f"prefill_chunk_size ({chunk})")
        outs = [
            self._forward(inputs_embeds[:, i:i + chunk], cache,
                          None if attention_mask is None else attention_mask[:, i:i + chunk], None)
            for i in range(0, inputs_embeds.shape[1], chunk)
        ]
        return torch.cat(outs, dim=1)

    def _forward(self, h, cache, attention_mask, hidden_states, tentative=False):
        b, l = h.shape[:2]
        if l == 0:
            raise ValueError("empty input: input_ids has no positions")
        if cache is not None and cache.tentative:
            raise ValueError("the cache holds a tentative chunk; keep_prefixes() must settle it first")
        past = cache.length if cache is not None else 0
        new_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        past_mask = cache.pad_mask if cache is not None else None
        key_mask = None  # [b, past + l], True at real tokens; None while nothing is padded
        if new_mask is not None or past_mask is not None:
            ones = lambda n: torch.ones(b, n, dtype=torch.bool, device=h.device)  # noqa: E731
            key_mask = torch.cat([ones(past) if past_mask is None else past_mask,
                                  ones(l) if new_mask is None else new_mask], dim=1)
        # a fresh unpadded prefill needs no mask tensor: attention runs it as CAUSAL
        mask = CAUSAL if key_mask is None and past == 0 else causal_mask(key_mask, past, l, h.device)
        pad_mask = None if key_mask is None else key_mask[:, past:]
        states = cache.states if cache is not None else [None] * len(self.layers)
        # a cached continuation (a decoding step, a committed block) is a hot path, compiled once
        # `compiled.compile_for_decoding` switched it on; a prefill and anything with gradients run eagerly
        fast = compiled_version(self, "run_layers") if past > 0 and hidden_states is None else None
        if fast is not None:
            states, mask = plain_inputs(states, [layer.kind for layer in self.layers], mask)
            h, states = fast(self, plain(h), states, mask, plain(pad_mask), tentative)
        else:
            h, states = self.run_layers(h, states, mask, pad_mask, tentative, hidden_states)
        if cache is not None:
            cache.states = states
            cache.length += l
            cache.pad_mask = key_mask
            cache.tentative = l if tentative else 0
        return h

    def run_layers(self, h, states: list, mask, pad_mask, tentative: bool = False, hidden_states: list | None = None):
        """The blocks and norm_f over h [b, l, d], each block continuing its entry of `states`:
        -> (hidden states [b, l, d], the blocks' new states). Masks as `Block.forward` takes them.
        A pure function of its inputs (the caches are the caller's), so it compiles as one graph."""
        new_states = []
        for layer, state in zip(self.layers, states):
            if hidden_states is not None:
                hidden_states.append(h)
            h, state = layer(h, state, mask=mask, pad_mask=pad_mask, tentative=tentative)
            new_states.append(state)
        h = self.norm_f(h)
        if hidden_states is not None:
            hidden_states.append(h)
        return h, new_states


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.shape[-1] == 0:
        raise ValueError("empty input: input_ids has no positions")
    low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one reduction, one read back
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got [{low}, {high}]")


@dataclass
class LMInputs:
    """The arguments of a transformers causal-LM forward that this model honours."""

    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    past_key_values: HybridCache | None = None
    inputs_embeds: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    use_cache: bool | None = None
    output_hidden_states: bool | None = None
    logits_to_keep: int = 0


# forward arguments transformers' Trainer, PEFT and pipelines pass that need nothing here: positions
# (the model has no positional encoding)
_IGNORED_FORWARD_ARGUMENTS = {"position_ids", "cache_position"}


def causal_lm_forward(tower: NemotronHModel, head: nn.Module, inputs: LMInputs,
                      num_items_in_batch=None, output_attentions: bool | None = None,
                      **unused) -> CausalLMOutputWithPast:
    """`tower` then `head` over `inputs`, as transformers' `*ForCausalLM.forward`. The loss divides
    the summed cross-entropy by `num_items_in_batch` when the Trainer passes it (gradient
    accumulation), else by the number of targets. Attention weights are never materialised
    (scaled-dot-product attention), so `output_attentions=True` is refused, as are unknown
    arguments."""
    if output_attentions:
        raise ValueError("output_attentions=True is not supported: attention runs as scaled-dot-product "
                         "attention and never forms its weights")
    token_types = unused.pop("token_type_ids", None)  # a tokenizer's default output: one segment is fine
    if token_types is not None and bool(token_types.any()):
        raise ValueError("token_type_ids other than 0 are not supported: the model has no segment embeddings")
    unknown = sorted(set(unused) - _IGNORED_FORWARD_ARGUMENTS)
    if unknown:
        raise TypeError(f"forward() got unsupported arguments {unknown}")
    cache = inputs.past_key_values
    if cache is None and inputs.use_cache:
        cache = tower.new_cache()
    if cache is not None and not isinstance(cache, HybridCache):
        raise TypeError(f"past_key_values must be a twotower HybridCache (from model.new_cache() or an "
                        f"earlier output), got {type(cache).__name__}")
    hidden_states = [] if inputs.output_hidden_states else None
    device = head.weight.device
    ids = None if inputs.input_ids is None else inputs.input_ids.to(device)
    mask = None if inputs.attention_mask is None else inputs.attention_mask.to(device)
    h = tower(ids, cache, mask, inputs.inputs_embeds, hidden_states)
    if inputs.logits_to_keep:
        h = h[:, -inputs.logits_to_keep:]
    logits = head(h).float()
    loss = None
    if inputs.labels is not None:
        loss = causal_lm_loss(logits, inputs.labels.to(device), num_items_in_batch)
    return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache,
                                  hidden_states=None if hidden_states is None else tuple(hidden_states))


class NemotronHPreTrainedModel(PreTrainedModel):
    config_class = NemotronHConfig
    base_model_prefix = "backbone"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = True

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
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, dtype=None, device=None, config=None,
                        **kwargs):
        """Load a checkpoint (hub or transformers layout, sharded or not) from a folder or a Hub
        repository id (through the Hugging Face cache) without a second copy of the weights in
        memory: the model is built on `meta` and filled from memory-mapped safetensors.

        transformers' arguments are honoured or refused, never dropped (see `loading.LoadOptions`):
        `dtype`/`torch_dtype` (a dtype, its name, or "auto": as stored), `device_map` or `device`
        (one device), `low_cpu_mem_usage`, `use_safetensors`, revision, cache_dir,
        local_files_only, token, force_download, subfolder; quantisation is refused. `config`
        replaces the checkpoint's config.json, as the Auto classes pass it; without it, other
        keyword arguments override config fields.
        """
        if model_args:
            raise TypeError(f"from_pretrained takes no positional model arguments, got {len(model_args)}")
        options = LoadOptions.from_kwargs(kwargs, dtype, device)
        folder = resolve_checkpoint(pretrained_model_name_or_path, options)
        if config is None:
            config = cls.config_class.from_pretrained(folder, **kwargs)
        elif kwargs:
            raise TypeError(f"from_pretrained got config overrides {sorted(kwargs)} together with `config`")
        with torch.device("meta"):
            model = cls(config)
        load_into(model, folder, dtype=options.dtype, device=options.device)
        if model.can_generate() and (folder / GENERATION_CONFIG_NAME).exists():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        return model.eval()

    def save_pretrained(self, folder, max_shard_bytes: int = DEFAULT_SHARD_BYTES, state_dict=None,
                        safe_serialization: bool = True, push_to_hub: bool = False, **_):
        """Write config.json, generation_config.json, the weights in the hub layout (safetensors,
        sharded above `max_shard_bytes`; `state_dict` replaces the model's, as the Trainer passes
        it) and any modules the model needs to load with `trust_remote_code` (`remote_code_files`)."""
        if not safe_serialization:
            raise ValueError("safe_serialization=False: weights are written as safetensors only")
        if push_to_hub:
            raise ValueError("push_to_hub is not supported: save to a folder, then upload it with huggingface_hub")
        files = self.remote_code_files()  # first: a model that cannot be exported leaves no half folder
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config_to_save().save_pretrained(folder)
        if self.can_generate() and self.generation_config is not None:
            self.generation_config.save_pretrained(folder)
        save_state_dict(self.state_dict() if state_dict is None else state_dict, folder, max_shard_bytes)
        for name, source in files.items():
            (folder / name).write_text(source)

    def config_to_save(self):
        return self.config

    # transformers' embedding accessors: the causal LM's tower (`base_model_prefix`) and head
    lm_head_name = "lm_head"

    def get_input_embeddings(self) -> nn.Embedding:
        return getattr(self, self.base_model_prefix).embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        getattr(self, self.base_model_prefix).embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return getattr(self, self.lm_head_name)

    def set_output_embeddings(self, value: nn.Linear) -> None:
        setattr(self, self.lm_head_name, value)

    def remote_code_files(self) -> dict[str, str]:
        """{file name: source} of modules that `save_pretrained` writes beside the weights."""
        return {}

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


class NemotronHForCausalLM(NemotronHPreTrainedModel, GenerationMixin):
    """Single-tower NemotronH LM: `backbone` (the tower) and an untied `lm_head`."""

    def __init__(self, config: NemotronHConfig):
        super().__init__(config)
        self.backbone = NemotronHModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def new_cache(self) -> HybridCache:
        return self.backbone.new_cache()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: HybridCache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast | tuple:
        """transformers' causal-LM forward: float32 `logits` [b, l, vocab] (the last
        `logits_to_keep` positions if > 0), `loss` when `labels` are given (next-token
        cross-entropy, labels shifted inside, -100 ignored), `past_key_values` (a `HybridCache`,
        continued in place) when one is passed or `use_cache=True`, and `hidden_states` with
        `output_hidden_states`. See `causal_lm_forward` for the arguments refused."""
        out = causal_lm_forward(self.backbone, self.lm_head, LMInputs(
            input_ids, attention_mask, past_key_values, inputs_embeds, labels, use_cache, output_hidden_states,
            logits_to_keep), **kwargs)
        return out if return_dict is not False else out.to_tuple()

    def generate_ar(self, input_ids, **kwargs):
        """Cached AR generation; see `twotower.generation.generate_ar`."""
        return generate_ar(self, input_ids, **kwargs)

    def generate(self, input_ids: torch.Tensor | None = None, generation_config=None, streamer=None, **kwargs):
        """The transformers entry point (`model.generate`, `pipeline("text-generation")`), with the
        two-tower model's contract in its AR mode: see `params.generation_settings` for the settings
        honoured and refused; `attention_mask`, `generator` and the settings objects' fields pass
        through to `generate_ar`."""
        mode = kwargs.pop("mode", None)
        if mode not in (None, "ar"):
            raise ValueError(f"a single-tower model generates in mode 'ar' only, got {mode!r}")

        def run(config, ids, max_new_tokens, attention_mask, settings: dict):
            sampling, _, options = split_settings("generate", settings, takes=("sampling", "options"))
            return self.generate_ar(ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                                    sampling=sampling, options=options)

        return transformers_generate(self, input_ids, generation_config, streamer, kwargs, run)
