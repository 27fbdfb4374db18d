"""Checkpoint folders on disk: our hub-layout save, transformers' own saves, dtypes, clear errors
for broken folders, and the memory a load costs. Every folder here is a real safetensors file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import randomize, tiny_config
from twotower import NemotronHForCausalLM
from twotower.hub import INDEX_NAME, CheckpointError, to_transformers_layout

IDS = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
SHARD = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


def build(seed=0):
    torch.manual_seed(seed)
    return randomize(NemotronHForCausalLM(tiny_config()).eval(), seed=seed)


def keys_on_disk(folder) -> dict[str, tuple[str, tuple]]:
    """key -> (file name, shape) for every tensor of every safetensors file in `folder`."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                for k in f.keys():
                    out[k] = (name, tuple(f.get_slice(k).get_shape()))
    return out


@torch.no_grad()
def logits(model):
    out = model(IDS)
    return out if isinstance(out, torch.Tensor) else out.logits


def assert_same_model(loaded, model):
    """Bit-identical weights; logits equal up to rounding (memory-mapped weights sit at unaligned
    addresses, which can change the order of a kernel's float sums)."""
    original = model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in loaded.state_dict().items())
    assert (logits(loaded) - logits(model)).abs().max() <= 1e-5


# ---------------------------------------------------------------- our save, read by transformers

def test_save_is_the_hub_layout_and_transformers_loads_it(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    on_disk = keys_on_disk(tmp_path)
    assert set(on_disk) == set(model.state_dict())
    assert {f for f, _ in on_disk.values()} == {"model.safetensors"}
    assert all(k.startswith(("backbone.", "lm_head.")) for k in on_disk)
    assert on_disk["backbone.layers.2.mixer.experts.7.up_proj.weight"][1] == (16, 32)
    assert on_disk["backbone.layers.2.mixer.experts.0.down_proj.weight"][1] == (32, 16)

    hf = transformers.NemotronHForCausalLM.from_pretrained(tmp_path).eval()
    expected = to_transformers_layout(model.state_dict())
    assert all(torch.equal(v, expected[k]) for k, v in hf.state_dict().items())
    assert (logits(hf) - logits(model)).abs().max() <= 1e-4
    assert_same_model(NemotronHForCausalLM.from_pretrained(tmp_path), model)


def test_sharded_save_has_an_index_covering_every_key(tmp_path):
    model = build(seed=1)
    model.save_pretrained(tmp_path, max_shard_bytes=20_000)
    shards = sorted(n for n in os.listdir(tmp_path) if n.endswith(".safetensors"))
    assert len(shards) > 2 and "model.safetensors" not in shards
    numbers = [SHARD.match(n).groups() for n in shards]
    assert [int(i) for i, _ in numbers] == list(range(1, len(shards) + 1))
    assert {int(n) for _, n in numbers} == {len(shards)}

    index = json.loads((tmp_path / INDEX_NAME).read_text())
    on_disk = keys_on_disk(tmp_path)
    assert set(index["weight_map"]) == set(model.state_dict()) == set(on_disk)
    assert all(on_disk[k][0] == f for k, f in index["weight_map"].items())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())

    assert_same_model(NemotronHForCausalLM.from_pretrained(tmp_path), model)
    hf = transformers.NemotronHForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(hf) - logits(model)).abs().max() <= 1e-4


# ---------------------------------------------------------------- transformers' save, read by us

@pytest.mark.parametrize("original_format", [True, False])
def test_folder_written_by_transformers_loads(tmp_path, original_format):
    """transformers' save_pretrained writes the hub layout by default (it reverses its own key
    conversion) and its in-library layout, `model.*` with fused 3-D experts, with
    save_original_format=False; both must load."""
    ours_only = ("router_dtype", "prefill_chunk_size")
    config = transformers.NemotronHConfig(
        **{k: v for k, v in tiny_config().to_dict().items() if k not in ours_only})
    torch.manual_seed(2)
    hf = randomize(transformers.NemotronHForCausalLM(config).eval(), seed=2)
    hf.save_pretrained(tmp_path, save_original_format=original_format)

    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert "layers_block_type" in saved_config and "hybrid_override_pattern" not in saved_config
    assert not set(ours_only) & set(saved_config)
    on_disk = keys_on_disk(tmp_path)
    if original_format:
        assert "backbone.layers.2.mixer.experts.7.up_proj.weight" in on_disk
        assert not any(k.startswith("model.") for k in on_disk)
    else:
        assert on_disk["model.layers.2.mixer.experts.up_proj"][1] == (8, 16, 32)
        assert on_disk["model.layers.5.mixer.experts.down_proj"][1] == (8, 32, 16)
        assert not any(k.startswith("backbone.") or ".experts.0." in k for k in on_disk)

    ours = NemotronHForCausalLM.from_pretrained(tmp_path)
    assert ours.config.layer_kinds == "M*EM-E*M"
    converted = to_transformers_layout(ours.state_dict())
    assert all(torch.equal(v, converted[k]) for k, v in hf.state_dict().items())
    assert (logits(ours) - logits(hf)).abs().max() <= 1e-4


# ---------------------------------------------------------------- dtype

