"""Distillation data for the denoiser: prompts continued by the AR tower itself.

Sequence-level knowledge distillation (Kim & Rush 2016) used for parallel decoding, as consistency
LLMs (Kou et al. 2024, CLLMs) and dParallel (Chen et al. 2025) do: the denoiser is trained on the
AR tower's own greedy continuations instead of natural text. Its targets are then a deterministic
function of the context, which is what confident parallel commits need, and agreement with the AR
tower is what "quality retained" measures. Continuations may instead be sampled at a temperature
(`temperature > 0`): more varied contexts, noisier targets (the README's ablation measures both).

Each row holds a prompt of exactly `prompt_tokens` tokens and `continuation_tokens` tokens of the
AR tower's continuation (greedy unless sampled; not stopped at EOS: after one, AR starts a new text, as in the packed
pre-training data). With `prompt_tokens` a multiple of the block size, the denoiser's blocks start
where the prompt ends, as they do in generation; the prompt positions are never masked or scored
(`objectives.prompt_loss_mask`).

Prompts end where a user's would: a few words into a paragraph of the corpus (the rest of the
prompt is the text before it), or right after a task's `=` (earlier tasks before it).

`make_distillation_shards` writes `train.bin`, `heldout.bin` (rows back to back) and `meta.json`
(`kind: "distillation"`, `row_tokens`, `prompt_tokens`), so `data.TokenBatches` with
`seq_len=row_tokens` serves whole rows. Generation is batched, shows a progress bar and resumes:
rows are appended to a partial file as batches finish, and a rerun continues after the last whole
batch (the prompts are a pure function of the seed, and a sampled batch draws from a generator
seeded with the seed and the batch's first row, so a resumed run samples the same rows).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data import read_documents, token_dtype
from .params import SamplingParams
from .tasks import make_tasks, task_text

DISTILLATION = "distillation"


def distillation_prompts(corpus, tokenizer, n: int, prompt_tokens: int, task_fraction: float = 0.25,
                         seed: int = 0) -> list[list[int]]:
    """`n` prompts of exactly `prompt_tokens` token ids: a fraction `task_fraction` from the task
    generator's training split, the rest from paragraphs of the text files of `corpus`."""
    rng = random.Random(seed)
    n_tasks = round(n * task_fraction)
    prompts = []
    if n_tasks:
        tasks = make_tasks(n_tasks + 8, seed, "train")
        for i in range(n_tasks):  # a task's prompt after 2 to 8 earlier tasks, as in the training text
            before = "\n\n".join(task_text(t) for t in tasks[i + 1:i + 1 + rng.randint(2, 8)])
            ids = _last_tokens(tokenizer, before + "\n\n" + tasks[i].prompt, prompt_tokens)
            if ids is not None:
                prompts.append(ids)
    paragraphs = [p for doc in read_documents(corpus) for p in doc.split("\n\n") if len(p.split()) >= 8]
    if not paragraphs:
        raise ValueError(f"no paragraphs of 8 words or more in {corpus}")
    while len(prompts) < n:  # a paragraph's first 4 to 14 words after the paragraph before it
        i = rng.randrange(1, len(paragraphs)) if len(paragraphs) > 1 else 0
        words = paragraphs[i].split()
        opening = " ".join(words[:rng.randint(4, min(14, len(words) - 2))])
        ids = _last_tokens(tokenizer, paragraphs[i - 1] + "\n\n" + opening if i else opening, prompt_tokens)
        if ids is not None:
            prompts.append(ids)
    rng.shuffle(prompts)
    return prompts


def _last_tokens(tokenizer, text: str, count: int) -> list[int] | None:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return ids[-count:] if len(ids) >= count else None


