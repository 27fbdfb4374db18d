import re

import pytest

from twotower.tasks import KINDS, WORDS, Task, make_tasks, score_exact, task_text


def recompute(task: Task) -> str:
    """The answer worked out again from the prompt alone."""
    body = task.prompt.removesuffix("=")
    if task.kind == "add":
        a, b = body.split("+")
        return str(int(a) + int(b))
    if task.kind == "copy":
        return body.removeprefix("copy ")
    if task.kind == "reverse":
        return " ".join(body.removeprefix("reverse ").split()[::-1])
    if task.kind == "count":
        target, words = re.fullmatch(r"count (\w+) in (.+)", body).groups()
        return str(words.split().count(target))
    if task.kind == "recall":
        pairs, key = body.split("; ")
        return dict(pair.split("=") for pair in pairs.split())[key]
    raise AssertionError(task.kind)


def test_deterministic_per_seed():
    assert make_tasks(100, seed=0) == make_tasks(100, seed=0)
    assert make_tasks(100, seed=0, split="heldout") == make_tasks(100, seed=0, split="heldout")
    assert make_tasks(100, seed=0) != make_tasks(100, seed=1)


def test_train_and_heldout_are_disjoint():
    train = {t.prompt for seed in (0, 1) for t in make_tasks(1000, seed)}
    heldout = {t.prompt for seed in (0, 1) for t in make_tasks(300, seed, split="heldout")}
    assert len(heldout) > 300  # the two seeds drew different prompts
    assert not train & heldout


def test_answers_are_correct_and_prompts_short():
    tasks = make_tasks(500, seed=3) + make_tasks(100, seed=3, split="heldout")
    assert {t.kind for t in tasks} == set(KINDS)
    assert len({t.prompt for t in make_tasks(500, seed=3)}) == 500
    for t in tasks:
        assert t.answer == recompute(t), t
        assert len(t.prompt) < 60
        assert "\n" not in t.prompt + t.answer
    counts = {t.answer for t in tasks if t.kind == "count"}
    assert {"0", "1", "2"} <= counts
    assert all(w.islower() and w.isalpha() for w in WORDS)


def test_task_text_and_score_exact():
    task = Task("12+345=", "357", "add")
    assert task_text(task) == "12+345=357\n"
    assert score_exact(task, "357")
    assert score_exact(task, " 357 \nmore text 999")
    assert not score_exact(task, "35")
    assert not score_exact(task, "3570")
    assert not score_exact(task, "\n357")
    assert not score_exact(task, "")


def test_make_tasks_errors():
    with pytest.raises(ValueError, match="split"):
        make_tasks(5, seed=0, split="test")
    with pytest.raises(ValueError, match="unknown task kind"):
        make_tasks(5, seed=0, kinds=("divide",))
