"""The Hugging Face ecosystem: the release's folder as it is, the trust_remote_code export loaded in
a Python where twotower cannot be imported, the Auto classes, generate() and pipeline, and clear
errors for broken two-tower folders. Every folder here is real files on disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import twotower
from conftest import make_tiny_model_dir
from twotower import TwoTowerForCausalLM, nemotron_3_nano_30b_config
from twotower.export import ARCHITECTURE, AUTO_MAP, export_state_dict, save_for_hub
from twotower.hub import INDEX_NAME, CheckpointError, save_state_dict
from twotower.tokenizer import load_tokenizer
from twotower.two_tower import TwoTowerConfig

SRC = Path(twotower.__file__).resolve().parents[1]

# Run by this process on the package's model and by a fresh one on the remote-code model.
RESULTS = '''
def results(model, tokenizer):
    """Weights, logits of both towers, and generated tokens of every entry point."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    out = {f"weight.{k}": v.contiguous() for k, v in model.state_dict().items()}
    out["ar_logits"] = model.context_model()(ids).logits
    x = torch.tensor([[3, 40, 3, 3]])
    out["denoiser_logits"] = model.denoise_block(x, torch.tensor([0.75]), model.encode_context(ids))
    out["diffusion"] = model.generate_mask_diffusion(ids, max_new_tokens=8, block_size=4)
    out["mock-ar"] = model.generate_mock_ar(ids, max_new_tokens=8)
    out["ar"] = model.generate_ar(ids, max_new_tokens=8)
    out["sampled"] = model.generate_mask_diffusion(ids, max_new_tokens=8, block_size=4, temperature=1.0,
                                                   generator=torch.Generator().manual_seed(0))
    model.generation_config.block_size = 4
    for mode in ("diffusion", "mock-ar", "ar"):
        model.generation_config.mode = mode
        out[f"generate.{mode}"] = model.generate(ids, max_new_tokens=8)
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = pipe("Once upon a time", max_new_tokens=8, do_sample=False, mode="ar")[0]["generated_text"]
    prompt = tokenizer("Once upon a time", return_tensors="pt").input_ids
    out["pipeline_prompt"] = prompt
    out["pipeline_tokens"] = model.generate_ar(prompt, max_new_tokens=8)
    model.place_towers_on_devices("cpu", "cpu")
    out["placed"] = model.generate_mask_diffusion(ids, max_new_tokens=8, block_size=4)
    return out, text
'''

REMOTE = '''
import json, os, shutil, sys
# no source tree of twotower (this one, or another checkout an editable install points at)
sys.path[:] = [p for p in sys.path if os.path.realpath(p) != {src!r}
               and not (os.path.isfile(os.path.join(p, "twotower", "__init__.py")) and "-packages" not in p)]
try:
    import twotower
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("twotower is importable from " + twotower.__file__)
import torch, transformers
from safetensors.torch import save_file
{results}
hub, out_dir = sys.argv[1], sys.argv[2]
model = transformers.AutoModelForCausalLM.from_pretrained(hub, trust_remote_code=True)
tokenizer = transformers.AutoTokenizer.from_pretrained(hub)
tensors, text = results(model, tokenizer)
save_file(tensors, os.path.join(out_dir, "results.safetensors"))
half = transformers.AutoModelForCausalLM.from_pretrained(hub, trust_remote_code=True, dtype=torch.bfloat16)
dtypes = sorted({{str(t.dtype) for k, t in half.state_dict().items() if k.endswith(("A_log", "gate.weight"))}}) + \
    sorted({{str(t.dtype) for k, t in half.state_dict().items() if k.endswith("embeddings.weight")}})

