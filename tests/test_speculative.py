"""Speculative decoding: the rolled-back context cache, greedy outputs equal to AR's, and
sampled outputs distributed as AR's."""

from __future__ import annotations

import pytest
import torch

from conftest import randomize, tiny_config
from twotower import NemotronHForCausalLM
from twotower.evaluate import left_pad
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
