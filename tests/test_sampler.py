"""The block sampler and its unmasking rules on hand-made logits, and the logit filters against
transformers' own warpers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import EpsilonLogitsWarper, EtaLogitsWarper, TopKLogitsWarper, \
    TopPLogitsWarper

from twotower.params import DiffusionParams, SamplingParams
from twotower.sampler import (UNMASKING_RULES, ConfidenceThreshold, FixedSchedule, denoise_step, filter_logits,
                              sample_block)

MASK = 3
GREEDY = SamplingParams()


def logits_for(tokens_and_probs, vocab=8):
    """[n, vocab] logits whose softmax puts probability p on token t (the rest spread evenly)."""
    rows = []
    for token, p in tokens_and_probs:
        probs = torch.full((vocab,), (1 - p) / (vocab - 1))
        probs[token] = p
        rows.append(probs.log())
    return torch.stack(rows)


def test_confidence_rule_counts_confident_positions_within_the_schedule():
    rule = ConfidenceThreshold(0.8)
    masked = torch.tensor([[True, True, True, True]])
    conf = torch.tensor([[0.9, 0.85, 0.5, 0.1]])
    assert rule.commit_count(masked, conf, step=0, steps=4).tolist() == [2]  # two above 0.8
    assert ConfidenceThreshold(0.95).commit_count(masked, conf, 0, 4).tolist() == [1]  # at least one
    assert ConfidenceThreshold(0.95).commit_count(masked, conf, 2, 4).tolist() == [2]  # ceil(4 / 2 steps left)
    assert rule.commit_count(masked, conf, 3, 4).tolist() == [4]  # the last step commits the rest
    assert ConfidenceThreshold(0.0).commit_count(masked, conf, 0, 4).tolist() == [4]


def test_fixed_rule_commits_block_over_steps_per_step_whatever_the_confidence():
    rule = FixedSchedule()
    masked = torch.ones(2, 16, dtype=torch.bool)
    sure = torch.ones(2, 16)
    counts = [rule.commit_count(masked[:, :16 - 4 * s], sure[:, :16 - 4 * s], s, 4).tolist() for s in range(4)]
    assert counts == [[4, 4]] * 4
    assert rule.commit_count(masked[:, :5], sure[:, :5], 0, 2).tolist() == [3, 3]  # ceil(5 / 2)


def test_denoise_step_commits_the_most_confident_and_never_the_mask_token():
    x = torch.tensor([[MASK, 7, MASK, MASK]])
    # position 0: the mask token is the most likely, so token 5 is predicted (0.75 once the mask is out)
    logits = torch.stack([logits_for([(MASK, 0.6)])[0].index_fill(0, torch.tensor([5]), math.log(0.3)),
                          logits_for([(4, 0.95)])[0], logits_for([(6, 0.85)])[0]])
    new, committed = denoise_step(x, logits, ConfidenceThreshold(0.9), 0, 4, MASK, GREEDY)
    assert new.tolist() == [[MASK, 7, 4, MASK]] and committed.tolist() == [[False, False, True, False]]
    new, committed = denoise_step(x, logits, FixedSchedule(), 1, 3, MASK, GREEDY)  # ceil(3 / 2) = 2
    assert new.tolist() == [[MASK, 7, 4, 6]] and committed.tolist() == [[False, False, True, True]]
    new, _ = denoise_step(x, logits, FixedSchedule(), 2, 3, MASK, GREEDY)  # last step: all
    assert new.tolist() == [[5, 7, 4, 6]]


@pytest.mark.parametrize("rule,forwards", [(ConfidenceThreshold(0.5), 1), (FixedSchedule(), 4)])
def test_sample_block_calls_denoise_until_the_block_is_full(rule, forwards):
    """denoise(x, t) predicts token 10 + position with probability 0.9, and records its t."""
    seen = []

    def denoise(x, t):
        seen.append(t.tolist())
        masked = (x == MASK).nonzero()
        return logits_for([(10 + int(j), 0.9) for _, j in masked], vocab=32)

    steps = []
    x = torch.full((2, 8), MASK)
    out = sample_block(denoise, rule, x, 4, MASK, GREEDY, on_step=lambda s, x, c: steps.append(int(c.sum())))
    assert out.tolist() == [list(range(10, 18))] * 2
    assert len(seen) == forwards and seen[0] == [1.0, 1.0]
    assert sum(steps) == 16 and (forwards == 1 or seen[1] == [0.75, 0.75])


def test_rules_are_registered_and_built_from_the_diffusion_settings():
    assert set(UNMASKING_RULES) >= {"confidence", "fixed"}
    assert DiffusionParams(confidence_threshold=0.3).rule() == ConfidenceThreshold(0.3)
    assert DiffusionParams(unmasking="fixed").rule() == FixedSchedule()
    with pytest.raises(ValueError, match="unmasking"):
        DiffusionParams(unmasking="random")


@pytest.mark.parametrize("settings,warpers", [
    (dict(top_k=5), [TopKLogitsWarper(5)]),
    (dict(top_p=0.7), [TopPLogitsWarper(0.7)]),
    (dict(epsilon_cutoff=0.02), [EpsilonLogitsWarper(0.02)]),
    (dict(eta_cutoff=0.05), [EtaLogitsWarper(0.05)]),
    (dict(top_k=20, top_p=0.9, epsilon_cutoff=0.01, eta_cutoff=0.02),
     [TopKLogitsWarper(20), TopPLogitsWarper(0.9), EpsilonLogitsWarper(0.01), EtaLogitsWarper(0.02)]),
])
def test_filters_keep_the_tokens_transformers_keeps(settings, warpers):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 2
    ours = filter_logits(logits, SamplingParams(temperature=1.0, **settings))
    theirs = logits
    for warper in warpers:
        theirs = warper(None, theirs)
    assert torch.equal(ours.isfinite(), theirs.isfinite())
    assert torch.equal(ours[ours.isfinite()], logits[ours.isfinite()])
    assert bool(ours.isfinite().any(-1).all())
