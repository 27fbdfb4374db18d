"""Configuration of the NemotronH backbone and of the two-tower model.

`NemotronHConfig` is transformers' own `nemotron_h` configuration (same field names, same
`config.json`), extended with the few fields this implementation adds:

* `router_dtype`: precision of the MoE router logits and sigmoid. transformers computes them in
  float32; the TwoTower release and Megatron compute them in float64.
* `prefill_chunk_size`: prompts longer than this are prefilled chunk by chunk (the cache carries
  across chunks), so activation memory stays bounded for long contexts.
"""

from __future__ import annotations

import sys

import torch
import transformers

DEFAULT_TIME_STEP_LIMIT = (0.0, float("inf"))  # no clamp: the kernels' behaviour
LAYER_KINDS = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}
# each pattern letter's block type as the release's configuration_nemotron_h.py names it
BLOCK_TYPES = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
ROUTER_DTYPES = {"float32": torch.float32, "float64": torch.float64}  # router_dtype -> the router's dtype


class NemotronHConfig(transformers.NemotronHConfig):
    """transformers' `NemotronHConfig` plus `router_dtype` and `prefill_chunk_size`.

    Layer kinds come from `hybrid_override_pattern` (M = Mamba-2, * = attention, E = MoE,
    - = dense MLP) or `layers_block_type`; `layer_kinds` gives the pattern letters per layer.
    """

    model_type = "nemotron_h"
    router_dtype: str = "float32"
    prefill_chunk_size: int = 2048

    def __post_init__(self, **kwargs):
        pattern = kwargs.get("hybrid_override_pattern")
        if pattern is not None:
            unknown = sorted(set(pattern) - set(LAYER_KINDS))
            if unknown:
                raise ValueError(
                    f"hybrid_override_pattern {pattern!r} has unknown letters {unknown}; "
                    f"use M (Mamba-2), * (attention), E (MoE) or - (dense MLP)"
                )
            if not pattern:
                raise ValueError("hybrid_override_pattern is empty")
        super().__post_init__(**kwargs)
        self.time_step_limit = tuple(float("inf") if float(x) >= sys.float_info.max else float(x)
                                     for x in self.time_step_limit)
        self.check()

    def to_dict(self) -> dict:
        """transformers' fields, written as the release's config.json has them: the layer pattern as
        `hybrid_override_pattern` and `num_hidden_layers` (the release's config class derives
        `layers_block_type` from them, read-only), and `time_step_limit` as valid JSON: omitted at
        its default (0, inf), an infinite bound written as the largest float."""
        d = super().to_dict()
        d.pop("layers_block_type", None)
        d.pop("mtp_layers_block_type", None)
        d["hybrid_override_pattern"] = self.hybrid_override_pattern
        d["num_hidden_layers"] = len(self.hybrid_override_pattern)
        d["mtp_hybrid_override_pattern"] = self.mtp_hybrid_override_pattern
        limit = tuple(float(x) for x in d.pop("time_step_limit", DEFAULT_TIME_STEP_LIMIT))
        if limit != DEFAULT_TIME_STEP_LIMIT:
            d["time_step_limit"] = [min(x, sys.float_info.max) for x in limit]
        return d

    def to_diff_dict(self) -> dict:
        """The fields that differ from the defaults, and always the layer pattern (a reader that
        falls back to its own default pattern would build another model)."""
        d = super().to_diff_dict()
        d["hybrid_override_pattern"] = self.hybrid_override_pattern
        d["num_hidden_layers"] = len(self.hybrid_override_pattern)
        return d

    @property
    def layer_kinds(self) -> str:
        """One letter per layer: M, *, E or -."""
        return self.hybrid_override_pattern

    @property
    def mamba_intermediate_size(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_intermediate_size + 2 * self.n_groups * self.ssm_state_size

    def check(self) -> None:
        """Raise a ValueError naming the first inconsistent field."""
        kinds = set(self.layer_kinds)
        if "M" in kinds:
            if self.mamba_num_heads % self.n_groups:
                raise ValueError(
                    f"mamba_num_heads ({self.mamba_num_heads}) must be a multiple of n_groups ({self.n_groups})"
                )
            if self.chunk_size < 1 or self.conv_kernel < 1:
                raise ValueError("chunk_size and conv_kernel must be >= 1")
        if "*" in kinds and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if "E" in kinds:
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..n_routed_experts "
                    f"({self.n_routed_experts})"
                )
            if self.n_routed_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
                raise ValueError(
                    f"n_group ({self.n_group}) must divide n_routed_experts ({self.n_routed_experts}) "
                    f"and topk_group ({self.topk_group}) must be in 1..n_group"
                )
            if self.moe_latent_size is not None:
                raise ValueError("moe_latent_size (latent expert projections) is not supported")
        if self.mlp_hidden_act != "relu2":
            raise ValueError(f"mlp_hidden_act must be 'relu2', got {self.mlp_hidden_act!r}")
        if self.router_dtype not in ROUTER_DTYPES:
            raise ValueError(f"router_dtype must be one of {tuple(ROUTER_DTYPES)}, got {self.router_dtype!r}")
        if self.prefill_chunk_size < 1:
            raise ValueError("prefill_chunk_size must be >= 1")


NANO_30B_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


def nemotron_3_nano_30b_config(**overrides) -> NemotronHConfig:
    """The NVIDIA-Nemotron-3-Nano-30B-A3B backbone (the fields of its released `config.json`)."""
    values = dict(
        vocab_size=131072,
        hidden_size=2688,
        hybrid_override_pattern=NANO_30B_PATTERN,
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=262144,
        mamba_num_heads=64,
        mamba_head_dim=64,
        ssm_state_size=128,
        n_groups=8,
        conv_kernel=4,
        chunk_size=128,
        expand=2,
        use_conv_bias=True,
        mamba_proj_bias=False,
        use_bias=False,
        time_step_min=0.001,
        time_step_max=0.1,
        time_step_floor=1e-4,
        n_routed_experts=128,
        num_experts_per_tok=6,
        n_shared_experts=1,
        moe_intermediate_size=1856,
        moe_shared_expert_intermediate_size=3712,
        intermediate_size=1856,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        mlp_hidden_act="relu2",
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        router_dtype="float64",
    )
    values.update(overrides)
    return NemotronHConfig(**values)


def kv_cache_bytes_per_token(config: NemotronHConfig, bytes_per_value: int = 2) -> int:
    """K and V bytes one token adds to the cache over all attention layers."""
    n_attn = config.layer_kinds.count("*")
    return n_attn * 2 * config.num_key_value_heads * config.head_dim * bytes_per_value


def mamba_state_bytes(config: NemotronHConfig) -> int:
    """Fixed per-sequence Mamba state: float32 SSM state and conv history of every Mamba layer."""
    n_mamba = config.layer_kinds.count("M")
    ssm = config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size * 4
    conv = config.mamba_conv_dim * (config.conv_kernel - 1) * 4
    return n_mamba * (ssm + conv)


__all__ = [
    "NemotronHConfig",
    "nemotron_3_nano_30b_config",
    "kv_cache_bytes_per_token",
    "mamba_state_bytes",
    "LAYER_KINDS",
    "BLOCK_TYPES",
    "NANO_30B_PATTERN",
]
