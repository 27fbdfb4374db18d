"""Training end to end: a real learning check, the `twotower train` command on packed shards for
both objectives and under torchrun, the recipe's every stage on a tiny corpus, and clear errors for
bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import make_tiny_model_dir, story_text, tiny_config
from twotower import NemotronHForCausalLM, TwoTowerForCausalLM
from twotower.cli import main
from twotower.modes import MODES
from twotower.data import pack_corpus
from twotower.objectives import corrupt, diffusion_loss
from twotower.tokenizer import load_tokenizer
from twotower.trainer import Trainer, TrainConfig


class CountingSequences:
    """Rows of consecutive ids (start drawn per row): trivially learnable, so a working diffusion
    objective must drive the loss far below chance (ln 60 = 4.1) within a few hundred steps."""

    def __init__(self, seed: int, rows: int = 8, length: int = 24, vocab: int = 60):
        self.seed, self.rows, self.length, self.vocab = seed, rows, length, vocab

    def batch(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        start = torch.randint(0, self.vocab, (self.rows, 1), generator=g)
        return (start + torch.arange(self.length)) % self.vocab + 4


def heldout_diffusion_loss(model, data) -> float:
    ids = data.batch(0)
    noise = corrupt(ids, 3, torch.Generator().manual_seed(0), t=torch.full((ids.shape[0],), 0.5))
    with torch.no_grad():
        total, count = diffusion_loss(model, ids, 8, noise=noise)
    return total.item() / int(count)


def test_diffusion_training_learns(tmp_path):
    torch.manual_seed(0)
    single = NemotronHForCausalLM(tiny_config("M*E", vocab_size=64))
    model = TwoTowerForCausalLM.from_single_tower(single)
    held = CountingSequences(seed=99)
    before = heldout_diffusion_loss(model, held)
    cfg = TrainConfig(max_steps=150, lr=3e-3, final_lr=3e-4, warmup_frac=0.05, eval_every=0, checkpoint_every=0,
                      out_dir=str(tmp_path), seed=0)
    Trainer(model, lambda m, b: diffusion_loss(m, b, 8), CountingSequences(seed=1), cfg).train()
    model.eval()
    after = heldout_diffusion_loss(model, held)
    assert before > 3.5 and after < 0.5 * before, (before, after)
    assert not any(p.requires_grad for p in model.context_tower.parameters())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    folder = make_tiny_model_dir(root / "model", vocab_size=300)
    text = root / "text"
    text.mkdir()
    (text / "stories.txt").write_text(story_text(40_000))
    pack_corpus(text, load_tokenizer(folder), root / "shards", heldout_fraction=0.05)
    tiny_config("M*E", vocab_size=300).to_json_file(root / "backbone.json")
    return root


def test_train_command_both_objectives(shards, tmp_path):
    ar_out, diff_out = tmp_path / "ar", tmp_path / "diffusion"
    assert main(["train", "--objective", "ar", "--model-config", str(shards / "backbone.json"),
                 "--data", str(shards / "shards"), "--out", str(ar_out), "--seq-len", "32", "--batch-size", "4",
                 "--max-steps", "4", "--lr", "1e-3"]) == 0
    assert (ar_out / "model" / "model.safetensors").exists()
    assert main(["train", "--objective", "diffusion", "--model", str(ar_out / "model"),
                 "--data", str(shards / "shards"), "--out", str(diff_out), "--seq-len", "32", "--batch-size", "4",
                 "--block-size", "8", "--max-steps", "3"]) == 0
    model = TwoTowerForCausalLM.from_pretrained(diff_out / "model")
    backbone = NemotronHForCausalLM.from_pretrained(ar_out / "model")
    # the context tower is the AR backbone, untouched by diffusion training
    for k, v in model.context_tower.state_dict().items():
        assert torch.equal(v, backbone.backbone.state_dict()[k])
    assert model.config.block_size == 8
    records = [json.loads(line) for line in (diff_out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["loss"] > 0 for r in records)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_train_command_under_torchrun_matches_one_process(shards, tmp_path, parallel):
    """`twotower train` on 2 processes (DDP or FSDP2 over gloo) ends cleanly and trains the same
    weights as one process on the same global batches; FSDP's sharded run still yields a model
    folder, and every checkpoint is one (`from_pretrained` loads it)."""
    settings = tmp_path / "train.yaml"
    settings.write_text(f"parallel: {parallel}\n")
    args = ["train", "--objective", "ar", "--model-config", str(shards / "backbone.json"), "--data",
            str(shards / "shards"), "--seq-len", "32", "--batch-size", "4", "--max-steps", "3", "--lr", "1e-3",
            "--config", str(settings)]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "twotower.cli",
           *args, "--out", str(tmp_path / "two")]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    one = NemotronHForCausalLM.from_pretrained(tmp_path / "one" / "model").state_dict()
    two = NemotronHForCausalLM.from_pretrained(tmp_path / "two" / "model").state_dict()
    checkpoint = NemotronHForCausalLM.from_pretrained(tmp_path / "two" / "checkpoint").state_dict()
    assert one.keys() == two.keys()
    assert all(torch.equal(two[name], checkpoint[name]) for name in two)
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-5), name
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    assert losses[0] and losses[1] == pytest.approx(losses[0], rel=1e-5)  # the logged (last) step


@pytest.mark.parametrize("extra,message", [
    (["--seq-len", "8", "--block-size", "16"], "below the block size"),
    (["--seq-len", "32", "--block-size", "0"], "block-size"),
])
def test_train_command_rejects_bad_block_sizes_and_writes_nothing(shards, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    code = main(["train", "--objective", "diffusion", "--model", str(shards / "model"),
                 "--data", str(shards / "shards"), "--out", str(out), "--max-steps", "2", *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_train_command_rejects_missing_data(tmp_path, capsys, shards):
    code = main(["train", "--objective", "ar", "--model-config", str(shards / "backbone.json"),
                 "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "run")])
    assert code == 2 and "no token shard" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_recipe_runs_every_stage_on_a_tiny_corpus(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "tinystories_val_head.txt").write_text(story_text(30_000))
    (data / "tinystories_train_head_lowercase.txt").write_text(story_text(20_000).lower())
    assert main(["recipe", "smoke", "--data", str(data), "--out", str(tmp_path / "out")]) == 0
    final = tmp_path / "out" / "model"
    card = (final / "README.md").read_text()
    assert (final / "heldout" / "tasks.jsonl").exists() and (final / "heldout" / "stories.jsonl").exists()
    assert "task accuracy" in card and "diffusion" in card
    assert "Choices measured" not in card  # the smoke recipe has no measured alternatives to show
    # the smoke recipe's second distillation pass has prefix noise and task-only rows, the third certainty forcing and more rows
    assert "prefix noise on 50% of the rows, with 8 more task-only rows" in card
    assert ("certainty forcing at weight 0.5, the AR tower's soft targets at weight 1, with 4 more task-only rows, "
            "with 4 more story-only rows sampled at temperature 0.7") in card
    meta = json.loads((tmp_path / "out" / "distill-3-data" / "shards" / "meta.json").read_text())
    assert meta["seed"] == [0, 5, 6, 7]  # the rows of every pass so far: distill-data, then each pass's new rows
    assert meta["decoding"] == ["greedy", "sampled at temperature 0.7"]
    from safetensors import safe_open

    from twotower.default import load_model
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16  # shipped in bfloat16
        routers = [k for k in f.keys() if k.endswith("mixer.gate.weight")]
        assert routers and all(f.get_tensor(k).dtype == torch.float32 for k in routers)  # but not the router
    model, tokenizer = load_model(final)
    from twotower.tokenizer import CHAT_TEMPLATE
    assert tokenizer.chat_template == CHAT_TEMPLATE  # the recipe's tokenizer carries the chat template
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    for method in (model.generate_mask_diffusion, model.generate_mock_ar, model.generate_ar):
        text = tokenizer.decode(method(ids, max_new_tokens=8)[0])
        assert text.startswith("Once upon a time")
    done = json.loads((tmp_path / "out" / "export" / "done.json").read_text())
    assert set(done["modes"]) == set(MODES)  # every registered mode measured for the model card
    # a rerun resumes: every stage is done, nothing is trained again
    capsys.readouterr()
    assert main(["recipe", "smoke", "--data", str(data), "--out", str(tmp_path / "out")]) == 0
    rerun = capsys.readouterr().out
    assert all(f"[recipe] {stage}: done already" in rerun for stage in ("corpus", "tokenizer", "pack", "ar", "distill-data", "distill",
                                                          "distill-2-data", "distill-2", "distill-3-data",
                                                          "distill-3", "export"))
    # a crash inside a pass's data stage: the finished row sets are kept, the rest made, then joined
    stage = tmp_path / "out" / "distill-3-data"
    kept = (stage / "rows-0" / "train.bin").read_bytes()
    joined = (stage / "shards" / "train.bin").read_bytes()
    shutil.rmtree(stage / "rows-1")
    shutil.rmtree(stage / "shards")
    (stage / "done.json").unlink()
    assert main(["recipe", "smoke", "--data", str(data), "--out", str(tmp_path / "out")]) == 0
    assert (stage / "rows-0" / "train.bin").read_bytes() == kept
    assert (stage / "shards" / "train.bin").read_bytes() == joined  # the same (sampled) rows made again from the seed
