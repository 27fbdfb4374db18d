"""The compiled decoding path (`twotower.compiled`) against the eager one: the same tokens in every
mode, logits within float tolerance, no new graph for a new prompt length, and the MoE's in-graph
expert mix against the eager dispatch."""

from __future__ import annotations

import copy
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import randomize, tiny_config

from twotower import GenerateOptions, TwoTowerConfig, TwoTowerForCausalLM
from twotower.compiled import compile_for_decoding, compile_seconds, is_compiled
from twotower.modes import MODES, run_mode
from twotower.moe import MoE, dense_mix, grouped_mix

needs_compiler = pytest.mark.skipif(
    (shutil.which("g++") is None and shutil.which("c++") is None)
    or not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists(),
    reason="torch.compile on CPU builds C++ extensions: it needs a C++ compiler and Python's headers")

BLOCK = 4


def two_tower(seed: int = 0) -> TwoTowerForCausalLM:
    config = TwoTowerConfig(**tiny_config("M*E").to_dict(), block_size=BLOCK)
    return randomize(TwoTowerForCausalLM(config).eval(), seed=seed, head_std=4.0)


def ragged_batch(lengths, seed: int = 0):
    """Prompts of the given lengths, left-padded: (ids [b, n], attention_mask [b, n])."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, n - length:] = torch.randint(4, 97, (length,), generator=g)
        mask[row, n - length:] = 1
    return ids, mask


@pytest.fixture(scope="module")
def models():
    """(eager, compiled): the same weights, the second on the compiled path."""
    eager = two_tower()
    fast = compile_for_decoding(copy.deepcopy(eager))
    yield eager, fast
    torch.compiler.reset()


@needs_compiler
@pytest.mark.parametrize("mode", list(MODES))
def test_compiled_generation_gives_the_eager_tokens(models, mode):
    eager, fast = models
    ids, mask = ragged_batch([5, 9])
    want = run_mode(eager, mode, ids, 12, attention_mask=mask, block_size=BLOCK, return_dict_in_generate=True)
    got = run_mode(fast, mode, ids, 12, attention_mask=mask, block_size=BLOCK, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    if mode == "speculative":  # drafted and accepted as counted on the eager path
        assert [(r.drafted, r.accepted_per_round) for r in got.stats.speculation] == \
            [(r.drafted, r.accepted_per_round) for r in want.stats.speculation]


@needs_compiler
def test_compiled_forwards_match_eager_logits(models):
    eager, fast = models
    ids, mask = ragged_batch([6, 11], seed=1)
    block = torch.tensor([[3, 50, 3, 60], [70, 3, 3, 3]])
    token, committed = torch.tensor([[40], [41]]), torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    with torch.no_grad():
        outputs = []
        for model in (eager, fast):
            context = model.encode_context(ids, mask)
            decode = model.context_lm_head(model.context_tower(token, context.clone())[:, -1])
            denoise = model.denoise_block(block, torch.tensor([0.5, 0.9]), context, positions=block == 3)
            advanced = context.clone()
            advance = model.context_tower(committed, advanced)
            outputs.append((decode, denoise, advance, advanced.states[1][0], advanced.states[0][1]))
    for want, got in zip(*outputs):  # logits, hidden states, K and the SSM state after the block
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_compiler
def test_a_new_prompt_length_compiles_nothing(models):
    _, fast = models
    for mode in ("ar", "diffusion", "speculative"):
        ids, mask = ragged_batch([4, 7], seed=2)
        run_mode(fast, mode, ids, 8, attention_mask=mask, block_size=BLOCK)  # compiles what is not yet
    torch.compiler.set_stance("fail_on_recompile")
    try:
        for lengths in ([2, 3], [10, 17], [25, 6]):
            ids, mask = ragged_batch(lengths, seed=sum(lengths))
            for mode in ("ar", "diffusion", "speculative"):
                run_mode(fast, mode, ids, 8, attention_mask=mask, block_size=BLOCK)
    finally:
        torch.compiler.set_stance("default")


@needs_compiler
def test_generate_compile_option_switches_the_path_on_and_reports_compile_time():
    model = two_tower(seed=3)
    ids = torch.tensor([[5, 6, 7]])
    out = model.generate_ar(ids, max_new_tokens=3, return_dict_in_generate=True)
    assert not is_compiled(model) and out.stats.compile_seconds == 0.0
    out = model.generate_ar(ids, max_new_tokens=3, return_dict_in_generate=True, compile=True)
    assert is_compiled(model)
    assert 0 < out.stats.compile_seconds <= out.stats.wall_time
    assert compile_seconds(model) == pytest.approx(out.stats.compile_seconds)
    again = model.generate_ar(ids, max_new_tokens=3, return_dict_in_generate=True, compile=True)
    assert again.stats.compile_seconds == 0.0  # compiled once
    assert torch.equal(again.sequences, out.sequences)


def test_compile_option_must_be_a_bool():
    with pytest.raises(ValueError, match="compile must be True or False"):
        GenerateOptions(compile="yes")


@pytest.mark.parametrize("tokens", [1, 3, 16])  # chosen experts only (t * k < experts), every expert
@pytest.mark.parametrize("bias", [False, True])
def test_in_graph_expert_mix_matches_the_eager_dispatch(tokens, bias):
    config = tiny_config("E", mlp_bias=bias)
    moe = randomize(MoE(config), seed=tokens)
    flat = torch.randn(tokens, config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ids, weights = moe.gate(flat)
        want = grouped_mix(moe.experts, flat, ids, weights)
        got = dense_mix(moe.experts, flat, ids, weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_packed_experts_are_the_same_parameters_and_stay_packed(tmp_path):
    model = two_tower(seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compile_for_decoding(model)  # packs every MoE layer's experts
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert moes and all(m.packed_is_current() for m in moes)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    up = moes[0].packed[0]
    assert all(torch.equal(up[e], expert.up_proj.weight) for e, expert in enumerate(moes[0].experts))
    with torch.no_grad():  # an in-place update (an optimizer step, load_state_dict) reaches the packed form
        moes[0].experts[3].up_proj.weight.add_(1.0)
    assert torch.equal(up[3], moes[0].experts[3].up_proj.weight)
    model.save_pretrained(tmp_path)  # views of one tensor are written as separate tensors
    loaded = TwoTowerForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    model.to(torch.bfloat16)  # new parameter tensors: packed again
    assert all(m.packed_is_current() and m.packed[0].dtype == torch.bfloat16 for m in moes)
    moes[1].experts[0].up_proj.weight = torch.nn.Parameter(torch.zeros_like(moes[1].experts[0].up_proj.weight))
    assert not moes[1].packed_is_current()
    model.generate_ar(torch.tensor([[5, 6]]), max_new_tokens=1)  # a generate call on the compiled path repacks
    assert moes[1].packed_is_current() and not moes[1].packed[0][0].any()
