"""`twotower bench`: the quick run's files, token counting, and independence from the batch size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from twotower import cli
from twotower.bench import STORY_OPENINGS, Setting, load_prompts, run_bench, sweep
from twotower.default import DEFAULT_MODEL_DIR, load_model

DATA = Path(__file__).parent / "data"
FIELDS = ("mode", "block_size", "confidence_threshold", "tokens_per_second", "tokens_per_denoiser_forward",
          "denoiser_forwards_per_token", "context_forwards_per_token", "first_block_latency", "speedup_vs_ar",
          "task_accuracy", "story_perplexity", "quality_retained", "generated_tokens")


@pytest.fixture(scope="module")
def model_dir():
    return DEFAULT_MODEL_DIR  # the embedded model


def test_quick_run_defaults_to_the_embedded_model_and_its_heldout_prompts(tmp_path):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        assert cli.main(["bench", "--quick", "--max-new-tokens", "8", "--json", str(out), "--dtype", "bfloat16",
                         "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert report["dtype"] == "bfloat16" and report["threads"] == 1  # as asked, and said in the report
    stories, tasks = load_prompts(DEFAULT_MODEL_DIR)
    assert len(stories) == 40 and len(tasks) == 100  # the model folder's held-out sets
    assert report["prompts"]["stories"] >= 1 and report["prompts"]["tasks"] >= 1
    assert report["prompts"] == {"stories": 2, "tasks": 5}  # --quick's share of those sets
    assert report["headline"]["block_size"] == 16 and report["headline"]["confidence_threshold"] == 0.8


def test_thread_count_must_be_positive(capsys):
    assert cli.main(["bench", "--quick", "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_quick_run_writes_json_plot_and_table(model_dir, tmp_path, capsys):
    files = {name: tmp_path / name for name in ("bench.json", "bench.png", "bench.md")}
    rc = cli.main(["bench", "--model", str(model_dir), "--quick", "--prompts", str(DATA / "prompts.jsonl"),
                   "--max-new-tokens", "8", "--batch-size", "3", "--json", str(files["bench.json"]),
                   "--plot", str(files["bench.png"]), "--markdown", str(files["bench.md"])])
    assert rc == 0
    report = json.loads(files["bench.json"].read_text())
    rows = report["rows"]
    assert [Setting(r["mode"], r["block_size"], r["confidence_threshold"], r["draft_steps"]) for r in rows] == sweep(
        (0.5, 0.8, 0.95), (8, 16), (1, 2))
    assert report["prompts"] == {"stories": 2, "tasks": 2}  # --quick keeps 2 of the 3 stories
    for row in rows:
        assert set(FIELDS) <= set(row)
        assert row["tokens_per_second"] > 0 and row["first_block_latency"] > 0
        assert row["quality_retained"] is not None
    ar = rows[0]
    assert ar["speedup_vs_ar"] == 1.0 and ar["quality_retained"] == 1.0
    assert ar["tokens_per_denoiser_forward"] is None and ar["denoiser_forwards_per_token"] == 0
    for row in rows[2:]:
        if row["mode"] == "diffusion":  # a diffusion forward commits at least one token of every row it runs
            assert row["tokens_per_denoiser_forward"] >= 1
        assert row["speedup_vs_ar"] == pytest.approx(row["tokens_per_second"] / ar["tokens_per_second"])
    speculative = [r for r in rows if r["mode"] == "speculative"]
    assert [(r["block_size"], r["draft_steps"]) for r in speculative] == [(8, 1), (8, 2), (16, 1), (16, 2)]
    for row in speculative:  # AR's tokens, so AR's quality, and drafts were accepted
        assert row["quality_retained"] == 1.0 and row["task_accuracy"] == ar["task_accuracy"]
        assert 0 < row["acceptance_rate"] <= 1 and row["tokens_per_round"] > 1
        by_position = row["acceptance_by_position"]  # conditional rates, one per draft position
        assert 1 <= len(by_position) < row["block_size"] and all(0 <= p <= 1 for p in by_position)
    assert all(r["acceptance_by_position"] is None for r in rows if r["mode"] != "speculative")
    assert report["headline"] == next(r for r in rows if (r["block_size"], r["confidence_threshold"]) == (16, 0.8))
    assert files["bench.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = files["bench.md"].read_text()
    assert table in capsys.readouterr().out
    assert len(table.strip().splitlines()) == 2 + len(rows)


def test_counts_and_results_do_not_depend_on_the_batch_size(model_dir):
    model, tokenizer = load_model(model_dir)
    stories, tasks = load_prompts(model_dir, DATA / "prompts.jsonl")
    settings = sweep((0.6,), (4, 8), (2,))
    runs = {b: run_bench(model, tokenizer, stories, tasks, settings, max_new_tokens=8, batch_size=b, progress=False)
            for b in (1, 4)}
    for rows, outputs in runs.values():
        for row in rows:
            generated = outputs[Setting(row["mode"], row["block_size"], row["confidence_threshold"], row["draft_steps"])]
            assert len(generated) == len(stories) + len(tasks)
            assert all(len(g) <= 8 for g in generated)  # no prompt, no padding
            assert row["generated_tokens"] == sum(len(g) for g in generated)
    (rows1, outputs1), (rows4, outputs4) = runs[1], runs[4]
    assert outputs1 == outputs4
    assert outputs1[Setting("speculative", 8, None, 2)] == outputs1[Setting("ar")]
    quality = ("mode", "block_size", "confidence_threshold", "generated_tokens", "task_accuracy", "accuracy_by_kind",
               "story_perplexity", "quality_retained")
    for r1, r4 in zip(rows1, rows4):
        assert {k: r1[k] for k in quality} == {k: r4[k] for k in quality}


def test_prompts_come_from_the_model_folder_or_fall_back(tmp_path):
    stories, tasks = load_prompts(tmp_path)
    assert stories == list(STORY_OPENINGS) and len(tasks) == 50
    assert len({t.kind for t in tasks}) == 5
    held = tmp_path / "heldout"
    held.mkdir()
    (held / "stories.jsonl").write_text(json.dumps({"prompt": "A held-out story"}) + "\n")
    (held / "tasks.jsonl").write_text(json.dumps({"prompt": "1+2=", "answer": "3", "kind": "add"}) + "\n")
    stories, tasks = load_prompts(tmp_path)
    assert stories == ["A held-out story"]
    assert [(t.prompt, t.answer, t.kind) for t in tasks] == [("1+2=", "3", "add")]


def test_quality_retained_caps_each_kind_at_ar():
    """Beating AR on one kind (add: 1.0 against 0.5) cannot hide a loss on another (copy: half of
    AR's); perplexity counts as AR's over the row's."""
    from twotower.bench import quality_retained
    ar = {"accuracy_by_kind": {"add": 0.5, "copy": 0.8, "count": 0.0}, "story_perplexity": 3.0}
    row = {"accuracy_by_kind": {"add": 1.0, "copy": 0.4, "count": 0.2}, "story_perplexity": 6.0}
    assert quality_retained(row, ar) == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    better = {"accuracy_by_kind": {"add": 1.0, "copy": 1.0, "count": 0.0}, "story_perplexity": 2.0}
    assert quality_retained(better, ar) == 1.0