broken = os.path.join(out_dir, "broken")
shutil.copytree(hub, broken)
victim = os.path.join(broken, "model-00002-of-{shards:05d}.safetensors")
os.truncate(victim, os.path.getsize(victim) // 2)
try:
    transformers.AutoModelForCausalLM.from_pretrained(broken, trust_remote_code=True)
    error = None
except Exception as e:
    error = type(e).__name__ + ": " + str(e)
info = dict(text=text, error=error, module=type(model).__module__, cls=type(model).__name__,
            twotower_loaded="twotower" in sys.modules, bfloat16_dtypes=dtypes)
with open(os.path.join(out_dir, "info.json"), "w") as f:
    json.dump(info, f)
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder written by the package, its model, its tokenizer, the same model exported for the Hub)."""
    root = tmp_path_factory.mktemp("export")
    folder = make_tiny_model_dir(root / "model")
    model = TwoTowerForCausalLM.from_pretrained(folder)
    tokenizer = load_tokenizer(folder)
    hub = save_for_hub(model, root / "hub", tokenizer=tokenizer, max_shard_bytes=100_000)
    return folder, model, tokenizer, hub


def shard_names(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))


def assert_same_results(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("logits"):
            assert (a[k] - b[k]).abs().max() <= 1e-5, k
        else:
            assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- the release's folder as it is

def test_release_layout_loads_as_it_is(tmp_path, tiny):
    """config.json as NVIDIA's (model_type nemotron_h, hybrid_override_pattern, no two-tower
    fields), sharded per-expert safetensors with an index, tokenizer files."""
    _, model, tokenizer, _ = tiny
    config = {
        "architectures": ["NemotronHTwoTowerForCausalLM"], "model_type": "nemotron_h",
        "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig",
                     "AutoModelForCausalLM": "modeling_nemotron_twotower.NemotronHTwoTowerForCausalLM"},
        "vocab_size": len(tokenizer), "hidden_size": 32, "hybrid_override_pattern": "M*EM",
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "attention_bias": False, "attention_dropout": 0.0, "max_position_embeddings": 4096,
        "rope_theta": 10000, "partial_rotary_factor": 1.0, "mamba_num_heads": 4, "mamba_head_dim": 8,
        "ssm_state_size": 16, "n_groups": 2, "conv_kernel": 4, "chunk_size": 8, "expand": 2,
        "mamba_hidden_act": "silu", "mamba_proj_bias": False, "use_bias": False, "use_conv_bias": True,
        "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 1e-4, "mamba_ssm_cache_dtype": "float32",
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 16,
        "moe_shared_expert_intermediate_size": 24, "intermediate_size": 20, "n_group": 1, "topk_group": 1,
        "norm_topk_prob": True, "routed_scaling_factor": 2.5, "mlp_hidden_act": "relu2", "mlp_bias": False,
        "layer_norm_epsilon": 1e-5, "residual_in_fp32": False, "rescale_prenorm_residual": True,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "num_logits_to_keep": 1, "torch_dtype": "float32", "use_mamba_kernels": True,
        "transformers_version": "4.55.4",
    }
    (tmp_path / "config.json").write_text(json.dumps(config, indent=2))
    save_state_dict(model.state_dict(), tmp_path, max_shard_bytes=60_000)
    tokenizer.save_pretrained(tmp_path)
    weight_map = json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"]
    assert len(shard_names(tmp_path)) > 3 and set(weight_map.values()) == set(shard_names(tmp_path))
    assert "context_tower.layers.2.mixer.experts.7.up_proj.weight" in weight_map

    loaded = TwoTowerForCausalLM.from_pretrained(tmp_path)
    c = loaded.config
    assert (c.mask_token_id, c.block_size, c.steps_per_block, c.confidence_threshold) == (3, 16, 16, 0.8)
    assert c.layer_kinds == "M*EM" and c.architectures == ["NemotronHTwoTowerForCausalLM"]
    original = model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in loaded.state_dict().items())
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(loaded.generate_mask_diffusion(ids, max_new_tokens=16),
                       model.generate_mask_diffusion(ids, max_new_tokens=16))


def test_export_of_the_nano_preset_has_the_release_layout():
    """The keys and shapes save_for_hub would write for Nemotron-3-Nano, computed on `meta`,
    equal reference-spec sections 1.2 and 2.3 written out independently here."""
    config = TwoTowerConfig(**nemotron_3_nano_30b_config().to_dict())
    with torch.device("meta"):
        model = TwoTowerForCausalLM(config)
    written = export_state_dict(model, torch.bfloat16)

    H, V, I, E = 2688, 131072, 1856, 128
    mixer = {
        "M": {"in_proj.weight": (10304, H), "conv1d.weight": (6144, 1, 4), "conv1d.bias": (6144,),
              "A_log": (64,), "D": (64,), "dt_bias": (64,), "norm.weight": (4096,), "out_proj.weight": (H, 4096)},
        "*": {"q_proj.weight": (4096, H), "k_proj.weight": (256, H), "v_proj.weight": (256, H),
              "o_proj.weight": (H, 4096)},
        "E": {"gate.weight": (E, H), "gate.e_score_correction_bias": (E,),
              "shared_experts.up_proj.weight": (3712, H), "shared_experts.down_proj.weight": (H, 3712),
              **{f"experts.{e}.up_proj.weight": (I, H) for e in range(E)},
              **{f"experts.{e}.down_proj.weight": (H, I) for e in range(E)}},
    }
    pattern = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    expected = {"context_lm_head.weight": (V, H), "lm_head.weight": (V, H),
                "t_embedder.mlp.0.weight": (H, 256), "t_embedder.mlp.0.bias": (H,),
                "t_embedder.mlp.2.weight": (H, H), "t_embedder.mlp.2.bias": (H,),
                "t_block.1.weight": (3 * H, H), "t_block.1.bias": (3 * H,),
                **{f"scale_shift_tables.{i}": (3, H) for i in range(52)}}
    for tower in ("context_tower", "denoiser_tower"):
        expected[f"{tower}.embeddings.weight"] = (V, H)
        expected[f"{tower}.norm_f.weight"] = (H,)
        for i, kind in enumerate(pattern):
            expected[f"{tower}.layers.{i}.norm.weight"] = (H,)
            expected.update({f"{tower}.layers.{i}.mixer.{k}": s for k, s in mixer[kind].items()})
    assert {k: tuple(t.shape) for k, t in written.items()} == expected

    kept = [k for k, t in written.items() if t.dtype == torch.float32]
    assert len(kept) == 2 * (23 + 2 * 23)  # A_log of 23 Mamba layers, router weight and bias of 23 MoE layers
    assert all(k.endswith(("A_log", "gate.weight", "e_score_correction_bias")) for k in kept)
    total = sum(t.numel() * t.element_size() for t in written.values())
    assert abs(total / (2 * 63.16e9) - 1) < 0.01


# ---------------------------------------------------------------- trust_remote_code without twotower

def test_export_loads_and_runs_where_twotower_is_not_importable(tmp_path, tiny):
    folder, _, tokenizer, hub = tiny
    config = json.loads((hub / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["architectures"] == [ARCHITECTURE]
    assert config["model_type"] == "nemotron_h"
    shards = shard_names(hub)
    assert len(shards) > 2 and (hub / INDEX_NAME).exists()
    modeling = (hub / "modeling_nemotron_twotower.py").read_text()
    assert "twotower" not in [line.split()[1].split(".")[0] for line in modeling.splitlines()
                              if line.startswith(("import ", "from "))]

    script = REMOTE.format(src=str(SRC), results=RESULTS, shards=len(shards))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-I", "-c", script, str(hub), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["module"].startswith("transformers_modules.") and info["cls"] == "TwoTowerForCausalLM"
    assert not info["twotower_loaded"]
    assert info["bfloat16_dtypes"] == ["torch.float32", "torch.bfloat16"]  # router and A_log stay float32
    assert info["error"].startswith("CheckpointError") and f"model-00002-of-{len(shards):05d}" in info["error"]

    namespace = {"torch": torch, "transformers": transformers}
    exec(RESULTS, namespace)
    ours, text = namespace["results"](TwoTowerForCausalLM.from_pretrained(folder), tokenizer)
    remote = load_file(str(tmp_path / "results.safetensors"))
    assert_same_results(remote, ours)
    assert info["text"] == text
    # generate() dispatches to the mode's function, and the pipeline is the AR mode
    for mode in ("diffusion", "mock-ar", "ar"):
        assert torch.equal(ours[f"generate.{mode}"], ours[mode])
    n = ours["pipeline_prompt"].shape[1]
    assert text == "Once upon a time" + tokenizer.decode(ours["pipeline_tokens"][0, n:], skip_special_tokens=True)


# ---------------------------------------------------------------- Auto classes and generate()

def test_auto_classes_give_ours_for_our_config_and_transformers_for_theirs(tiny):
    folder, model, _, hub = tiny
    config = TwoTowerConfig.from_pretrained(hub)
    assert type(transformers.AutoModelForCausalLM.from_config(config)) is TwoTowerForCausalLM
    loaded = transformers.AutoModelForCausalLM.from_pretrained(hub, config=config)
    assert type(loaded) is TwoTowerForCausalLM
    original = model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in loaded.state_dict().items())
    # transformers keeps its own nemotron_h registration
    theirs = transformers.AutoConfig.from_pretrained(folder)
    assert type(theirs) is transformers.NemotronHConfig
    assert transformers.AutoModelForCausalLM._model_mapping[type(theirs)] is transformers.NemotronHForCausalLM


def test_generate_takes_the_common_arguments(tiny):
    _, model, _, _ = tiny
    ids = torch.tensor([[5, 6, 7, 8]])

    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value)

        def end(self):
            self.ended = True

    s = Collect()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, streamer=s)
    assert torch.equal(out, model.generate_ar(ids, max_new_tokens=6))
    assert s.ended and torch.equal(torch.cat(s.puts[1:]).flatten(), out[0, 4:])
    sampled = dict(do_sample=True, temperature=0.7, top_k=5, top_p=0.9)
    assert torch.equal(model.generate(ids, max_new_tokens=6, generator=torch.Generator().manual_seed(1), **sampled),
                       model.generate_ar(ids, max_new_tokens=6, temperature=0.7, top_k=5, top_p=0.9,
                                         generator=torch.Generator().manual_seed(1)))
    config = transformers.GenerationConfig(max_length=9, mode="mock_ar")
    assert torch.equal(model.generate(ids, generation_config=config), model.generate_mock_ar(ids, max_new_tokens=5))
    # pad_token_id fills the positions after a row's EOS
    pair = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    free = model.generate_ar(pair, max_new_tokens=4)
    eos = int(free[0, 4])
    assert eos not in free[1, 4:].tolist()
    out = model.generate(pair, max_new_tokens=4, eos_token_id=eos, pad_token_id=7)
    assert out[0, 4:].tolist() == [eos, 7, 7, 7] and torch.equal(out[1], free[1])
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(ids, num_beams=2)
    with pytest.raises(ValueError, match="mode"):
        model.generate(ids, mode="beam")
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(ids, eos_token_id=[2, 11])


# ---------------------------------------------------------------- broken two-tower folders

def corrupt(folder: Path, how: str) -> str:
    """Break a sharded two-tower folder; returns what the error must name."""
    index = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    shards = shard_names(folder)
    if how == "truncated":
        os.truncate(folder / shards[1], (folder / shards[1]).stat().st_size // 2)
        return f"{folder / shards[1]}: cannot read safetensors file"
    if how == "header":
        with open(folder / shards[2], "r+b") as f:
            f.write(b"\xff" * 16)
        return f"{folder / shards[2]}: cannot read safetensors file"
    if how == "missing shard":
        os.remove(folder / shards[-1])
        return f"{INDEX_NAME} names {shards[-1]}"
    key = "denoiser_tower.layers.1.mixer.k_proj.weight"
    tensors = load_file(str(folder / index[key]))
    if how == "wrong shape":
        tensors[key] = torch.zeros(3, 3)
        save_file(tensors, str(folder / index[key]))
        return f"{index[key]}: key '{key}' has shape (3, 3), the model expects (16, 32)"
    del tensors[key]  # "missing key"
    save_file(tensors, str(folder / index[key]))
    return f"missing keys ['{key}']"


@pytest.mark.parametrize("how", ["truncated", "header", "missing shard", "wrong shape", "missing key"])
def test_broken_two_tower_folder_is_a_clear_error(tmp_path, tiny, how):
    folder = shutil.copytree(tiny[3], tmp_path / "hub")
    expected = corrupt(folder, how)
    with pytest.raises(CheckpointError) as e:
        TwoTowerForCausalLM.from_pretrained(folder)
    assert expected in str(e.value)


def test_loading_never_falls_back_to_pickle(tmp_path, tiny, monkeypatch):
    TwoTowerConfig.from_pretrained(tiny[3]).save_pretrained(tmp_path)
    torch.save(tiny[1].state_dict(), tmp_path / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        TwoTowerForCausalLM.from_pretrained(tmp_path)


def test_export_refuses_a_folder_holding_a_checkpoint(tiny):
    _, model, _, hub = tiny
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        save_for_hub(model, hub)