@torch.no_grad()
def make_distillation_shards(model, prompts: list[list[int]], out_dir: str | Path, continuation_tokens: int,
                             batch_size: int = 64, heldout_fraction: float = 0.02, seed: int = 0,
                             temperature: float = 0.0) -> dict:
    """Continue every prompt with the AR tower of `model`, greedily or (`temperature` > 0) sampled,
    and write the rows as shards (see the module docstring). Resumes from `out_dir`.partial;
    returns the metadata."""
    greedy = SamplingParams(temperature=temperature).greedy  # validates the temperature too
    out_dir = new_folder(out_dir)
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1:
        raise ValueError(f"prompts must all have the same length, got lengths {sorted(lengths)}")
    prompt_tokens = lengths.pop()
    row_tokens = prompt_tokens + continuation_tokens
    dtype = token_dtype(model.config.vocab_size)
    partial = out_dir.with_name(out_dir.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    rows_file = partial / "rows.bin"
    row_bytes = row_tokens * dtype.itemsize
    done = (rows_file.stat().st_size // row_bytes) if rows_file.exists() else 0
    done -= done % batch_size  # whole batches only: a batch's rows are written together
    with open(rows_file, "r+b" if rows_file.exists() else "wb") as fh:
        fh.truncate(done * row_bytes)
        fh.seek(done * row_bytes)
        starts = range(done, len(prompts), batch_size)
        for start in tqdm(starts, desc="distillation rows", unit=" batches", initial=0, total=len(starts)):
            ids = torch.tensor(prompts[start:start + batch_size])
            sampling = None if greedy else SamplingParams(temperature=temperature, seed=batch_seed(seed, start))
            rows = model.generate_ar(ids, max_new_tokens=continuation_tokens, sampling=sampling)
            fh.write(rows.numpy().astype(dtype).tobytes())
            fh.flush()
            os.fsync(fh.fileno())
    rows = np.fromfile(rows_file, dtype=dtype).reshape(-1, row_tokens)
    heldout = np.random.default_rng(seed).random(len(rows)) < heldout_fraction
    rows[~heldout].tofile(partial / "train.bin")
    rows[heldout].tofile(partial / "heldout.bin")
    meta = {"kind": DISTILLATION, "dtype": dtype.name, "vocab_size": model.config.vocab_size,
            "row_tokens": row_tokens, "prompt_tokens": prompt_tokens, "continuation_tokens": continuation_tokens,
            "train_rows": int((~heldout).sum()), "heldout_rows": int(heldout.sum()),
            "train_tokens": int((~heldout).sum()) * row_tokens, "heldout_tokens": int(heldout.sum()) * row_tokens,
            "decoding": "greedy" if greedy else f"sampled at temperature {temperature:g}", "seed": seed}
    rows_file.unlink()
    return publish(partial, out_dir, meta)


def batch_seed(seed: int, first_row: int) -> int:
    """The sampling seed of the batch that starts at row `first_row` (distinct per batch and seed)."""
    return seed * 1_000_003 + first_row


def new_folder(out_dir: str | Path) -> Path:
    """out_dir as a Path, which must not exist yet (shards are written once)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ValueError(f"{out_dir} already exists; remove it or choose another folder")
    return out_dir


def publish(partial: Path, out_dir: Path, meta: dict) -> dict:
    """Write meta.json into the finished `partial` folder and rename it to `out_dir` (one step:
    a crash leaves no half folder under the final name); returns meta."""
    (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    os.rename(partial, out_dir)
    return meta


def read_meta(data: str | Path) -> dict:
    """The meta.json of a shard folder ({} if it has none)."""
    path = Path(data) / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def concatenate_shards(sources: list[str | Path], out_dir: str | Path) -> dict:
    """One distillation shard folder holding the rows of every folder of `sources` (train after
    train, held-out after held-out), which must agree on the row layout; returns its metadata."""
    metas = [read_meta(s) for s in sources]
    layout = ("kind", "dtype", "vocab_size", "row_tokens", "prompt_tokens", "continuation_tokens")
    if not metas or any(m.get("kind") != DISTILLATION for m in metas):
        raise ValueError(f"every source must be a distillation shard folder: {[str(s) for s in sources]}")
    if len({tuple(m[k] for k in layout) for m in metas}) != 1:
        raise ValueError("the shard folders differ in row layout: "
                         + "; ".join(str({k: m[k] for k in layout}) for m in metas))
    out_dir = new_folder(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    for split in ("train", "heldout"):
        with open(partial / f"{split}.bin", "wb") as fh:
            for source in sources:
                fh.write((Path(source) / f"{split}.bin").read_bytes())
    meta = {k: metas[0][k] for k in layout}
    for key in ("train_rows", "heldout_rows", "train_tokens", "heldout_tokens"):
        meta[key] = sum(m[key] for m in metas)
    seeds = [m.get("seed") for m in metas]  # a joined folder's seeds are listed, not nested
    decodings = sorted({str(m.get("decoding")) for m in metas})  # one, or the kinds joined
    meta.update(decoding=decodings[0] if len(decodings) == 1 else decodings,
                seed=[x for s in seeds for x in (s if isinstance(s, list) else [s])])
    return publish(partial, out_dir, meta)
