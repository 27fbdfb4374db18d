"""`twotower convert`: single-tower checkpoints (ours in the hub layout, transformers' own in both
of its layouts) to two-tower folders and back to an AR model that transformers loads without
remote code. Every folder is real files on disk; the command line is what runs."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from safetensors import safe_open

from conftest import make_tiny_model_dir, randomize, tiny_config
from twotower import NemotronHForCausalLM, TwoTowerForCausalLM
from twotower.cli import main
from twotower.convert import parse_size, to_two_tower
from twotower.hub import INDEX_NAME

IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))


def on_disk(folder) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in `folder`, by key."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def config_of(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tok"))


def test_hub_single_tower_to_two_tower_and_back(tmp_path, tokenizer_dir):
    single_dir, two_dir, back_dir = tmp_path / "single", tmp_path / "two", tmp_path / "back"
    torch.manual_seed(0)
    single = randomize(NemotronHForCausalLM(tiny_config()).eval(), seed=0)
    single.save_pretrained(single_dir, max_shard_bytes=30_000)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (single_dir / name).write_bytes((tokenizer_dir / name).read_bytes())
    original = on_disk(single_dir)
    assert "backbone.layers.2.mixer.experts.7.up_proj.weight" in original

    assert main(["convert", str(single_dir), str(two_dir), "--to", "two-tower", "--block-size", "4",
                 "--max-shard-size", "40KB"]) == 0
    config = config_of(two_dir)
    assert config["architectures"] == ["NemotronHTwoTowerForCausalLM"] and config["model_type"] == "nemotron_h"
    assert config["block_size"] == 4 and config["mask_token_id"] == 3 and "auto_map" in config
    assert (two_dir / INDEX_NAME).exists() and (two_dir / "modeling_nemotron_twotower.py").exists()
    two = TwoTowerForCausalLM.from_pretrained(two_dir)
    for tower in (two.context_tower, two.denoiser_tower):
        assert all(torch.equal(v, original["backbone." + k]) for k, v in tower.state_dict().items())
    assert torch.equal(two.lm_head.weight, original["lm_head.weight"])
    assert torch.equal(two.context_lm_head.weight, original["lm_head.weight"])
    assert torch.equal(two.generate_ar(IDS, max_new_tokens=5), single.generate_ar(IDS, max_new_tokens=5))

    assert main(["convert", str(two_dir), str(back_dir), "--to", "single-tower"]) == 0
    back = on_disk(back_dir)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    config = config_of(back_dir)
    assert config["architectures"] == ["NemotronHForCausalLM"] and config["model_type"] == "nemotron_h"
    assert not {"auto_map", "mask_token_id", "block_size", "confidence_threshold"} & set(config)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (back_dir / name).read_bytes() == (tokenizer_dir / name).read_bytes()

    # transformers' own class loads it, also through the Auto class without remote code
    auto = transformers.AutoModelForCausalLM.from_pretrained(back_dir).eval()
    assert type(auto) is transformers.NemotronHForCausalLM
    with torch.no_grad():
        assert (auto(IDS).logits - single(IDS).logits).abs().max() <= 1e-4
        assert (transformers.NemotronHForCausalLM.from_pretrained(back_dir)(IDS).logits - single(IDS).logits).abs().max() \
            <= 1e-4


@pytest.mark.parametrize("original_format", [False, True])
def test_transformers_saved_backbone_converts_with_the_same_ar_logits(tmp_path, original_format):
    """save_original_format=False writes `model.*` with fused 3-D experts, True the hub layout."""
    ours_only = ("router_dtype", "prefill_chunk_size")
    config = transformers.NemotronHConfig(**{k: v for k, v in tiny_config().to_dict().items() if k not in ours_only})
    torch.manual_seed(1)
    hf = randomize(transformers.NemotronHForCausalLM(config).eval(), seed=1)
    hf.save_pretrained(tmp_path / "hf", save_original_format=original_format)
    assert ("model.layers.2.mixer.experts.up_proj" in on_disk(tmp_path / "hf")) != original_format

    to_two_tower(tmp_path / "hf", tmp_path / "two")
    two = TwoTowerForCausalLM.from_pretrained(tmp_path / "two")
    with torch.no_grad():
        assert (two.context_model()(IDS).logits - hf(IDS).logits).abs().max() <= 1e-4
    context = two.context_tower.state_dict()
    assert all(torch.equal(v, context[k]) for k, v in two.denoiser_tower.state_dict().items())


def test_dtype_keeps_router_and_A_log_in_float32(tmp_path):
    """A bfloat16 source (router and A_log float32, as the release) converts to bfloat16 by default,
    and the float32 tensors arrive unrounded."""
    torch.manual_seed(2)
    randomize(NemotronHForCausalLM(tiny_config()), seed=2).save_pretrained(tmp_path / "fp32")
    NemotronHForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert main(["convert", str(tmp_path / "bf16"), str(tmp_path / "two"), "--to", "two-tower"]) == 0
    kept = ("A_log", "gate.weight", "e_score_correction_bias")
    tensors, original = on_disk(tmp_path / "two"), on_disk(tmp_path / "fp32")
    assert {k for k, t in tensors.items() if t.dtype == torch.float32} == {k for k in tensors if k.endswith(kept)}
    assert all(t.dtype == torch.bfloat16 for k, t in tensors.items() if not k.endswith(kept))
    for k in original:
        if k.startswith("backbone.") and k.endswith(kept):
            assert torch.equal(tensors["denoiser_tower." + k[len("backbone."):]], original[k]), k


def test_command_line_errors(tmp_path, capsys):
    torch.manual_seed(3)
    NemotronHForCausalLM(tiny_config()).save_pretrained(tmp_path / "single")
    assert main(["convert", str(tmp_path / "single"), str(tmp_path / "single"), "--to", "two-tower"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "single"), str(tmp_path / "x"), "--to", "single-tower",
                 "--block-size", "4"]) == 2
    assert "only apply with --to two-tower" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "single"), str(tmp_path / "y"), "--to", "single-tower"]) == 2
    assert "single-tower NemotronH checkpoint, not a two-tower one; --to two-tower" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "z"), "--to", "two-tower"]) == 2
    err = capsys.readouterr().err
    assert "source folder" in err and "does not exist" in err


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500mb") == 500 * 10**6 and parse_size("1234") == 1234
    with pytest.raises(ValueError, match="not a size"):
        parse_size("five")
