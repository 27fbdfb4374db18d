"""Training objectives: the vectorised diffusion loss is the loss of the inference path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize, tiny_config
from test_two_tower import build
from twotower import NemotronHForCausalLM
from twotower.objectives import (T_EPS, ar_loss, block_causal_mask, certainty_sum, context_block_states, corrupt,
                                 diffusion_loss, diffusion_loss_by_blocks, prefix_noise, prompt_loss_mask,
                                 teacher_kl_sum)


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
    states, _ = context_block_states(model, ids, 4)
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
    states, _ = context_block_states(model, ids, 4)
    assert not any(t.requires_grad for s in states if s is not None for t in s)


def test_corruption_draws_t_in_range_and_masks_with_probability_t():
    ids = torch.randint(4, 97, (64, 400), generator=torch.Generator().manual_seed(0))
    noisy, masked, t = corrupt(ids, 3, torch.Generator().manual_seed(1))
    assert ((t >= T_EPS) & (t <= 1)).all()
    assert torch.equal(noisy == 3, masked) and torch.equal(noisy[~masked], ids[~masked])
    assert (masked.float().mean(-1) - t).abs().max() < 0.1  # 400 Bernoulli draws per row


def test_prefix_noise_keeps_a_clean_prefix_of_every_block():
    """Every block of a row keeps the same first j tokens clean, j in 0..L-1, the rest masked; t is
    the masked fraction of a block, as the sampler's block_time gives."""
    masked, t = prefix_noise(400, 12, 4, torch.Generator().manual_seed(0))
    j = 4 - masked[:, :4].sum(-1)
    for row, jr, tr in zip(masked.tolist(), j.tolist(), t.tolist()):
        assert row == ([False] * jr + [True] * (4 - jr)) * 3
        assert tr == (4 - jr) / 4
    assert sorted(set(j.tolist())) == [0, 1, 2, 3]  # every prefix length is drawn (400 rows)


def test_corruption_mixes_prefix_noise_into_a_fraction_of_rows():
    ids = torch.randint(4, 97, (400, 16), generator=torch.Generator().manual_seed(0))
    # none: the draws are the plain ones, unchanged
    plain = corrupt(ids, 3, torch.Generator().manual_seed(1))
    off = corrupt(ids, 3, torch.Generator().manual_seed(1), prefix_fraction=0.0, block_size=8)
    assert all(torch.equal(a, b) for a, b in zip(plain, off))
    # all rows: prefix noise, never at a prompt's positions
    loss_mask = prompt_loss_mask(ids, 8)
    noisy, masked, t = corrupt(ids, 3, torch.Generator().manual_seed(1), loss_mask=loss_mask, prefix_fraction=1.0,
                               block_size=8)
    assert not masked[:, :8].any() and torch.equal(noisy == 3, masked)
    clean = 8 - masked[:, 8:].sum(-1)
    assert torch.equal(masked[:, 8:], torch.arange(8)[None, :] >= clean[:, None])
    assert torch.equal(t, (8 - clean).float() / 8)
    # half the rows: about half are prefix-shaped (a uniform row is one with probability far below 1/2)
    _, masked, _ = corrupt(ids, 3, torch.Generator().manual_seed(2), prefix_fraction=0.5, block_size=8)
    shaped = [row[:8] == row[8:] and row[:8] == sorted(row[:8]) for row in masked.int().tolist()]
    assert 0.4 < sum(shaped) / len(shaped) < 0.75
    with pytest.raises(ValueError, match="block size"):
        corrupt(ids, 3, prefix_fraction=0.5)


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
    logits = single(ids).logits
    expected = sum(-F.log_softmax(logits[b, i], -1)[ids[b, i + 1]] for b in range(2) for i in range(8))
    assert count == 16 and abs(total.item() - expected.item()) <= 1e-4


