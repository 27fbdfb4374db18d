"""The lm-evaluation-harness adapter: exact AR-tower scoring, stop strings, and local tasks run
through `lm_eval.simple_evaluate` (no downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported: the tasks' data is local

import lm_eval  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from conftest import make_tiny_model_dir  # noqa: E402
from twotower.lm_eval_adapter import TwoTowerLM  # noqa: E402

DATA = Path(__file__).parent / "data"
SETTINGS = dict(mode="diffusion", block_size=8, confidence_threshold=0.8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # seed 1: random weights whose greedy continuations run long enough to hold the stop strings
    # the tests cut at (with seed 0 and the shipped sample text's tokenizer, EOS comes at token 3)
    return make_tiny_model_dir(tmp_path_factory.mktemp("lm-eval-model"), seed=1)


@pytest.fixture(scope="module")
def lm(model_dir):
    return TwoTowerLM(pretrained=str(model_dir), batch_size=3, **SETTINGS)


@torch.no_grad()
def direct_score(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Sum of the AR tower's log-probabilities of `continuation` after `context`, and whether
    each of its tokens is the tower's argmax, from one plain forward."""
    ids = torch.tensor([context + continuation])
    logits = model.context_lm_head(model.context_tower(ids)).float()[0, len(context) - 1:-1]
    target = torch.tensor(continuation)
    logprobs = logits.log_softmax(-1)[torch.arange(len(continuation)), target]
    return float(logprobs.sum()), bool((logits.argmax(-1) == target).all())


def split(lm, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm_eval's split of a request into tokens: the continuation is what the whole adds to the context."""
    if not context:
        return [lm.eot_token_id], lm.tok_encode(continuation)
    whole, head = lm.tok_encode(context + continuation), lm.tok_encode(context)
    return head, whole[len(head):]


def request(kind: str, *args) -> Instance:
    return Instance(kind, {}, tuple(args), 0)


def test_the_registry_gives_the_adapter():
    assert get_model("twotower") is TwoTowerLM


def test_loglikelihood_is_the_ar_towers_sum(lm):
    pairs = [("Once upon a time", " there was a little dog"), ("", "Hello there"), ("Tom saw a", " cat"),
             ("The sun was warm and the birds sang in the trees near the", " house.")]
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        want, want_greedy = direct_score(lm.model, *split(lm, context, continuation))
        assert logprob == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy


def test_rolling_loglikelihood_scores_every_token_once(lm):
    text = "Lily and Ben went to the park. They played on the swings and ate red apples."
    tokens = lm.tok_encode(text)
    [whole] = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    assert whole == pytest.approx(direct_score(lm.model, [lm.eot_token_id], tokens)[0], abs=1e-4)
    before = lm.counts["loglikelihood_rolling"]["tokens"]
    lm.max_length = 6  # windows of 6 tokens: less context, the same tokens scored
    try:
        [windowed] = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    finally:
        lm.max_length = 2048
    assert lm.counts["loglikelihood_rolling"]["tokens"] - before == len(tokens)
    assert windowed != pytest.approx(whole, abs=1e-3)


def test_generate_until_cuts_at_the_first_stop_string_and_stops_early(lm):
    context = "Once upon a time"
    [free] = lm.generate_until([request("generate_until", context, {"until": [], "max_gen_toks": 32})])
    assert len(free) > 6
    first, later = free[2:4], free[5:7]
    before = lm.counts["generate_until"]["tokens"]
    [cut] = lm.generate_until([request("generate_until", context, {"until": [later, first], "max_gen_toks": 256})])
    assert cut == free[:free.find(first)]
    assert lm.counts["generate_until"]["tokens"] - before < 32  # the call ended at the stop, not at 256 tokens
    [single] = lm.generate_until([request("generate_until", context, {"until": later, "max_gen_toks": 256})])
    assert single == free[:free.find(later)]


def test_generate_until_batch_gives_each_row_its_own_answer(lm):
    """Rows of one batch meet the shared stop strings at different points (or never): each gets the
    text it gets alone, cut at its own first stop."""
    contexts = ["Once upon a time", "Tom saw a", "The sun was warm and the birds sang in the"]
    alone = [lm.generate_until([request("generate_until", c, {"until": [], "max_gen_toks": 24})])[0]
             for c in contexts]
    until = [alone[0][3:6], alone[1][9:12]]
    want = [min((text[:text.find(s)] for s in until if s in text), key=len, default=text) for text in alone]
    assert want[0] != alone[0] and want[1] != alone[1]
    got = lm.generate_until([request("generate_until", c, {"until": until, "max_gen_toks": 24}) for c in contexts])
    assert got == want


def test_local_tasks_run_through_simple_evaluate(model_dir, lm, monkeypatch):
    monkeypatch.chdir(DATA)  # the task files name their data relative to their folder
    args = ",".join(f"{k}={v}" for k, v in dict(pretrained=model_dir, **SETTINGS).items())
    out = lm_eval.simple_evaluate(model="twotower", model_args=args, batch_size=2,
                                  tasks=["twotower_local_choice", "twotower_local_answer"],
                                  task_manager=TaskManager(include_path=str(DATA)), log_samples=True)
    results = out["results"]
    docs = [json.loads(line) for line in (DATA / "choice.jsonl").read_text().splitlines()]
    right = 0
    for doc in docs:
        scores = [direct_score(lm.model, *split(lm, doc["question"], " " + c))[0] for c in doc["choices"]]
        right += scores.index(max(scores)) == doc["label"]
    assert results["twotower_local_choice"]["acc,none"] == pytest.approx(right / len(docs))
    assert 0.0 <= results["twotower_local_answer"]["exact_match,none"] <= 1.0
    answers = out["samples"]["twotower_local_answer"]
    assert len(answers) == 3
    for sample in answers:
        [[text]] = sample["resps"]
        assert "\n" not in text and "." not in text


def test_speculative_mode_generates_ar_text(model_dir):
    contexts = ["Once upon a time", "Tom saw a", "The sun was warm and the birds sang in the"]
    requests = [request("generate_until", c, {"until": ["."], "max_gen_toks": 16}) for c in contexts]
    speculative = TwoTowerLM(pretrained=str(model_dir), batch_size=3, mode="speculative", block_size=4, draft_steps=2)
    assert (speculative.diffusion.block_size, speculative.diffusion.draft_steps) == (4, 2)
    ar = TwoTowerLM(pretrained=str(model_dir), batch_size=3, mode="ar")
    assert speculative.generate_until(requests) == ar.generate_until(requests)
    assert speculative.counts["generate_until"]["denoiser_forwards"] > 0
