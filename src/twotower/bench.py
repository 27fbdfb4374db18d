"""`twotower bench`: quality versus speed of every generation mode, measured in one run.

Every setting (AR, mock-AR, mask diffusion at each block size and confidence threshold of a
sweep, speculative decoding at each block size and number of draft steps) generates, greedily,
for the same prompts in the same process. The settings take turns
on every prompt batch, in an order that rotates from batch to batch, so drift of the machine
(heat, other load) favours none of them.

Quality: exact-match accuracy on the exact-answer tasks, per task kind, and the AR tower's
perplexity of the story continuations. `quality_retained` is the mean over those tasks (each
task kind, and the stories) of a setting's score relative to AR's, each capped at 1; for
perplexity, AR's over the setting's. A kind on which AR scores 0 has nothing to retain and is left
out.

Speed: generated tokens per second (prompt and padding never count), tokens per denoiser
forward and denoiser and context forwards per token (one forward runs a whole batch), latency to
the first committed block (the first token for the token-by-token modes), and the speed-up over
AR measured in the same run.
Diffusion runs `steps_per_block = block_size`, so the threshold alone decides how many tokens a
denoiser forward commits. Speculative rows add the fraction of drafted tokens accepted and the
tokens a draft-and-verify round commits; their output is AR's by construction. The command line
is in `bench_cli.py`.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from .choices import BLOCK_SIZES, DRAFT_STEPS, MAX_NEW_TOKENS, TASK_NEW_TOKENS, THRESHOLDS
from .compiled import is_compiled
from .evaluate import add_counts, run_generation, story_quality, task_accuracy
from .modes import MODES, get_mode
from .tasks import Task, make_tasks

HEADLINE = (16, 0.8)  # (block size, threshold): the release's setting
FALLBACK_TASKS = 50
# openings for models whose folder has no held-out story prompts
STORY_OPENINGS = (
    "Once upon a time, a little girl named Mia found a red ball in the garden.",
    "Tom had a small boat. One sunny day he took it to the big lake",
    "There was a kind old owl who lived in a tall tree near the village.",
    "Ben wanted to bake a cake for his mom, so he went to the kitchen and",
    "The puppy was sad because it could not find its favorite toy.",
    "One morning, Lily saw a tiny bird sitting on her window.",
    "Sam and his friend Max liked to play in the park after school.",
    "In a quiet forest, a brave little fox heard a strange noise.",
)


class Setting(NamedTuple):
    """One generation setting: block_size is None for the AR modes; confidence_threshold or
    draft_steps is the setting swept with it (`Mode.swept`), the other None."""

    mode: str
    block_size: int | None = None
    confidence_threshold: float | None = None
    draft_steps: int | None = None

    def kwargs(self) -> dict:
        if not get_mode(self.mode).uses_diffusion:
            return {}
        chosen = dict(confidence_threshold=self.confidence_threshold, draft_steps=self.draft_steps)
        return dict(block_size=self.block_size, steps_per_block=self.block_size,
                    **{k: v for k, v in chosen.items() if v is not None})

    def label(self) -> str:
        if not get_mode(self.mode).uses_diffusion:
            return self.mode
        swept = f"t={self.confidence_threshold}" if self.draft_steps is None else f"steps={self.draft_steps}"
        return f"{self.mode} S={self.block_size} {swept}"


def sweep(thresholds=THRESHOLDS, block_sizes=BLOCK_SIZES, draft_steps=DRAFT_STEPS) -> list[Setting]:
    """Every mode of `MODES`: AR (the reference), mock-AR, and at every block size diffusion at
    every threshold and speculative decoding at every number of draft steps."""
    values = {"confidence_threshold": [float(t) for t in thresholds], "draft_steps": [int(d) for d in draft_steps]}
    plain = [Setting(name) for name, mode in MODES.items() if not mode.uses_diffusion]
    return plain + [Setting(name, int(b), **{mode.swept: v}) for name, mode in MODES.items() if mode.uses_diffusion
                    for b in block_sizes for v in values[mode.swept]]


# ---------------------------------------------------------------- prompts

def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_prompts(model_dir: Path, prompts_file: str | Path | None = None) -> tuple[list[str], list[Task]]:
    """(story prompts, exact-answer tasks). From `prompts_file` (JSONL: prompt, optional answer and
    kind; rows with an answer are tasks), else the model folder's held-out prompts, else the
    built-in story openings and generated held-out tasks."""
    if prompts_file is not None:
        rows = read_jsonl(prompts_file)
        stories = [r["prompt"] for r in rows if "answer" not in r]
        tasks = [Task(r["prompt"], str(r["answer"]), r.get("kind", "task")) for r in rows if "answer" in r]
        return stories, tasks
    held = Path(model_dir) / "heldout"
    stories = ([r["prompt"] for r in read_jsonl(held / "stories.jsonl")] if (held / "stories.jsonl").exists()
               else list(STORY_OPENINGS))
    tasks = ([Task(r["prompt"], r["answer"], r["kind"]) for r in read_jsonl(held / "tasks.jsonl")]
             if (held / "tasks.jsonl").exists() else make_tasks(FALLBACK_TASKS, 0, "heldout"))
    return stories, tasks


# ---------------------------------------------------------------- measuring

def _warm_up(model, tokenizer, prompt: str, settings: list[Setting]) -> None:
    """One short untimed generation per mode, so one-time start-up costs land on no setting; on the
    compiled path (`twotower.compiled`) one per mode and block size, two blocks long (the second
    advances the context by a block), each of which compiles."""
    key = (lambda s: (s.mode, s.block_size)) if is_compiled(model) else (lambda s: s.mode)
    for s in {key(s): s for s in settings}.values():
        run_generation(model, tokenizer, [prompt], s.mode, 2 * (s.block_size or 1), **s.kwargs())


def run_bench(model, tokenizer, stories: list[str], tasks: list[Task], settings: list[Setting],
              max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 1, progress: bool = True):
    """Generate with every setting for every prompt batch, settings interleaved.

    Returns (rows: one dict of measurements per setting, outputs: {setting: generated token ids
    per prompt, stories first, then tasks})."""
    if Setting("ar") not in settings:
        raise ValueError("the sweep needs the AR setting: it is the reference for speed-up and quality")
    if not stories and not tasks:
        raise ValueError("no prompts to run")
    batches = [("stories", stories[i:i + batch_size]) for i in range(0, len(stories), batch_size)]
    batches += [("tasks", [t.prompt for t in tasks[i:i + batch_size]]) for i in range(0, len(tasks), batch_size)]
    new_tokens = {"stories": max_new_tokens, "tasks": min(TASK_NEW_TOKENS, max_new_tokens)}
    _warm_up(model, tokenizer, batches[0][1][0], settings)
    outputs = {s: {"stories": [], "tasks": []} for s in settings}
    totals = {s: dict(generated_tokens=0, denoiser_forwards=0, context_forwards=0, wall_time=0.0, drafted_tokens=0,
                      accepted_tokens=0, rounds=0) for s in settings}
    latencies = {s: [] for s in settings}
    counts = dict.fromkeys(settings)
    with tqdm(total=len(batches) * len(settings), desc="bench", unit="run", disable=not progress) as bar:
        for i, (kind, prompts) in enumerate(batches):
            turn = i % len(settings)
            for s in settings[turn:] + settings[:turn]:
                bar.set_postfix_str(s.label())
                generated, t = run_generation(model, tokenizer, prompts, s.mode, new_tokens[kind],
                                              batch_size=len(prompts), **s.kwargs())
                outputs[s][kind].extend(generated)
                for key in totals[s]:
                    totals[s][key] += t[key]
                counts[s] = add_counts(counts[s], t["acceptance_counts"])
                latencies[s].append(t["first_block_latency"])
                bar.update()
    rows = [_measurements(model, tokenizer, s, stories, tasks, outputs[s], totals[s], latencies[s])
            for s in settings]
    ar = rows[settings.index(Setting("ar"))]
    for row, s in zip(rows, settings):
        reached, accepted = counts[s]  # `reached` only falls along the block: the zeros end it
        row["acceptance_by_position"] = [a / r for a, r in zip(accepted, reached) if r] or None
        row["speedup_vs_ar"] = row["tokens_per_second"] / ar["tokens_per_second"]
        row["quality_retained"] = quality_retained(row, ar)
    return rows, {s: outputs[s]["stories"] + outputs[s]["tasks"] for s in settings}


def _measurements(model, tokenizer, s: Setting, stories, tasks, out: dict, t: dict, latencies: list) -> dict:
    n = t["generated_tokens"]
    by_kind = {}
    for kind in sorted({task.kind for task in tasks}):
        picked = [(task, g) for task, g in zip(tasks, out["tasks"]) if task.kind == kind]
        by_kind[kind] = task_accuracy(tokenizer, [p[0] for p in picked], [p[1] for p in picked])
    return {
        "mode": s.mode,
        "block_size": s.block_size,
        "confidence_threshold": s.confidence_threshold,
        "steps_per_block": s.block_size if s.draft_steps is None else None,
        "draft_steps": s.draft_steps,
        "acceptance_rate": t["accepted_tokens"] / t["drafted_tokens"] if t["drafted_tokens"] else None,
        "tokens_per_round": (t["accepted_tokens"] + t["rounds"]) / t["rounds"] if t["rounds"] else None,
        "generated_tokens": n,
        "wall_time": t["wall_time"],
        "tokens_per_second": n / t["wall_time"],
        "tokens_per_denoiser_forward": n / t["denoiser_forwards"] if t["denoiser_forwards"] else None,
        "denoiser_forwards_per_token": t["denoiser_forwards"] / n,
        "context_forwards_per_token": t["context_forwards"] / n,
        "first_block_latency": statistics.mean(latencies),
        "task_accuracy": task_accuracy(tokenizer, tasks, out["tasks"]) if tasks else None,
        "accuracy_by_kind": by_kind,
        "story_perplexity": _number(story_quality(model, tokenizer, stories, out["stories"])) if stories else None,
    }


def _number(x: float) -> float | None:
    """None for NaN (nothing to measure), which JSON cannot hold."""
    return None if math.isnan(x) else x


def quality_retained(row: dict, ar: dict) -> float | None:
    """Mean over the task kinds and the stories of the row's score relative to AR's, each ratio
    capped at 1: beating AR on one kind cannot hide a loss on another."""
    ratios = [row["accuracy_by_kind"][k] / a for k, a in ar["accuracy_by_kind"].items() if a > 0]
    if row["story_perplexity"] is not None and ar["story_perplexity"] is not None:
        ratios.append(ar["story_perplexity"] / row["story_perplexity"])
    return statistics.mean(min(r, 1.0) for r in ratios) if ratios else None


def headline(rows: list[dict]) -> dict | None:
    """The diffusion row at the release's setting (block 16, threshold 0.8), if it was measured."""
    return next((r for r in rows if r["mode"] == "diffusion"
                 and (r["block_size"], r["confidence_threshold"]) == HEADLINE), None)