def test_prompt_positions_are_never_masked_nor_scored(model):
    """A distillation row's prompt (here 8 tokens, then 8 of continuation) stays clean: t = 1 masks
    every other position, and the loss is the hand-computed cross-entropy of the continuation
    alone, from the denoiser's logits on the inference path."""
    ids = torch.randint(4, 97, (3, 16), generator=torch.Generator().manual_seed(5))
    loss_mask = prompt_loss_mask(ids, 8)
    assert loss_mask.tolist() == [[False] * 8 + [True] * 8] * 3
    noisy, masked, t = corrupt(ids, 3, torch.Generator().manual_seed(0), t=torch.ones(3), loss_mask=loss_mask)
    assert torch.equal(masked, loss_mask) and torch.equal(noisy[:, :8], ids[:, :8])
    drawn = corrupt(ids, 3, torch.Generator().manual_seed(1), loss_mask=loss_mask)[1]  # t drawn: still clean
    assert not drawn[:, :8].any() and drawn[:, 8:].any()
    with torch.no_grad():
        total, count = diffusion_loss(model, ids, 8, noise=(noisy, masked, t))
        context = model.encode_context(ids[:, :8])
        logits = model.denoise_block(noisy[:, 8:], t, context)
    expected = sum(-F.log_softmax(logits[b, j], -1)[ids[b, 8 + j]] for b in range(3) for j in range(8))
    assert int(count) == 24 and abs(total.item() - expected.item()) <= 1e-4
    # noise drawn by the loss itself (none given) follows the loss mask too: as many targets as masked
    # continuation positions
    g = torch.Generator().manual_seed(2)
    _, n = diffusion_loss(model, ids, 8, generator=g, loss_mask=loss_mask)
    assert int(n) == int(corrupt(ids, 3, torch.Generator().manual_seed(2), loss_mask=loss_mask)[1].sum())


def test_certainty_sum_is_the_entropy_of_right_predictions():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    targets = torch.tensor([0, 1, 0, 2])  # right, wrong, right (argmax of a tie: the first), right

    def entropy(row):
        p = [math.exp(x) for x in row]
        p = [x / sum(p) for x in p]
        return -sum(x * math.log(x) for x in p)

    expected = entropy([2, 0, 0]) + entropy([1, 1, 0]) + entropy([0, 0, 5])
    assert abs(certainty_sum(logits, targets).item() - expected) <= 1e-6
    assert certainty_sum(logits, torch.tensor([1, 0, 2, 0])).item() == 0.0  # nothing right: no term


def test_certainty_weight_adds_the_certainty_of_the_masked_positions(model):
    """One all-masked block of 8: the targets are the denoiser's own predictions at even positions
    (right) and something else at odd ones (wrong); the term is the entropy at the even ones."""
    t = torch.ones(2)
    with torch.no_grad():
        logits = model.denoise_block(torch.full((2, 8), 3), t, model.context_tower.new_cache())
    pred = logits.argmax(-1)
    ids = torch.where(torch.arange(8) % 2 == 0, pred, (pred + 1) % 97)
    noise = (torch.full_like(ids, 3), torch.ones_like(ids, dtype=torch.bool), t)
    with torch.no_grad():
        plain, count = diffusion_loss(model, ids, 8, noise=noise)
        forced, _ = diffusion_loss(model, ids, 8, noise=noise, certainty_weight=0.7)
    probs = logits[:, ::2].softmax(-1)
    by_hand = -(probs * probs.log()).sum()
    assert int(count) == 16 and by_hand > 0
    assert abs((forced - plain).item() - 0.7 * by_hand.item()) <= 1e-4


def test_teacher_kl_sum_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])

    def probs(row):
        p = [math.exp(x) for x in row]
        return [x / sum(p) for x in p]

    expected = sum(sum(q * math.log(q / p) for q, p in zip(probs(t), probs(s)))
                   for t, s in zip(teacher.tolist(), logits.tolist()))
    assert expected > 0
    assert abs(teacher_kl_sum(logits, teacher).item() - expected) <= 1e-6
    assert abs(teacher_kl_sum(teacher, teacher).item()) <= 1e-6  # the same distribution: nothing to learn


def test_ar_kl_weight_adds_the_kl_from_the_context_towers_next_token_prediction(model):
    """Masked positions 0, 3, 5 of row 0 and 2, 7 of row 1: the term is the KL from the context
    tower's logits at the position before each (the causal LM's own forward), none for position 0."""
    ids = torch.randint(4, 97, (2, 8), generator=torch.Generator().manual_seed(3))
    masked = torch.zeros(2, 8, dtype=torch.bool)
    masked[0, [0, 3, 5]] = True
    masked[1, [2, 7]] = True
    t = masked.float().mean(-1)
    noise = (torch.where(masked, 3, ids), masked, t)
    with torch.no_grad():
        plain, count = diffusion_loss(model, ids, 8, noise=noise)
        with_kl, _ = diffusion_loss(model, ids, 8, noise=noise, ar_kl_weight=0.3)
        student = model.denoise_block(noise[0], t, model.context_tower.new_cache())  # one block: no context
        ar = model(ids).logits  # the context tower and its head, causal
    by_hand = sum(teacher_kl_sum(student[r, i][None], ar[r, i - 1][None]) for r, i in [(0, 3), (0, 5), (1, 2), (1, 7)])
    assert int(count) == 5 and by_hand > 0
    assert abs((with_kl - plain).item() - 0.3 * by_hand.item()) <= 1e-4
