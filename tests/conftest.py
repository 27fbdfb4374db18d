"""Shared helpers: small random NemotronH configurations and deterministic random weights."""

from __future__ import annotations

import pytest
import torch

from twotower.config import NemotronHConfig


def tiny_config(pattern: str = "M*EM-E*M", **overrides) -> NemotronHConfig:
    """A configuration small enough for CPU tests that keeps every structural feature:
    GQA (4 query heads on 2 kv heads), several Mamba groups, top-k routing with a shared expert."""
    values = dict(
        vocab_size=97, hidden_size=32, hybrid_override_pattern=pattern,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=8,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=24, intermediate_size=20, routed_scaling_factor=2.5,
        eos_token_id=2, pad_token_id=0, bos_token_id=1,
        # transformers' torch prefill clamps dt at time_step_min while its decode step and the CUDA
        # kernels of the checkpoints (time_step_limit (0, inf)) do not; a tiny floor keeps the parity
        # tests about the shared math. test_dt_limit_is_the_configs covers the clamp itself.
        time_step_min=1e-6,
    )
    values.update(overrides)
    return NemotronHConfig(**values)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, head_std: float = 1.0) -> torch.nn.Module:
    """Give every parameter and buffer a random value (norm weights near 1, A_log and dt_bias in
    their trained ranges), so no part of the computation is a silent identity. `head_std` widens
    the output heads so greedy decisions are not near-ties."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point():
            continue
        r = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if name.endswith("A_log"):  # A in [-4.5, -1], as log(1..heads) gives in real models
            value = torch.rand(t.shape, generator=g) * 1.5
        elif name.endswith("dt_bias"):  # softplus(dt_bias) in about [0.007, 0.2], the trained range
            value = torch.rand(t.shape, generator=g) * 3.5 - 5.0
        elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            value = 1.0 + 0.1 * r
        elif name.endswith("e_score_correction_bias"):
            value = 0.05 * r
        elif "lm_head" in name:
            value = r * head_std / t.shape[-1] ** 0.5
        elif name.endswith(("out_proj.weight", "o_proj.weight", "down_proj.weight")):
            value = 0.3 * r / t.shape[-1] ** 0.5  # residual branches scaled down, as in a trained model
        elif t.dim() >= 2:
            value = r / t.shape[-1] ** 0.5
        else:
            value = 0.1 * r
        t.copy_(value.to(t.dtype))
    return model


CORPUS = __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


def make_tiny_model_dir(folder, vocab_size: int = 384, seed: int = 0, pattern: str = "M*EM"):
    """A complete model folder (random TwoTower weights + a byte-level BPE tokenizer trained on a
    slice of the corpus), the same layout as the embedded model. Returns the folder."""
    from pathlib import Path

    from twotower import TwoTowerForCausalLM
    from twotower.tokenizer import train_tokenizer
    from twotower.two_tower import TwoTowerConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sample = folder / "sample.txt"
    sample.write_text((CORPUS / "tinystories_val_head.txt").read_text()[:60_000])
    tokenizer = train_tokenizer([sample], folder, vocab_size=vocab_size)
    sample.unlink()
    torch.manual_seed(seed)
    config = TwoTowerConfig(**tiny_config(pattern, vocab_size=len(tokenizer)).to_dict())
    model = randomize(TwoTowerForCausalLM(config).eval(), seed=seed, head_std=4.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two shared cores: one intra-op thread for a module's servers, so spinning threads do not fight."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def embedded():
    """(model, tokenizer) of the model that ships inside the package."""
    from twotower.default import load_model

    return load_model(None)
