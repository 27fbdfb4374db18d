"""Training objectives: the vectorised diffusion loss is the loss of the inference path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize, tiny_config
from test_two_tower import build
from twotower import NemotronHForCausalLM
from twotower.objectives import (T_EPS, ar_loss, block_causal_mask, context_block_states, corrupt, diffusion_loss,
                                 diffusion_loss_by_blocks)


@pytest.fixture(scope="module")
def model():
    return build(seed=4, head_std=1.0)


@pytest.mark.parametrize("n,block_size", [(16, 4), (19, 4), (13, 16), (21, 5), (8, 1), (35, 8)])
def test_vectorised_loss_equals_block_by_block_inference_path(model, n, block_size):
    ids = torch.randint(4, 97, (3, n), generator=torch.Generator().manual_seed(n))
    noise = corrupt(ids, 3, torch.Generator().manual_seed(block_size))
    with torch.no_grad():
        fast_sum, fast_n = diffusion_loss(model, ids, block_size, noise=noise)
        slow_sum, slow_n = diffusion_loss_by_blocks(model, ids, *noise, block_size)
    assert int(fast_n) == int(slow_n) > 0
    assert abs(fast_sum.item() / int(fast_n) - slow_sum.item() / int(slow_n)) <= 1e-5


def test_context_block_states_equal_the_cache_at_each_boundary(model):
    ids = torch.randint(4, 97, (2, 13), generator=torch.Generator().manual_seed(0))
    states = context_block_states(model, ids, 4)
    for blk, start in enumerate(range(0, 13, 4)):
        cache = model.encode_context(ids[:, :start]) if start else None
        for i, layer in enumerate(model.context_tower.layers):
            if layer.kind != "mamba":
                continue
            conv, ssm = states[i][0][:, blk], states[i][1][:, blk]
            if cache is None:
                assert not conv.any() and not ssm.any()
            else:
                assert (conv - cache.states[i][0]).abs().max() <= 1e-5
                assert (ssm - cache.states[i][1]).abs().max() <= 1e-5


def test_gradients_reach_only_the_denoiser_side(model):
    model.train()
    model.zero_grad(set_to_none=True)
    ids = torch.randint(4, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    loss, count = diffusion_loss(model, ids, 4, generator=torch.Generator().manual_seed(0))
    (loss / count).backward()
    model.eval()
    assert all(p.grad is None for p in model.context_tower.parameters())
    assert model.context_lm_head.weight.grad is None
    for name in ("denoiser_tower", "lm_head", "t_embedder", "t_block", "scale_shift_tables"):
        # routed experts that no token chose get no gradient; everything else does
        grads = {k: p.grad for k, p in getattr(model, name).named_parameters() if ".experts." not in k}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), name
    assert any(p.grad is not None for k, p in model.denoiser_tower.named_parameters() if ".experts." in k)
    states = context_block_states(model, ids, 4)
    assert not any(t.requires_grad for s in states if s is not None for t in s)


def test_corruption_draws_t_in_range_and_masks_with_probability_t():
    ids = torch.randint(4, 97, (64, 400), generator=torch.Generator().manual_seed(0))
    noisy, masked, t = corrupt(ids, 3, torch.Generator().manual_seed(1))
    assert ((t >= T_EPS) & (t <= 1)).all()
    assert torch.equal(noisy == 3, masked) and torch.equal(noisy[~masked], ids[~masked])
    assert (masked.float().mean(-1) - t).abs().max() < 0.1  # 400 Bernoulli draws per row


def test_block_causal_mask():
    m = block_causal_mask(6, 2)[0, 0].int()
    assert m.tolist() == [
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1],
    ]


def test_ar_loss_is_next_token_cross_entropy():
    torch.manual_seed(0)
    single = randomize(NemotronHForCausalLM(tiny_config()).eval(), seed=2)
    ids = torch.randint(4, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    total, count = ar_loss(single, ids)
    logits = single(ids)
    expected = sum(-F.log_softmax(logits[b, i], -1)[ids[b, i + 1]] for b in range(2) for i in range(8))
    assert count == 16 and abs(total.item() - expected.item()) <= 1e-4