def test_bfloat16_load_keeps_router_and_A_log_in_float32(tmp_path):
    model = build(seed=3)
    model.save_pretrained(tmp_path)
    loaded = NemotronHForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    kept = re.compile(r"(\.gate\.weight|\.gate\.e_score_correction_bias|\.A_log)$")
    original = model.state_dict()
    n_kept = 0
    for k, v in loaded.state_dict().items():
        if kept.search(k):
            n_kept += 1
            assert v.dtype == torch.float32 and torch.equal(v, original[k]), k
        else:
            assert v.dtype == torch.bfloat16 and torch.equal(v, original[k].bfloat16()), k
    assert n_kept == 3 + 2 * 2  # A_log of the 3 Mamba layers, gate weight and bias of the 2 MoE layers
    assert torch.isfinite(logits(loaded)).all()


# ---------------------------------------------------------------- broken folders

def write_folder(folder, tensors):
    tiny_config().save_pretrained(folder)
    save_file(tensors, str(folder / "model.safetensors"))


def sharded(folder):
    build(seed=4).save_pretrained(folder, max_shard_bytes=20_000)
    return sorted(n for n in os.listdir(folder) if SHARD.match(n))


def _drop(sd, key):
    del sd[key]


def _extra(sd, key):
    sd[key] = torch.zeros(3)


def _misshape(sd, key):
    sd[key] = torch.zeros(32, 32)


@pytest.mark.parametrize("edit,key,message", [
    (_drop, "backbone.layers.3.mixer.dt_bias", "{folder}: missing keys [{key!r}]"),
    (_extra, "backbone.layers.0.mixer.extra.weight", "model.safetensors: unexpected key {key!r}"),
    (_misshape, "backbone.layers.1.mixer.k_proj.weight",
     "model.safetensors: key {key!r} has shape (32, 32), the model expects (16, 32)"),
])
def test_a_key_that_does_not_fit_is_named(tmp_path, edit, key, message):
    sd = dict(build().state_dict())
    edit(sd, key)
    write_folder(tmp_path, sd)
    with pytest.raises(CheckpointError, match=re.escape(message.format(folder=tmp_path, key=key))):
        NemotronHForCausalLM.from_pretrained(tmp_path)


def test_truncated_shard_is_named(tmp_path):
    victim = tmp_path / sharded(tmp_path)[1]
    os.truncate(victim, victim.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=re.escape(f"{victim}: cannot read safetensors file")):
        NemotronHForCausalLM.from_pretrained(tmp_path)


def test_corrupted_header_is_named(tmp_path):
    victim = tmp_path / sharded(tmp_path)[2]
    with open(victim, "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(CheckpointError, match=re.escape(f"{victim}: cannot read safetensors file")):
        NemotronHForCausalLM.from_pretrained(tmp_path)


def test_index_naming_an_absent_shard_is_named(tmp_path):
    gone = sharded(tmp_path)[-1]
    os.remove(tmp_path / gone)
    with pytest.raises(CheckpointError, match=re.escape(f"{INDEX_NAME} names {gone}")):
        NemotronHForCausalLM.from_pretrained(tmp_path)


def test_folder_without_weights_is_named(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}: no model.safetensors")):
        NemotronHForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------- memory

def test_loading_costs_about_one_copy_of_the_weights(tmp_path):
    """A ~270 MB float32 checkpoint, loaded in a fresh process: the peak RSS over the post-import
    baseline, with every weight touched (mmap'd tensors are paged in lazily), stays below 1.3x the
    file. A bfloat16 load of the same file leaves about half of it resident: the float32 file is
    unmapped once its tensors are converted."""
    big = dict(hidden_size=512, vocab_size=32000, n_routed_experts=32, moe_intermediate_size=512)
    save = f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from conftest import tiny_config
        from twotower import NemotronHForCausalLM
        NemotronHForCausalLM(tiny_config(**{big!r})).save_pretrained({str(tmp_path)!r})
        NemotronHForCausalLM(tiny_config()).save_pretrained({str(tmp_path / "warmup")!r})
    """
    load = f"""
        import gc, resource
        import torch, twotower

        def rss_mib():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * resource.getpagesize() / 2**20

        def peak_mib():
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

        # a first load of a tiny model imports and compiles whatever loading needs, so that the
        # measured peak is the weights' alone; then the kernel's peak-RSS counter is reset
        twotower.NemotronHForCausalLM.from_pretrained({str(tmp_path / "warmup")!r})
        gc.collect()
        base = rss_mib()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        model = twotower.NemotronHForCausalLM.from_pretrained({str(tmp_path)!r})
        sum(float(t.sum()) for t in model.state_dict().values())  # pages every weight in
        peak = peak_mib() - base
        del model
        gc.collect()
        model = twotower.NemotronHForCausalLM.from_pretrained({str(tmp_path)!r}, dtype=torch.bfloat16)
        print(peak, rss_mib() - base)
    """
    for code in (save, load):
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
    size_mib = os.path.getsize(tmp_path / "model.safetensors") / 2**20
    peak, bf16_resident = (float(v) for v in out.stdout.split())
    assert 200 < size_mib < 300
    assert peak < 1.3 * size_mib, f"peak {peak:.0f} MiB over baseline for a {size_mib:.0f} MiB checkpoint"
    assert bf16_resident < 0.65 * size_mib, f"{bf16_resident:.0f} MiB resident after a bf16 load"
