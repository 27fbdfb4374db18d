"""`twotower recipe NAME --data DIR --out DIR`: every stage of making a small TwoTower model.

    corpus     text files of DIR (+ generated exact-answer tasks) -> OUT/corpus, held-out prompts
    tokenizer  byte-level BPE -> OUT/tokenizer
    pack       token shards -> OUT/data
    ar         AR pre-training of a NemotronH backbone -> OUT/ar/model
    diffusion  both towers from the backbone, masked-diffusion training with the context frozen,
               one stage per block size (the release trained at 32, then 16) -> OUT/diffusion-S*/model
    distill-data  corpus and task prompts continued greedily by the AR tower -> OUT/distill-data/shards
    distill    masked diffusion on those rows, prompts never masked, optionally with certainty
               forcing and prefix noise, one stage per pass (`distill_stages`) -> OUT/distill*/model
               (see `twotower.distill`); a pass may first continue more prompts the same way and
               join them to the rows (`NewRows`) -> OUT/distill*-data/shards
    export     bfloat16 model + tokenizer + model card with measured quality -> OUT/model

Each stage writes `done.json` when finished and is skipped on a rerun; training stages resume from
their last checkpoint, so the recipe can be killed and restarted at any moment. The recipes'
settings and the command line are in `recipes.py`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from .bench import load_prompts
from .config import NemotronHConfig
from .data import TokenBatches, list_files, pack_corpus, read_documents
from .distill import concatenate_shards, distillation_prompts, make_distillation_shards, read_meta
from .evaluate import run_generation, story_quality, task_accuracy, token_logprobs
from .hub import to_dtype
from .modeling import NemotronHForCausalLM
from .modes import MODES
from .objectives import ar_loss, diffusion_loss, prompt_loss_mask
from .recipes import RECIPES, DistillPass, NewRows, Recipe
from .tasks import make_tasks, task_text
from .tokenizer import load_tokenizer, train_tokenizer
from .trainer import Trainer, TrainConfig
from .two_tower import TwoTowerForCausalLM


# ---------------------------------------------------------------- corpus

def sentence_case(text: str) -> str:
    """Restore capitals to lower-cased prose: sentence starts and the pronoun I."""
    text = re.sub(r"(^|[.!?]\s+|\n\s*)([a-z])", lambda m: m[1] + m[2].upper(), text)
    return re.sub(r"\bi\b", "I", text)


def split_stories(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def prepare_corpus(data: Path, out: Path, r: Recipe) -> dict:
    """Copy the training text (lower-cased files re-cased), hold out the last tenth of the story
    file for evaluation prompts, and write the exact-answer tasks (train and held-out)."""
    corpus, heldout = out / "corpus", out / "heldout"
    corpus.mkdir(parents=True, exist_ok=True)
    heldout.mkdir(parents=True, exist_ok=True)
    files = [f for f in list_files(data) if f.name not in r.exclude]
    prompts = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        if "lowercase" in f.name:
            text = sentence_case(text)
        if f.name == r.heldout_stories_from:
            stories = split_stories(text)
            cut = len(stories) * 9 // 10
            text = "\n\n".join(stories[:cut]) + "\n"
            long_ones = [s for s in stories[cut:] if len(s.split()) >= 40]
            prompts = [" ".join(s.split()[:12]) for s in long_ones[: r.story_prompts]]
        (corpus / f"{f.parent.name}_{f.name}").write_text(text, encoding="utf-8")
    if not prompts:  # no story file: prompts from the first documents of the corpus
        docs = [d for d in read_documents(corpus) if len(d.split()) >= 20]
        prompts = [" ".join(d.split()[:12]) for d in docs[-r.story_prompts:]]
    tasks = make_tasks(r.train_tasks, r.seed, "train")
    (corpus / "tasks.txt").write_text("\n\n".join(task_text(t) for t in tasks), encoding="utf-8")
    held = make_tasks(r.heldout_tasks, r.seed, "heldout")
    with open(heldout / "tasks.jsonl", "w") as fh:
        for t in held:
            fh.write(json.dumps({"prompt": t.prompt, "answer": t.answer, "kind": t.kind}) + "\n")
    with open(heldout / "stories.jsonl", "w") as fh:
        for p in prompts:
            fh.write(json.dumps({"prompt": p}) + "\n")
    return {"files": [f.name for f in files], "train_tasks": len(tasks), "heldout_tasks": len(held),
            "story_prompts": len(prompts)}


# ---------------------------------------------------------------- stages

def _stage(out: Path, name: str, fn):
    """Run `fn()` unless `out/name/done.json` exists; record its result there."""
    folder = out / name
    done = folder / "done.json"
    if done.exists():
        print(f"[recipe] {name}: done already")
        return json.loads(done.read_text())
    print(f"[recipe] {name} ...")
    folder.mkdir(parents=True, exist_ok=True)
    result = fn(folder) or {}
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(done)
    return result


def _batches(data: Path, seq_len: int, batch_size: int, seed: int):
    """(training batches, held-out batches) of `seq_len`-token rows."""
    return (TokenBatches(data, "train", seq_len, batch_size, seed=seed),
            TokenBatches(data, "heldout", seq_len, batch_size, seed=seed))


def _train(model, loss_fn, folder: Path, batches, steps: int, lr: float, seed: int, **settings):
    """Train with the recipe's schedule (`settings` override TrainConfig fields); save the model."""
    train, held = batches
    cfg = TrainConfig(**{**dict(max_steps=steps, lr=lr, final_lr=lr / 10, warmup_frac=0.02, decay_frac=0.25,
                                weight_decay=0.1, eval_every=max(steps // 5, 1), eval_batches=4,
                                checkpoint_every=max(min(100, steps // 4), 1), log_every=10,
                                out_dir=str(folder), seed=seed), **settings})
    record = Trainer(model, loss_fn, train, cfg, eval_data=held).train()
    model.save_pretrained(folder / "model")
    return record


def run_recipe(name: str, data: str | Path, out: str | Path) -> dict:
    """Run (or resume) every stage of recipe `name`; returns the model card's numbers."""
    r = RECIPES[name]
    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(r.seed)
    corpus = _stage(out, "corpus", lambda f: prepare_corpus(data, f, r))
    _stage(out, "tokenizer", lambda f: {"vocab_size": len(train_tokenizer(
        sorted((out / "corpus" / "corpus").glob("*.txt")), f, vocab_size=r.vocab_size))})
    tokenizer = load_tokenizer(out / "tokenizer")
    _stage(out, "pack", lambda f: pack_corpus(out / "corpus" / "corpus", tokenizer, f / "shards",
                                              heldout_fraction=0.01, seed=r.seed))
    shards = out / "pack" / "shards"

    def pretrain(folder):
        torch.manual_seed(r.seed)
        config = NemotronHConfig(**r.model, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = NemotronHForCausalLM(config)
        return _train(model, ar_loss, folder, _batches(shards, r.seq_len + 1, r.batch_size, r.seed), r.ar_steps,
                      r.ar_lr, r.seed)

    _stage(out, "ar", pretrain)
    previous = None
    for block_size, steps in r.diffusion_stages:
        stage = f"diffusion-S{block_size}"

        def diffuse(folder, block_size=block_size, steps=steps, previous=previous):
            torch.manual_seed(r.seed + block_size)  # the fresh time conditioning, whatever ran before
            if previous is None:
                backbone = NemotronHForCausalLM.from_pretrained(out / "ar" / "model")
                model = TwoTowerForCausalLM.from_single_tower(backbone, mask_token_id=tokenizer.mask_token_id,
                                                              block_size=block_size)
            else:
                model = TwoTowerForCausalLM.from_pretrained(out / previous / "model")
                model.config.block_size = block_size
            return _train(model, lambda m, b: diffusion_loss(m, b[:, :-1], block_size), folder,
                          _batches(shards, r.seq_len + 1, r.batch_size, r.seed + block_size), steps,
                          r.diffusion_lr, r.seed + block_size)

        _stage(out, stage, diffuse)
        previous = stage
    if r.distill_rows:
        teacher = out / previous / "model"
        _stage(out, "distill-data", lambda f: make_distillation_shards(
            TwoTowerForCausalLM.from_pretrained(teacher),
            distillation_prompts(out / "corpus" / "corpus", tokenizer, r.distill_rows, r.distill_prompt_tokens,
                                 r.distill_task_fraction, r.seed),
            f / "shards", r.distill_continuation_tokens, batch_size=128, seed=r.seed))
        data = out / "distill-data" / "shards"
        for i, distill_pass in enumerate(r.distill_stages):
            stage = "distill" if i == 0 else f"distill-{i + 1}"
            if distill_pass.new_rows:
                _stage(out, f"{stage}-data", lambda f: new_rows_stage(
                    teacher, data, out / "corpus" / "corpus", tokenizer, f, r, distill_pass.new_rows))
                data = out / f"{stage}-data" / "shards"
            _stage(out, stage, lambda f: distill_stage(out / previous / "model", data, f, r, distill_pass))
            previous = stage
    return _stage(out, "export", lambda f: export(out / previous / "model", out, f, r, corpus))


def new_rows_stage(teacher: Path, rows: Path, corpus: Path, tokenizer, folder: Path, r: Recipe,
                   new_rows: tuple[NewRows, ...]) -> dict:
    """A pass's new rows: each `NewRows` set of prompts continued by the teacher's AR tower into
    `folder/rows-J`, all joined after `rows` into `folder/shards`. A rerun after a crash keeps the
    folders already finished (shard folders are published whole, so one that exists is complete)."""
    model = TwoTowerForCausalLM.from_pretrained(teacher)
    sets = [folder / f"rows-{j}" for j in range(len(new_rows))]
    for new, rows_dir in zip(new_rows, sets):
        seed = r.seed + new.seed
        if not rows_dir.exists():
            make_distillation_shards(
                model, distillation_prompts(corpus, tokenizer, new.count, r.distill_prompt_tokens, new.task_fraction,
                                            seed),
                rows_dir, r.distill_continuation_tokens, batch_size=128, seed=seed, temperature=new.temperature)
    joined = folder / "shards"
    return read_meta(joined) if joined.exists() else concatenate_shards([rows, *sets], joined)


def distill_stage(model_dir: Path, shards: Path, folder: Path, r: Recipe, distill_pass: DistillPass) -> dict:
    """One pass of masked diffusion on distillation rows (float32 weights, bfloat16 autocast):
    prompt positions never masked or scored, and the pass's certainty forcing, soft targets, prefix
    noise, warmup and seed (the row order and the noise)."""
    seed = r.seed + distill_pass.seed
    torch.manual_seed(seed)
    model = to_dtype(TwoTowerForCausalLM.from_pretrained(model_dir), torch.float32)
    meta, block = read_meta(shards), model.config.block_size
    if meta.get("prompt_tokens", 0) % block:
        raise ValueError(f"distillation prompts of {meta.get('prompt_tokens')} tokens do not end at a block "
                         f"boundary (block size {block})")

    def loss_fn(m, batch):
        return diffusion_loss(m, batch, block, loss_mask=prompt_loss_mask(batch, meta["prompt_tokens"]),
                              certainty_weight=distill_pass.certainty_weight, prefix_fraction=distill_pass.prefix_noise,
                              ar_kl_weight=distill_pass.ar_kl_weight)

    return _train(model, loss_fn, folder, _batches(shards, meta["row_tokens"], r.batch_size, seed), distill_pass.steps,
                  distill_pass.lr, seed, autocast_bf16=True, warmup_frac=distill_pass.warmup_frac, eval_every=600,
                  log_every=20)


# ---------------------------------------------------------------- export and model card

def measure(model, tokenizer, out: Path, r: Recipe) -> dict:
    """The model card's numbers: AR perplexity on held-out text; per mode, the AR tower's
    perplexity of continuations of held-out story prompts, exact-answer accuracy on held-out
    tasks, tokens per denoiser forward and tokens/s."""
    held = TokenBatches(out / "pack" / "shards", "heldout", r.seq_len + 1, 4, seed=0)
    nll = torch.cat([-token_logprobs(model, held.batch(i)).flatten() for i in range(min(8, len(held)))])
    stories, tasks = load_prompts(out / "corpus")
    result = {"heldout_ar_perplexity": float(torch.exp(nll.mean())), "modes": {}}
    for mode in MODES:
        kw = dict(block_size=16, confidence_threshold=0.8) if MODES[mode].uses_diffusion else {}
        gen, s = run_generation(model, tokenizer, stories, mode, r.eval_new_tokens, **kw)
        tgen, _ = run_generation(model, tokenizer, [t.prompt for t in tasks], mode, 16, **kw)
        result["modes"][mode] = {
            "story_continuation_perplexity": story_quality(model, tokenizer, stories, gen),
            "task_accuracy": task_accuracy(tokenizer, tasks, tgen),
            "tokens_per_denoiser_forward": (s["generated_tokens"] / s["denoiser_forwards"]
                                            if s["denoiser_forwards"] else None),
            "tokens_per_second": s["generated_tokens"] / s["wall_time"],
        }
    return result


def export(model_dir: Path, out: Path, folder: Path, r: Recipe, corpus: dict) -> dict:
    model = TwoTowerForCausalLM.from_pretrained(model_dir)
    tokenizer = load_tokenizer(out / "tokenizer")
    numbers = measure(model, tokenizer, out, r)
    final = out / "model"
    if final.exists():
        shutil.rmtree(final)
    to_dtype(model, torch.bfloat16).save_pretrained(final)
    tokenizer.save_pretrained(final)
    shutil.copytree(out / "corpus" / "heldout", final / "heldout")  # the prompts `twotower bench` uses
    params = sum(p.numel() for p in model.parameters())
    (final / "README.md").write_text(model_card(r, params, corpus, numbers))
    return {"parameters": params, **numbers}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pass_text(p: DistillPass) -> str:
    notes = [f"peak lr {p.lr:g}"]
    if p.certainty_weight:
        notes.append(f"certainty forcing at weight {p.certainty_weight:g}")
    if p.ar_kl_weight:
        notes.append(f"the AR tower's soft targets at weight {p.ar_kl_weight:g}")
    if p.prefix_noise:
        notes.append(f"prefix noise on {p.prefix_noise:.0%} of the rows")
    for new in p.new_rows:
        kind = {1.0: "task-only", 0.0: "story-only"}.get(new.task_fraction, f"{new.task_fraction:.0%} task")
        decoding = f" sampled at temperature {new.temperature:g}" if new.temperature else ""
        notes.append(f"with {new.count} more {kind} rows{decoding}")
    return f"{p.steps} steps ({', '.join(notes)})"


def model_card(r: Recipe, params: int, corpus: dict, numbers: dict) -> str:
    rows = "\n".join(
        f"| {mode} | {m['story_continuation_perplexity']:.2f} | {m['task_accuracy']:.1%} | "
        f"{_fmt(m['tokens_per_denoiser_forward'])} | {m['tokens_per_second']:.1f} |"
        for mode, m in numbers["modes"].items())
    stages = " -> ".join(f"S={b} for {s} steps" for b, s in r.diffusion_stages)
    distilled = "" if not r.distill_rows else (
        f"; then distillation from the AR tower: {r.distill_rows} prompts of {r.distill_prompt_tokens} tokens "
        f"({r.distill_task_fraction:.0%} exact-answer tasks) continued greedily by the AR tower for "
        f"{r.distill_continuation_tokens} tokens, and masked diffusion on those rows in passes of "
        f"{' + '.join(_pass_text(p) for p in r.distill_stages)} "
        f"(batch {r.batch_size}, bfloat16 autocast, prompts never masked)")
    choices = "" if not r.choices else f"""
## Choices measured

Each distillation setting against the alternatives tried (the denoiser after each pass, or a
pass run another way); quality retained is relative to the AR tower, the mean over task kinds
and stories of each ratio capped at 1.

{r.choices}"""
    return f"""# twotower default model

A small Nemotron-Labs-TwoTower model made by `twotower recipe` on a 2-core CPU, shipped so that
everything in the package runs out of the box. It is a demonstration model, not a useful one.

* Size: {params / 1e6:.1f}M parameters in all (two towers of the same NemotronH hybrid, pattern
  `{r.model['hybrid_override_pattern']}`, hidden {r.model['hidden_size']}, {r.model['n_routed_experts']} experts
  top-{r.model['num_experts_per_tok']} plus a shared expert), bfloat16, vocabulary {r.vocab_size} (byte-level BPE).
* Training: AR pre-training of the backbone for {r.ar_steps} steps of {r.batch_size}x{r.seq_len} tokens,
  then both towers from it and masked diffusion with the context tower frozen, {stages}{distilled}.
* Data: {', '.join(corpus['files'])} (see the corpus' SOURCES.md: TinyStories, CDLA-Sharing-1.0, credited
  here; the other texts are in the public domain), the lower-cased TinyStories file re-cased, plus
  {corpus['train_tasks']} generated exact-answer tasks (addition, copy, reverse, count, key-value recall).
  The last tenth of the TinyStories validation sample and a hash-split set of tasks were held out.

## Measured quality (held-out data)

AR perplexity of the context tower on held-out text: {numbers['heldout_ar_perplexity']:.2f}.

Continuations of {corpus['story_prompts']} held-out story prompts ({r.eval_new_tokens} new tokens, greedy) scored by
the AR tower's perplexity (lower is more fluent), and exact-match accuracy on {corpus['heldout_tasks']}
held-out tasks. Diffusion at threshold 0.8, block 16, 16 steps per block; batch 1 on CPU.

| mode | continuation perplexity | task accuracy | tokens per denoiser forward | tokens/s |
|---|---|---|---|---|
{rows}
{choices}"""
