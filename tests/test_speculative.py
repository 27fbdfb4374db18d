"""Speculative decoding: the rolled-back context cache, greedy outputs equal to AR's, and
sampled outputs distributed as AR's."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from importlib.resources import files

import pytest
import torch
from scipy.stats import chi2

from conftest import randomize, tiny_config
from test_two_tower import build
from twotower import NemotronHForCausalLM, load_default
from twotower.evaluate import add_counts, left_pad
from twotower.generation import GenerationStats, RowStreamer, StopGeneration, acceptance_counts, through_eos
from twotower.modes import get_mode, run_mode
from twotower.params import SamplingParams
from twotower.sampler import token_probs
from twotower.ssd import ssd_sequential, ssd_state_after

# ---------------------------------------------------------------- rolling the context back


@pytest.mark.parametrize("with_state", [False, True])
def test_state_after_a_prefix_equals_the_recurrence_over_it(with_state):
    g = torch.Generator().manual_seed(0)
    b, l, h, p, gr, n = 4, 11, 4, 3, 2, 5
    x, B = torch.randn(b, l, h, p, generator=g), torch.randn(b, l, gr, n, generator=g)
    dt, A = torch.rand(b, l, h, generator=g) * 0.3, -torch.rand(h, generator=g) * 3
    state = torch.randn(b, h, p, n, generator=g) if with_state else None
    lengths = torch.tensor([0, 1, 6, 11])
    got = ssd_state_after(x, dt, A, B, lengths, state)
    for r, a in enumerate(lengths.tolist()):
        init = None if state is None else state[r:r + 1]
        if a == 0:
            want = torch.zeros(1, h, p, n) if init is None else init
        else:
            want = ssd_sequential(x[r:r + 1, :a], dt[r:r + 1, :a], A, B[r:r + 1, :a], B[r:r + 1, :a], init)[1]
        torch.testing.assert_close(got[r:r + 1], want, rtol=1e-5, atol=1e-5)


def real_entries(cache, row):
    """Row `row` of a cache with its padding dropped: K/V at real positions, Mamba states."""
    real = slice(None) if cache.pad_mask is None else cache.pad_mask[row]
    out = []
    for s in cache.states:
        if s is None:
            continue
        k, v = s
        out += [k[row][:, real], v[row][:, real]] if k.dim() == 4 else [k[row], v[row]]
    return out


@pytest.mark.parametrize("pattern", ["M*EM-E*M", "*M", "MM"])
def test_kept_prefixes_equal_a_cache_built_from_scratch(pattern):
    """Ragged prompts (left padding), a tentative 6-token chunk, each row keeping a different
    prefix: the cache equals one built by a fresh forward over the kept tokens (<= 1e-5), and
    continuing from either gives the same hidden states."""
    torch.manual_seed(0)
    tower = randomize(NemotronHForCausalLM(tiny_config(pattern)).eval(), seed=3).backbone
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 97, (n,), generator=g).tolist() for n in (5, 9, 2, 7)]
    chunk = torch.randint(4, 97, (4, 6), generator=g)
    lengths = torch.tensor([6, 1, 3, 6])
    ids, mask = left_pad(prompts, 0)
    with torch.no_grad():
        cache = tower.new_cache()
        tower(ids, cache, mask)
        tower(chunk, cache, tentative=True)
        cache.keep_prefixes(lengths)
        fresh = tower.new_cache()
        ids2, mask2 = left_pad([p + chunk[r, :a].tolist() for r, (p, a) in enumerate(zip(prompts, lengths))], 0)
        tower(ids2, fresh, mask2)
        assert cache.length == ids2.shape[1] and torch.equal(cache.pad_mask, mask2.bool())
        for row in range(4):
            for got, want in zip(real_entries(cache, row), real_entries(fresh, row), strict=True):
                torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-5)
        more = torch.randint(4, 97, (4, 3), generator=g)
        torch.testing.assert_close(tower(more, cache), tower(more, fresh), rtol=1e-5, atol=1e-5)


def test_keep_prefixes_checks_its_input():
    tower = NemotronHForCausalLM(tiny_config("M*")).eval().backbone
    cache = tower.new_cache()
    with torch.no_grad():
        tower(torch.tensor([[5, 6]]), cache)
        with pytest.raises(ValueError, match="tentative forward"):
            cache.keep_prefixes(torch.tensor([1]))
        tower(torch.tensor([[7, 8, 9]]), cache, tentative=True)
        with pytest.raises(ValueError, match="keep_prefixes"):
            tower(torch.tensor([[7]]), cache)
        with pytest.raises(ValueError, match=r"in \[1, 3\]"):
            cache.keep_prefixes(torch.tensor([4]))


# ---------------------------------------------------------------- greedy: AR's tokens

def small_vocab_model(pattern="M*EM-E*M", seed=0, vocab_size=12):
    """A random two-tower model over a vocabulary of 12 (8 ordinary tokens), so that drafts are
    often accepted and rows of a batch keep different prefixes."""
    return build(seed=seed, head_std=2.0, pattern=pattern, vocab_size=vocab_size)


def ragged_prompts(seed, lengths=(3, 7, 1, 5), vocab_size=12):
    g = torch.Generator().manual_seed(seed)
    return left_pad([torch.randint(4, vocab_size, (n,), generator=g).tolist() for n in lengths], 0)


@pytest.mark.parametrize("pattern", ["M*EM-E*M", "*E", "M-"])
@pytest.mark.parametrize("block_size,draft_steps", [(1, 1), (2, 3), (5, 2), (8, 1), (8, 3)])
def test_greedy_equals_ar_token_for_token(pattern, block_size, draft_steps, device):
    model = small_vocab_model(pattern).to(device)
    ids, mask = (None if t is None else t.to(device) for t in ragged_prompts(block_size))
    kw = dict(attention_mask=mask, max_new_tokens=19)
    ar = model.generate_ar(ids, **kw)
    spec = model.generate_speculative(ids, block_size=block_size, draft_steps=draft_steps,
                                      return_dict_in_generate=True, **kw)
    reference = model.generate_speculative(ids, block_size=block_size, draft_steps=draft_steps, use_cache=False, **kw)
    assert spec.sequences.tolist() == ar.tolist() == reference.tolist()
    if block_size >= 5:  # drafts were accepted, by rows in different numbers in some round
        rounds = list(zip(*(r.accepted_per_round for r in spec.stats.speculation)))
        assert spec.stats.accepted_tokens > 0 and any(len(set(r)) > 1 for r in rounds)


@pytest.mark.parametrize("draft_steps", [1, 3])
def test_greedy_with_eos_equals_ar(draft_steps):
    model = small_vocab_model(seed=1)
    ids, mask = ragged_prompts(4)
    free = model.generate_ar(ids, attention_mask=mask, max_new_tokens=16)[:, ids.shape[1]:]
    eos = int(free[1, 4])  # a token row 1 produces early
    kw = dict(attention_mask=mask, max_new_tokens=16, eos_token_id=eos)
    ar = model.generate_ar(ids, **kw)
    spec = model.generate_speculative(ids, block_size=6, draft_steps=draft_steps, **kw)
    assert spec.tolist() == ar.tolist()
    assert (spec[:, ids.shape[1]:] == eos).any()


def test_embedded_model_equals_ar_on_held_out_prompts():
    model, tokenizer = load_default()
    held = files("twotower") / "default_model" / "heldout"
    stories = [json.loads(line)["prompt"] for line in (held / "stories.jsonl").read_text().splitlines()[:3]]
    tasks = [json.loads(line)["prompt"] for line in (held / "tasks.jsonl").read_text().splitlines()[:2]]
    ids, mask = left_pad([tokenizer(p).input_ids for p in stories + tasks], tokenizer.pad_token_id)
    kw = dict(attention_mask=mask, max_new_tokens=24, eos_token_id=tokenizer.eos_token_id)
    ar = model.generate_ar(ids, **kw)
    for block_size, draft_steps in [(4, 1), (16, 2)]:
        spec = model.generate_speculative(ids, block_size=block_size, draft_steps=draft_steps,
                                          return_dict_in_generate=True, **kw)
        assert spec.sequences.tolist() == ar.tolist(), (block_size, draft_steps)
        assert spec.stats.tokens_per_round > 1.5  # the trained denoiser's drafts are often right


# ---------------------------------------------------------------- sampling: AR's distribution

def ar_distribution(model, prompt: list[int], n: int, sampling: SamplingParams) -> dict[tuple, float]:
    """The exact probability of every n-token continuation under AR sampling (temperature, top-k,
    top-p), by expanding the tree of continuations with nonzero probability."""
    paths = {(): 1.0}
    for _ in range(n):
        prefixes = list(paths)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1]
        probs = token_probs(logits, sampling)
        paths = {p + (t,): paths[p] * float(probs[i, t]) for i, p in enumerate(prefixes)
                 for t in probs[i].nonzero()[:, 0].tolist()}
    return paths


def chi_square_p_value(samples: list[tuple], expected: dict[tuple, float]) -> float:
    """Pearson's goodness of fit of the samples to `expected`; bins expecting fewer than 5
    samples are pooled into one."""
    n, counts = len(samples), Counter(samples)
    assert set(counts) <= set(expected), "a continuation AR can never produce"
    big = [s for s, p in expected.items() if p * n >= 5]
    observed = [counts[s] for s in big] + [n - sum(counts[s] for s in big)]
    wanted = [expected[s] * n for s in big] + [n - sum(expected[s] * n for s in big)]
    if wanted[-1] < 5:  # too little to pool: fold the rest into the smallest bin
        observed, wanted = observed[:-1], wanted[:-1]
        observed[-1] += n - sum(observed)
        wanted[-1] += n - sum(wanted)
    statistic = sum((o - w) ** 2 / w for o, w in zip(observed, wanted))
    return float(chi2.sf(statistic, len(observed) - 1))


@pytest.mark.parametrize("sampling,draft_steps", [
    (SamplingParams(1.0, top_k=3), 1),
    (SamplingParams(0.7, top_k=3, top_p=0.9), 2),
    (SamplingParams(1.3, top_k=3), 3),
])
def test_sampled_continuations_are_distributed_as_ar(sampling, draft_steps):
    """4,000 rows of one batch (independent draws from one seeded generator), 4 tokens each: the
    first from the prompt, then a round of 2 drafts and one AR token. Their joint distribution
    fits AR's exact one (chi-square, significance 0.001), and the same test rejects the
    distribution of AR at another temperature (it can fail)."""
    model = small_vocab_model(seed=3, vocab_size=8)
    prompt, n, rows = [5, 7, 4, 6], 4, 4000
    out = model.generate_speculative(torch.tensor([prompt] * rows), max_new_tokens=n, block_size=4,
                                     draft_steps=draft_steps, sampling=replace(sampling, seed=0),
                                     return_dict_in_generate=True)
    samples = [tuple(row) for row in out.sequences[:, len(prompt):].tolist()]
    assert chi_square_p_value(samples, ar_distribution(model, prompt, n, sampling)) > 1e-3
    stats = out.stats
    assert 0 < stats.accepted_tokens < stats.drafted_tokens  # accepted some, rejected some
    other = replace(sampling, temperature=sampling.temperature * 1.5)
    assert chi_square_p_value(samples, ar_distribution(model, prompt, n, other)) < 1e-6


# ---------------------------------------------------------------- statistics, streaming, callbacks

def test_acceptance_counts_by_hand():
    """Rounds as (drafted, accepted): a draft position is reached when the drafts before it were all
    accepted and it was drafted; lists from several calls add up position by position."""
    reached, accepted = acceptance_counts([(3, 0), (3, 2), (3, 3), (1, 1), (0, 0)])
    # position 1: all four rounds that drafted one; 2: the rounds that accepted draft 1 and drafted a
    # second, (3, 2) and (3, 3); 3: the same two; accepted there: only (3, 3)
    assert (reached, accepted) == ([4, 2, 2], [3, 2, 1])
    assert acceptance_counts([]) == ([], [])
    assert add_counts((reached, accepted), ([1], [0])) == ([5, 2, 2], [3, 2, 1])
    assert add_counts(None, ([1], [0])) == ([1], [0])
    with pytest.raises(ValueError, match="accepts 0 to 2"):
        acceptance_counts([(2, 3)])


def test_statistics_callback_and_lockstep_streaming():
    """Counts against hooks and the step callback; a RowStreamer gets each row's own tokens through
    its EOS although rows of a round commit different numbers; the call can end early."""
    model = small_vocab_model(seed=1)
    ids, mask = ragged_prompts(4)
    free = model.generate_ar(ids, attention_mask=mask, max_new_tokens=18)[:, ids.shape[1]:]
    eos = int(free[2, 6])
    steps, calls = [], {"denoiser": 0}
    hook = model.denoiser_tower.embeddings.register_forward_hook(
        lambda *a: calls.__setitem__("denoiser", calls["denoiser"] + 1))
    got = [[] for _ in range(4)]
    streamer = RowStreamer(4, lambda row, tokens: got[row].extend(tokens), lambda row: False, eos)
    try:
        out = model.generate_speculative(ids, attention_mask=mask, max_new_tokens=18, block_size=5, draft_steps=2,
                                         eos_token_id=eos, streamer=streamer, step_callback=steps.append,
                                         return_dict_in_generate=True)
    finally:
        hook.remove()
    stats, new = out.stats, out.sequences[:, ids.shape[1]:].tolist()
    assert stats.denoiser_forwards == calls["denoiser"] == len(steps) > 0
    assert all(0 <= s.step < 2 and s.tokens.shape == s.committed.shape for s in steps)
    for row in range(4):
        assert through_eos(got[row], eos)[0] == through_eos(new[row], eos)[0]
        r = stats.speculation[row]
        assert 0 <= r.accepted <= r.drafted <= 4 * r.rounds  # at most block_size - 1 drafts a round
        assert len(r.drafted_per_round) == r.rounds and all(d <= 4 for d in r.drafted_per_round)
    reached, accepted = stats.acceptance_counts  # every accepted draft counted once, at its position
    assert sum(accepted) == stats.accepted_tokens and reached[0] <= stats.rounds
    assert all(a <= r for a, r in zip(accepted, reached)) and reached == sorted(reached, reverse=True)
    assert stats.rounds == sum(r.rounds for r in stats.speculation) > 0
    assert stats.tokens_per_round == pytest.approx((stats.accepted_tokens + stats.rounds) / stats.rounds)
    assert stats.generated_tokens == sum(len(through_eos(row, eos)[0]) for row in new)

    taken = []  # a streamer that wants 3 tokens ends the call; the counts so far remain
    partial = GenerationStats()
    with pytest.raises(StopGeneration):
        model.generate_speculative(ids[:1], max_new_tokens=18, block_size=5, stats=partial, streamer=RowStreamer(
            1, lambda row, tokens: taken.extend(tokens), lambda row: len(taken) >= 3, None))
    assert 3 <= len(taken) < 18 and taken == model.generate_ar(ids[:1], max_new_tokens=18)[0, 7:7 + len(taken)].tolist()
    assert 0 < partial.rounds and partial.context_forwards > 0


@pytest.mark.parametrize("bad,match", [
    (dict(draft_steps=0), "draft_steps"),
    (dict(block_size=0), "block_size"),
    (dict(confidence_threshold=1.5), "confidence_threshold"),
    (dict(mask_token_id=500), "outside the vocabulary"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_arguments_are_clear_errors(bad, match):
    model = small_vocab_model()
    kw = {"max_new_tokens": 4, **bad}
    with pytest.raises(ValueError, match=match):
        model.generate_speculative(torch.tensor([[5, 6]]), **kw)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        model.generate_speculative(torch.tensor([[5, 6]]), drafts=2)


def test_model_generate_and_run_mode_select_speculative():
    model = small_vocab_model()
    ids, mask = ragged_prompts(2)
    ar = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    assert model.generate(ids, attention_mask=mask, max_new_tokens=10, mode="speculative", block_size=4,
                          draft_steps=2).tolist() == ar.tolist()
    assert run_mode(model, "speculative", ids, 10, attention_mask=mask, block_size=6, eos_token_id=2).tolist() == ar.tolist()
    assert get_mode("speculative").uses_diffusion and get_mode("speculative").swept == "draft_steps"
