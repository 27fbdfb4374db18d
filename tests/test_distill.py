"""Distillation data: prompts and rows reproducible from a seed, rows that are the AR tower's own
greedy continuations, a resumed run equal to an uninterrupted one, and `twotower train` on them."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from conftest import randomize, tiny_config
from twotower import TwoTowerForCausalLM
from twotower.cli import main
from twotower.data import TokenBatches
from twotower.distill import DISTILLATION, batch_seed, concatenate_shards, distillation_prompts, make_distillation_shards
from twotower.params import SamplingParams
from twotower.tokenizer import train_tokenizer
from twotower.two_tower import TwoTowerConfig

WORDS = "the a cat dog sun ran saw big small happy tree park ball red blue mom dad said play went home".split()


def made_up_text(paragraphs: int, seed: int) -> str:
    rng = random.Random(seed)
    return "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 30))).capitalize() + "."
                       for _ in range(paragraphs))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(corpus folder, tokenizer, tiny random two-tower model, model folder)."""
    tmp = tmp_path_factory.mktemp("distill")
    corpus = tmp / "corpus"
    corpus.mkdir()
    (corpus / "stories.txt").write_text(made_up_text(200, seed=0))
    tokenizer = train_tokenizer([corpus / "stories.txt"], tmp / "tokenizer", vocab_size=300)
    torch.manual_seed(0)
    config = TwoTowerConfig(**tiny_config("M*E", vocab_size=len(tokenizer)).to_dict(), block_size=4)
    model = randomize(TwoTowerForCausalLM(config).eval(), seed=0, head_std=4.0)
    model.save_pretrained(tmp / "model")
    return corpus, tokenizer, model, tmp / "model"


def test_prompts_are_reproducible_and_mix_tasks_and_text(setup):
    corpus, tokenizer, _, _ = setup
    prompts = distillation_prompts(corpus, tokenizer, 40, 8, task_fraction=0.25, seed=3)
    assert prompts == distillation_prompts(corpus, tokenizer, 40, 8, task_fraction=0.25, seed=3)
    assert prompts != distillation_prompts(corpus, tokenizer, 40, 8, task_fraction=0.25, seed=4)
    assert len(prompts) == 40 and all(len(p) == 8 for p in prompts)
    ends = [tokenizer.decode(p) for p in prompts]
    assert sum(e.endswith("=") for e in ends) == 10  # a task's prompt ends at its "="
    assert all(e.split()[-1].strip(".").lower() in WORDS for e in ends if not e.endswith("="))  # whole words


