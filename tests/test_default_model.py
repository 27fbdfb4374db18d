"""The embedded default model: it ships with the package, loads, and generates text in every mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors import safe_open

import twotower
from conftest import story_text
from twotower.cli import main
from twotower.default import DEFAULT_MODEL_DIR
from twotower.hub import kept_dtype

PROMPT = "Once upon a time"


def test_the_embedded_model_is_complete_and_small():
    names = {p.name for p in DEFAULT_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size <= 25 * 10**6
    with safe_open(str(DEFAULT_MODEL_DIR / "model.safetensors"), "pt") as f:
        dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    kept = {key for key in dtypes if kept_dtype(key, torch.bfloat16) == torch.float32}
    assert len(kept) == 18  # per tower: 3 routers (weight, score bias) and the A_log of 3 Mamba layers
    assert {dtypes[key] for key in kept} == {"F32"}
    assert {dtypes[key] for key in dtypes.keys() - kept} == {"BF16"}
    card = (DEFAULT_MODEL_DIR / "README.md").read_text()
    assert "TinyStories" in card and "perplexity" in card
    # the card is the tiny recipe's: its passes and the alternatives they were measured against
    from twotower.recipe import _pass_text
    from twotower.recipes import RECIPES
    tiny = RECIPES["tiny"]
    assert " + ".join(_pass_text(p) for p in tiny.distill_stages) in card
    assert "## Choices measured" in card and tiny.choices in card


def test_load_default_generates_in_every_mode():
    model, tokenizer = twotower.load_default()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    eos = tokenizer.eos_token_id
    for method in (model.generate_mask_diffusion, model.generate_mock_ar, model.generate_ar):
        out = method(ids, max_new_tokens=24, eos_token_id=eos, return_dict_in_generate=True)
        text = tokenizer.decode(out.sequences[0], skip_special_tokens=True)
        assert text.startswith(PROMPT) and len(text) > len(PROMPT) + 5, (method.__name__, text)
        assert out.stats.generated_tokens >= 1


def test_the_tokenizer_round_trips_the_sample_characters():
    _, tokenizer = twotower.load_default()
    heldout = "".join(p.read_text(encoding="utf-8") for p in sorted((DEFAULT_MODEL_DIR / "heldout").iterdir()))
    text = "".join(sorted(set(story_text() + heldout))) + " café 🙂 \t end"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.mask_token_id == 3 and tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0


def test_the_generate_command_prints_a_continuation():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, "-m", "twotower.cli", "generate", PROMPT, "--max-new-tokens", "32",
                          "--stats"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(PROMPT) and len(out.stdout.strip()) > len(PROMPT) + 10
    assert "tokens per denoiser forward" in out.stderr


def test_show_steps_draws_the_block_being_denoised():
    out = subprocess.run([sys.executable, "-m", "twotower.cli", "generate", PROMPT, "--max-new-tokens", "16",
                          "--show-steps"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    steps = [line for line in out.stdout.splitlines() if line.startswith("block 0 step")]
    assert steps and "_" in steps[0]  # masked positions are visible at the first step


def test_the_unmasking_flag_picks_the_rule(capsys):
    """Threshold 0 commits the whole block in one step; --unmasking fixed spreads it over the steps."""
    common = ["generate", PROMPT, "--max-new-tokens", "8", "--block-size", "8", "--steps-per-block", "4",
              "--threshold", "0", "--show-steps"]
    for extra, steps in (([], 1), (["--unmasking", "fixed"], 4)):
        assert main(common + extra) == 0
        out = capsys.readouterr().out
        assert sum(line.startswith("block 0 step") for line in out.splitlines()) == steps, extra


def test_heldout_prompts_ship_with_the_model():
    stories = (DEFAULT_MODEL_DIR / "heldout" / "stories.jsonl").read_text().splitlines()
    tasks = [json.loads(line) for line in (DEFAULT_MODEL_DIR / "heldout" / "tasks.jsonl").read_text().splitlines()]
    assert len(stories) >= 10 and len(tasks) >= 50
    assert all({"prompt", "answer", "kind"} <= set(t) for t in tasks)


def test_generate_stream_prints_characters_split_across_tokens_once_whole():
    """The byte-level tokenizer splits é, à, — over tokens; the CLI's stream must not print U+FFFD."""
    import io

    from twotower.generate_cli import TextStream
    _, tokenizer = twotower.load_default()
    text = "Café déjà vu — naïve"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    out = io.StringIO()
    stream = TextStream(tokenizer, out)
    stream.put(torch.tensor([[1]]))  # the prompt
    for i in ids:  # one token at a time, as AR decoding puts them
        stream.put(torch.tensor([i]))
    stream.end()
    assert out.getvalue() == text + "\n"
