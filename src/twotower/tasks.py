"""Exact-answer tasks, generated here, for measuring quality as accuracy.

Every task is a short prompt whose continuation has exactly one right answer:

    add       "12+345="                      -> "357"
    copy      "copy red cat sun="            -> "red cat sun"
    reverse   "reverse red cat sun="         -> "sun cat red"
    count     "count cat in cat dog cat="    -> "2"
    recall    "a=cat b=dog c=sun; b="        -> "dog"

The training text of a task is prompt + answer + "\n", and a generation is scored by its first
line. Prompts are split into train and heldout by a hash of the prompt, so a heldout prompt never
appears in training whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

KINDS = ("add", "copy", "reverse", "count", "recall")
WORDS = (
    "cat dog sun red big box cup hat pen map egg bed car bus fox owl pig cow hen bee "
    "ant fish bird milk cake book ball door moon star rain blue tree frog duck ship"
).split()
KEYS = "abcdefghijklmnopqrstuvwxyz"
END = "\n"
HELDOUT_PERCENT = 10  # share of all possible prompts that belong to the heldout split


@dataclass(frozen=True)
class Task:
    prompt: str
    answer: str
    kind: str


def _make(kind: str, rng: random.Random) -> Task:
    """One random task of the given kind."""
    if kind == "add":
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return Task(f"{a}+{b}=", str(a + b), kind)
    if kind in ("copy", "reverse"):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        answer = words if kind == "copy" else words[::-1]
        return Task(f"{kind} {' '.join(words)}=", " ".join(answer), kind)
    if kind == "count":
        target = rng.choice(WORDS)
        # draw from a few words so the target shows up 0 to several times
        pool = [target] + rng.sample([w for w in WORDS if w != target], 2)
        words = [rng.choice(pool) for _ in range(rng.randint(3, 7))]
        return Task(f"count {target} in {' '.join(words)}=", str(words.count(target)), kind)
    if kind == "recall":
        keys = rng.sample(KEYS, rng.randint(2, 4))
        values = [rng.choice(WORDS) for _ in keys]
        asked = rng.randrange(len(keys))
        pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values))
        return Task(f"{pairs}; {keys[asked]}=", values[asked], kind)
    raise ValueError(f"unknown task kind {kind!r}; choose from {KINDS}")


def split_of(prompt: str) -> str:
    """'heldout' for a fixed ~10% of prompts (by hash), 'train' for the rest."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def make_tasks(n: int, seed: int, split: str = "train", kinds: tuple[str, ...] = KINDS) -> list[Task]:
    """`n` distinct tasks of `split`, cycling through `kinds` so each kind gets an equal share.

    The same (n, seed, split, kinds) always gives the same list.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(seed)
    tasks, seen = [], set()
    for _ in range(1000 * n):
        if len(tasks) == n:
            break
        task = _make(kinds[len(tasks) % len(kinds)], rng)
        if task.prompt not in seen and split_of(task.prompt) == split:
            seen.add(task.prompt)
            tasks.append(task)
    if len(tasks) < n:
        raise ValueError(f"could not draw {n} distinct {split} tasks of kinds {kinds}; ask for fewer")
    return tasks


def task_text(task: Task) -> str:
    """The training text of a task: prompt, answer and the end-of-answer newline."""
    return task.prompt + task.answer + END


def score_exact(task: Task, generated_text: str) -> bool:
    """True when the generated continuation's first line, stripped, is exactly the answer."""
    return generated_text.split(END, 1)[0].strip() == task.answer