def test_rows_are_greedy_continuations_and_reproducible(setup, tmp_path):
    corpus, tokenizer, model, _ = setup
    prompts = distillation_prompts(corpus, tokenizer, 12, 8, seed=0)
    meta = make_distillation_shards(model, prompts, tmp_path / "a", continuation_tokens=6, batch_size=4,
                                    heldout_fraction=0.25, seed=1)
    make_distillation_shards(model, prompts, tmp_path / "b", continuation_tokens=6, batch_size=4,
                             heldout_fraction=0.25, seed=1)
    for name in ("train.bin", "heldout.bin", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert meta["kind"] == DISTILLATION and meta["row_tokens"] == 14 and meta["prompt_tokens"] == 8
    assert meta["train_rows"] + meta["heldout_rows"] == 12 and meta["heldout_rows"] > 0
    rows = np.concatenate([np.fromfile(tmp_path / "a" / f"{s}.bin", dtype=meta["dtype"]).reshape(-1, 14)
                           for s in ("train", "heldout")])
    assert sorted(map(tuple, rows[:, :8].tolist())) == sorted(map(tuple, prompts))
    expected = model.generate_ar(torch.tensor(rows[:, :8].astype(np.int64)), max_new_tokens=6)
    assert torch.equal(torch.from_numpy(rows.astype(np.int64)), expected)
    assert not (tmp_path / "a.partial").exists()
    with pytest.raises(ValueError, match="already exists"):
        make_distillation_shards(model, prompts, tmp_path / "a", continuation_tokens=6)
    with pytest.raises(ValueError, match="same length"):
        make_distillation_shards(model, [[5, 6], [5]], tmp_path / "c", continuation_tokens=6)


def test_an_interrupted_run_resumes_to_the_same_shards(setup, tmp_path):
    corpus, tokenizer, model, _ = setup
    prompts = distillation_prompts(corpus, tokenizer, 12, 8, seed=0)
    make_distillation_shards(model, prompts, tmp_path / "whole", continuation_tokens=6, batch_size=4, seed=1)
    # a crash after one batch of 4 rows and part of the next: rows.bin holds 4 whole rows and 10 tokens
    first = model.generate_ar(torch.tensor(prompts[:4]), max_new_tokens=6).numpy().astype(np.uint16)
    partial = tmp_path / "resumed.partial"
    partial.mkdir()
    (partial / "rows.bin").write_bytes(first.tobytes() + np.arange(10, dtype=np.uint16).tobytes())
    make_distillation_shards(model, prompts, tmp_path / "resumed", continuation_tokens=6, batch_size=4, seed=1)
    for name in ("train.bin", "heldout.bin", "meta.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()


def test_sampled_rows_are_reproducible_from_the_seed_and_resume(setup, tmp_path):
    corpus, tokenizer, model, _ = setup
    prompts = distillation_prompts(corpus, tokenizer, 12, 8, seed=0)
    args = dict(continuation_tokens=6, batch_size=4, heldout_fraction=0.0, seed=3, temperature=1.0)
    meta = make_distillation_shards(model, prompts, tmp_path / "a", **args)
    assert meta["decoding"] == "sampled at temperature 1" and meta["heldout_rows"] == 0
    rows = torch.from_numpy(np.fromfile(tmp_path / "a" / "train.bin", dtype=meta["dtype"]).astype(np.int64))
    rows = rows.reshape(12, 14)
    # each batch is generate_ar sampled with its own seed, so the rows are a function of (seed, batch)
    for start in range(0, 12, 4):
        expected = model.generate_ar(torch.tensor(prompts[start:start + 4]), max_new_tokens=6,
                                     sampling=SamplingParams(temperature=1.0, seed=batch_seed(3, start)))
        assert torch.equal(rows[start:start + 4], expected)
    greedy = model.generate_ar(torch.tensor(prompts), max_new_tokens=6)
    assert not torch.equal(rows, greedy)  # sampled, not greedy
    other = make_distillation_shards(model, prompts, tmp_path / "other", **dict(args, seed=4))
    assert (tmp_path / "other" / "train.bin").read_bytes() != (tmp_path / "a" / "train.bin").read_bytes()
    assert other["seed"] == 4
    # a crash after the first batch: the resumed run samples the same rows as the whole one
    partial = tmp_path / "resumed.partial"
    partial.mkdir()
    (partial / "rows.bin").write_bytes(rows[:4].numpy().astype(np.uint16).tobytes())
    make_distillation_shards(model, prompts, tmp_path / "resumed", **args)
    assert (tmp_path / "resumed" / "train.bin").read_bytes() == (tmp_path / "a" / "train.bin").read_bytes()
    with pytest.raises(ValueError, match="temperature"):
        make_distillation_shards(model, prompts, tmp_path / "bad", continuation_tokens=6, temperature=-1.0)
    # a join of greedy and sampled rows lists both decodings
    make_distillation_shards(model, prompts, tmp_path / "g", **dict(args, temperature=0.0))
    joined = concatenate_shards([tmp_path / "g", tmp_path / "a"], tmp_path / "ga")
    assert joined["decoding"] == ["greedy", "sampled at temperature 1"]


def test_shard_folders_concatenate_row_for_row(setup, tmp_path):
    corpus, tokenizer, model, _ = setup
    text = make_distillation_shards(model, distillation_prompts(corpus, tokenizer, 12, 8, 0.0, seed=0), tmp_path / "a",
                                    continuation_tokens=6, batch_size=4, heldout_fraction=0.25, seed=1)
    tasks = make_distillation_shards(model, distillation_prompts(corpus, tokenizer, 8, 8, 1.0, seed=5),
                                     tmp_path / "b", continuation_tokens=6, batch_size=4, heldout_fraction=0.25, seed=5)
    meta = concatenate_shards([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    for split in ("train", "heldout"):
        both = np.fromfile(tmp_path / "ab" / f"{split}.bin", dtype=meta["dtype"]).reshape(-1, 14)
        parts = [np.fromfile(tmp_path / f / f"{split}.bin", dtype=meta["dtype"]).reshape(-1, 14) for f in "ab"]
        assert np.array_equal(both, np.concatenate(parts))
        assert len(both) == text[f"{split}_rows"] + tasks[f"{split}_rows"] == meta[f"{split}_rows"]
    assert meta["kind"] == DISTILLATION and meta["row_tokens"] == 14 and meta["seed"] == [1, 5]
    assert len(TokenBatches(tmp_path / "ab", "train", 14, 1, seed=0)) == meta["train_rows"]  # whole rows served
    # joining a joined folder again (a later recipe pass) is the three-way join, its seeds listed flat
    again = concatenate_shards([tmp_path / "ab", tmp_path / "a"], tmp_path / "aba")
    three = concatenate_shards([tmp_path / "a", tmp_path / "b", tmp_path / "a"], tmp_path / "aba3")
    assert again == three and again["seed"] == [1, 5, 1]
    assert all((tmp_path / "aba" / f"{s}.bin").read_bytes() == (tmp_path / "aba3" / f"{s}.bin").read_bytes()
               for s in ("train", "heldout"))
    other = make_distillation_shards(model, distillation_prompts(corpus, tokenizer, 4, 6, seed=0), tmp_path / "c",
                                     continuation_tokens=6, batch_size=4, seed=1)
    assert other["row_tokens"] == 12
    with pytest.raises(ValueError, match="row layout"):
        concatenate_shards([tmp_path / "a", tmp_path / "c"], tmp_path / "ac")
    with pytest.raises(ValueError, match="already exists"):
        concatenate_shards([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")


def test_train_command_on_distillation_rows(setup, tmp_path, capsys):
    corpus, tokenizer, model, folder = setup
    prompts = distillation_prompts(corpus, tokenizer, 16, 4, seed=0)
    make_distillation_shards(model, prompts, tmp_path / "shards", continuation_tokens=8, batch_size=8,
                             heldout_fraction=0.25, seed=0)
    code = main(["train", "--objective", "diffusion", "--model", str(folder), "--data", str(tmp_path / "shards"),
                 "--out", str(tmp_path / "run"), "--batch-size", "4", "--max-steps", "2",
                 "--certainty-weight", "0.5", "--prefix-noise", "0.5", "--ar-kl-weight", "1.0"])
    assert code == 0
    trained = TwoTowerForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert trained.config.block_size == 4
    assert not torch.equal(trained.lm_head.weight, model.lm_head.weight)  # the denoiser side trained
    assert torch.equal(trained.context_lm_head.weight, model.context_lm_head.weight)  # the context did not
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(np.isfinite(r.get("loss", 0.0)) for r in records)
    # prompts must end at a block boundary
    code = main(["train", "--objective", "diffusion", "--model", str(folder), "--data", str(tmp_path / "shards"),
                 "--out", str(tmp_path / "run3"), "--block-size", "3", "--max-steps", "1"])
    assert code == 2 and "block boundary" in capsys.readouterr().err
    code = main(["train", "--objective", "diffusion", "--model", str(folder), "--data", str(tmp_path / "shards"),
                 "--out", str(tmp_path / "run4"), "--prefix-noise", "1.5", "--max-steps", "1"])
    assert code == 2 and "--prefix-noise" in capsys.readouterr().err
    code = main(["train", "--objective", "diffusion", "--model", str(folder), "--data", str(tmp_path / "shards"),
                 "--out", str(tmp_path / "run5"), "--ar-kl-weight", "-1", "--max-steps", "1"])
    assert code == 2 and "--ar-kl-weight is a loss weight" in capsys.readouterr().err
    assert not (tmp_path / "run5").exists()