# ---------------------------------------------------------------- reporting

COLUMNS = (
    ("mode", "mode", "{}"), ("block", "block_size", "{}"), ("threshold", "confidence_threshold", "{}"),
    ("draft steps", "draft_steps", "{}"),
    ("tokens/s", "tokens_per_second", "{:.1f}"), ("speed-up vs AR", "speedup_vs_ar", "{:.2f}x"),
    ("tokens/denoiser fwd", "tokens_per_denoiser_forward", "{:.2f}"),
    ("denoiser fwd/token", "denoiser_forwards_per_token", "{:.2f}"),
    ("context fwd/token", "context_forwards_per_token", "{:.2f}"),
    ("first block (ms)", "first_block_latency", "{:.0f}"), ("acceptance", "acceptance_rate", "{:.1%}"),
    ("tokens/round", "tokens_per_round", "{:.2f}"), ("task accuracy", "task_accuracy", "{:.1%}"),
    ("story perplexity", "story_perplexity", "{:.2f}"), ("quality retained", "quality_retained", "{:.1%}"),
)


def markdown_table(rows: list[dict]) -> str:
    def cell(row, key, fmt):
        value = row[key]
        if value is None:
            return "-"
        return fmt.format(value * 1000 if key == "first_block_latency" else value)

    lines = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, key, fmt) for _, key, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str | Path) -> None:
    """PNG of quality retained against speed-up: one curve per block size (thresholds marked
    along it), speculative decoding per number of draft steps (block sizes marked), mock-AR, and
    AR as the reference point (1, 1)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for b in sorted({r["block_size"] for r in rows if r["mode"] == "diffusion"}):
        curve = sorted((r for r in rows if r["mode"] == "diffusion" and r["block_size"] == b
                        and r["quality_retained"] is not None), key=lambda r: r["confidence_threshold"])
        x, y = [r["speedup_vs_ar"] for r in curve], [r["quality_retained"] for r in curve]
        ax.plot(x, y, marker="o", label=f"diffusion, block {b}")
        for r in curve:
            ax.annotate(f"{r['confidence_threshold']:g}", (r["speedup_vs_ar"], r["quality_retained"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    for d in sorted({r["draft_steps"] for r in rows if r["draft_steps"] is not None}):
        curve = sorted((r for r in rows if r["draft_steps"] == d and r["quality_retained"] is not None),
                       key=lambda r: r["block_size"])
        ax.plot([r["speedup_vs_ar"] for r in curve], [r["quality_retained"] for r in curve], marker="^",
                linestyle="--", label=f"speculative, {d} draft step{'s' if d > 1 else ''}")
        for r in curve:
            ax.annotate(f"S={r['block_size']}", (r["speedup_vs_ar"], r["quality_retained"]),
                        textcoords="offset points", xytext=(4, -10), fontsize=7)
    for r in rows:
        if r["mode"] == "mock-ar" and r["quality_retained"] is not None:
            ax.scatter([r["speedup_vs_ar"]], [r["quality_retained"]], marker="s", color="grey", label="mock-AR")
    ax.scatter([1.0], [1.0], marker="*", s=200, color="black", zorder=3, label="AR (reference)")
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("speed-up over AR (generated tokens/s)")
    ax.set_ylabel("quality retained (relative to AR)")
    ax.set_title("TwoTower: quality versus speed (labels: confidence threshold, block size)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
