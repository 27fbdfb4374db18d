"""`from_pretrained` as transformers users call it: Hub repository ids through an offline Hugging
Face cache, and the standard loading arguments honoured or clearly refused, in the package and
through the exported remote code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

from conftest import REPO, make_tiny_model_dir
from twotower import NemotronHForCausalLM, TwoTowerForCausalLM
from twotower.default import load_model
from twotower.loading import LoadOptions, parse_device

COMMIT = "0123456789abcdef0123456789abcdef01234567"
IDS = torch.tensor([[5, 9, 14, 3, 77]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("loading") / "model", vocab_size=300)


def hub_cache(root, repo_id: str, folder):
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return root


def test_hub_id_loads_from_an_offline_cache(model_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants
    cache = hub_cache(tmp_path / "hub", "someone/tiny-twotower", model_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    expected = TwoTowerForCausalLM.from_pretrained(model_dir)(IDS).logits
    model = TwoTowerForCausalLM.from_pretrained("someone/tiny-twotower", cache_dir=str(cache))
    assert torch.equal(model(IDS).logits, expected)
    again = TwoTowerForCausalLM.from_pretrained("someone/tiny-twotower", cache_dir=str(cache), revision=COMMIT,
                                                local_files_only=True)
    assert torch.equal(again(IDS).logits, expected)
    with pytest.raises(FileNotFoundError, match="someone/not-cached"):
        TwoTowerForCausalLM.from_pretrained("someone/not-cached", cache_dir=str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # as HF_HOME would set it
    model, tokenizer = load_model("someone/tiny-twotower")  # the command line's --model takes ids too
    assert torch.equal(model(IDS).logits, expected) and len(tokenizer) == model.config.vocab_size
    with pytest.raises(FileNotFoundError, match="no model folder"):
        TwoTowerForCausalLM.from_pretrained(str(tmp_path / "missing" / "folder"))


def test_hub_id_through_hf_home_offline_in_a_fresh_process(model_dir, tmp_path):
    """HF_HOME and HF_HUB_OFFLINE=1 as a user sets them: the package and the Auto classes with the
    exported remote code both load the repository id."""
    from twotower.export import save_for_hub
    exported = tmp_path / "exported"
    save_for_hub(TwoTowerForCausalLM.from_pretrained(model_dir), exported)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, exported / name)
    hub_cache(tmp_path / "home" / "hub", "someone/tiny-twotower", exported)
    code = (
        "import torch, transformers, twotower\n"
        "ids = torch.tensor([[5, 9, 14, 3, 77]])\n"
        "a = twotower.TwoTowerForCausalLM.from_pretrained('someone/tiny-twotower')\n"
        "b = transformers.AutoModelForCausalLM.from_pretrained('someone/tiny-twotower', trust_remote_code=True,\n"
        "                                                      device_map='cpu', low_cpu_mem_usage=True)\n"
        "t = transformers.AutoTokenizer.from_pretrained('someone/tiny-twotower')\n"
        "assert torch.equal(a(ids).logits, b(ids).logits) and len(t) == a.config.vocab_size\n"
        "print('ok', type(b).__module__)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO / "src")}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok") and "transformers_modules" in result.stdout


@pytest.mark.parametrize("cls", [TwoTowerForCausalLM, NemotronHForCausalLM])
def test_standard_arguments_are_honoured(model_dir, tmp_path, cls):
    if cls is NemotronHForCausalLM:
        TwoTowerForCausalLM.from_pretrained(model_dir).context_model().save_pretrained(tmp_path / "single")
        folder = tmp_path / "single"
    else:
        folder = model_dir
    reference = cls.from_pretrained(folder)
    for kwargs in (dict(device_map="cpu"), dict(device_map={"": "cpu"}), dict(device_map="auto"),
                   dict(low_cpu_mem_usage=True), dict(low_cpu_mem_usage=False), dict(use_safetensors=True)):
        model = cls.from_pretrained(folder, **kwargs)
        assert model.device.type == ("cuda" if kwargs.get("device_map") == "auto" and torch.cuda.is_available()
                                     else "cpu"), kwargs
        assert torch.equal(model(IDS).logits.cpu(), reference(IDS).logits), kwargs
    for kwargs in (dict(torch_dtype=torch.bfloat16), dict(dtype="bfloat16"), dict(torch_dtype="torch.bfloat16")):
        model = cls.from_pretrained(folder, **kwargs)
        assert model.lm_head.weight.dtype == torch.bfloat16, kwargs
    assert cls.from_pretrained(folder, dtype="auto").lm_head.weight.dtype == torch.float32  # as stored


@pytest.mark.parametrize("kwargs,message", [
    (dict(load_in_8bit=True), "load_in_8bit: quantised loading is not supported"),
    (dict(load_in_4bit=True), "load_in_4bit: quantised"),
    (dict(quantization_config={"load_in_8bit": True}), "quantization_config: quantised"),
    (dict(use_safetensors=False), "safetensors only"),
    (dict(device_map={"backbone": "cpu", "lm_head": "cuda:0"}), "splits the model"),
    (dict(device_map="balanced"), "give one device"),
    (dict(dtype="float7"), "dtype must be"),
])
def test_refused_arguments_say_why(model_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TwoTowerForCausalLM.from_pretrained(model_dir, **kwargs)


def test_refusals_reach_the_remote_code(model_dir, tmp_path):
    from twotower.export import save_for_hub
    save_for_hub(TwoTowerForCausalLM.from_pretrained(model_dir), tmp_path / "exported")
    with pytest.raises(ValueError, match="quantised loading is not supported"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", trust_remote_code=True,
                                                          load_in_8bit=True)


def test_load_options_parse():
    assert parse_device(None) == torch.device("cpu") and parse_device(0) == torch.device("cuda", 0)
    kwargs = {"device_map": "cpu", "revision": "abc", "trust_remote_code": True, "num_hidden_layers": 3}
    options = LoadOptions.from_kwargs(kwargs, dtype="float16")
    assert options.dtype == torch.float16 and options.revision == "abc" and options.device.type == "cpu"
    assert kwargs == {"num_hidden_layers": 3}  # what is left overrides config fields
    with pytest.raises(ValueError, match="not both"):
        LoadOptions.from_kwargs({"device_map": "cpu"}, device="cpu")


def test_save_pretrained_round_trips_through_remote_code(model_dir, tmp_path):
    """save_pretrained writes auto_map and the modeling files: the Auto class with
    trust_remote_code gives the same logits and diffusion tokens, and the remote-code model saved
    again loads again."""
    import json
    model = TwoTowerForCausalLM.from_pretrained(model_dir)
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_nemotron_twotower.")
    assert (tmp_path / "saved" / "modeling_nemotron_twotower.py").exists()
    remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert type(remote).__module__.startswith("transformers_modules") and type(remote) is not TwoTowerForCausalLM

    def outputs(m):
        ids = torch.tensor([[5, 9, 14, 33, 77, 120]])
        return m(ids).logits, m.generate(ids, mode="diffusion", max_new_tokens=8, block_size=4)

    expected, got = outputs(model), outputs(remote)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    remote.save_pretrained(tmp_path / "again")
    for name in ("modeling_nemotron_twotower.py", "configuration_nemotron_twotower.py"):
        assert (tmp_path / "again" / name).read_text() == (tmp_path / "saved" / name).read_text()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True)
    got = outputs(again)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
