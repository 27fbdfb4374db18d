"""The two-tower model: cached generation against recompute-from-scratch, the denoiser block
against a direct computation, batching, the commit rule, statistics and the release's layout."""

from __future__ import annotations

import math
import time

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from conftest import randomize, tiny_config
from twotower import NemotronHForCausalLM, TwoTowerConfig, TwoTowerForCausalLM, nemotron_3_nano_30b_config
from twotower.generation import GenerationStats, RowStreamer, StopGeneration
from twotower.modeling import causal_mask
from twotower.modes import MODES as MODE_TABLE
from twotower.modes import run_mode
from twotower.norm import gated_group_rms_norm
from twotower.ssd import ssd_sequential
from twotower.time_conditioning import modulate

MODES = list(MODE_TABLE)


def build(seed=0, head_std=8.0, **overrides):
    torch.manual_seed(seed)
    single = randomize(NemotronHForCausalLM(tiny_config(**overrides)).eval(), seed=seed, head_std=head_std)
    model = TwoTowerForCausalLM.from_single_tower(single).eval()
    # the denoiser side gets weights of its own, so a mix-up of towers cannot go unseen
    randomize(model.denoiser_tower, seed=seed + 100)
    randomize(model.lm_head, seed=seed + 101, head_std=head_std)
    for name in ("t_embedder", "t_block", "scale_shift_tables"):
        randomize(getattr(model, name), seed=seed + 102)
    for table in model.scale_shift_tables:
        table.data.mul_(0.2)
    return model


@pytest.fixture(scope="module")
def model():
    return build(seed=1)


@pytest.fixture(scope="module")
def model_on_device(device):
    """The same model on the tests' device (conftest.requested_device)."""
    return build(seed=1).to(device)


# ---------------------------------------------------------------- exactness of the caches

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prompt_len,block_size", [(1, 4), (3, 1), (6, 16), (21, 4), (11, 5), (2, 6)])
def test_cached_generation_equals_recompute_from_scratch(model_on_device, mode, prompt_len, block_size):
    model = model_on_device
    ids = torch.randint(4, 97, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    ids = ids.to(model.context_device)
    n = 3 * block_size + 1 if mode == "diffusion" else 9
    kw = dict(max_new_tokens=n, block_size=block_size, steps_per_block=block_size)
    cached = run_mode(model, mode, ids, **kw)
    reference = run_mode(model, mode, ids, use_cache=False, **kw)
    assert cached.shape == (1, prompt_len + n)
    assert cached.tolist() == reference.tolist()


def direct_denoiser_logits(model, prefix, x, t):
    """The denoiser's logits for block x after `prefix`, computed from the definitions with no cache:
    the context tower runs over the prefix keeping each layer's input; denoiser attention layer i
    attends (no mask) over [context layer i's keys ; the block's keys]; Mamba layer i continues the
    context mixer's own recurrence (conv history and SSM state) with the denoiser's parameters."""
    ctx, den = model.context_tower, model.denoiser_tower
    n = prefix.shape[1]
    h = ctx.embeddings(prefix)
    ctx_inputs = []
    for layer in ctx.layers:
        ctx_inputs.append(layer.norm(h))
        h, _ = layer(h, mask=causal_mask(None, 0, n, "cpu"))
    temb = model.t_block(model.t_embedder(t)).view(1, 3, -1)
    g = den.embeddings(x)
    for i, layer in enumerate(den.layers):
        shift, scale, gate = (model.scale_shift_tables[i][None] + temb).unbind(1)
        if layer.kind == "mamba":
            c_mix, d_mix = ctx.layers[i].mixer, layer.mixer
            u = layer.norm(modulate(g, shift, scale))
            sizes = [d_mix.intermediate_size, d_mix.conv_dim, d_mix.num_heads]
            _, c_xbc, c_dt = c_mix.in_proj(ctx_inputs[i]).split(sizes, -1)
            z, d_xbc, d_dt = d_mix.in_proj(u).split(sizes, -1)
            raw = torch.cat([c_xbc, d_xbc], 1).transpose(1, 2)

            def conv(mix, raw):
                k = mix.conv1d.weight.shape[-1]
                padded = torch.nn.functional.pad(raw, (k - 1, 0))
                return torch.nn.functional.silu(torch.nn.functional.conv1d(
                    padded, mix.conv1d.weight, mix.conv1d.bias, groups=raw.shape[1])).transpose(1, 2)

            def ssm_inputs(mix, xbc, dt):
                gw = mix.n_groups * mix.state_size
                xs, B, C = xbc.split([mix.intermediate_size, gw, gw], -1)
                l = xs.shape[1]
                return (xs.reshape(1, l, mix.num_heads, mix.head_dim),
                        torch.nn.functional.softplus(dt + mix.dt_bias), -torch.exp(mix.A_log),
                        B.reshape(1, l, mix.n_groups, -1), C.reshape(1, l, mix.n_groups, -1))

            _, state = ssd_sequential(*ssm_inputs(c_mix, conv(c_mix, raw)[:, :n], c_dt))
            xs, dt, A, B, C = ssm_inputs(d_mix, conv(d_mix, raw)[:, n:], d_dt)
            y, _ = ssd_sequential(xs, dt, A, B, C, state)
            y = (y + d_mix.D[:, None] * xs).reshape(1, x.shape[1], -1)
            out = d_mix.out_proj(gated_group_rms_norm(y, z, d_mix.norm.weight, d_mix.norm.group_size, d_mix.norm.eps))
        elif layer.kind == "attention":
            c_att, d_att = ctx.layers[i].mixer, layer.mixer
            u = layer.norm(modulate(g, shift, scale))
            heads, kv_heads, hd = d_att.num_heads, d_att.num_kv_heads, d_att.head_dim
            q = d_att.q_proj(u).view(1, -1, heads, hd)
            k = torch.cat([c_att.k_proj(ctx_inputs[i]), d_att.k_proj(u)], 1).view(1, -1, kv_heads, hd)
            v = torch.cat([c_att.v_proj(ctx_inputs[i]), d_att.v_proj(u)], 1).view(1, -1, kv_heads, hd)
            k, v = (t.repeat_interleave(heads // kv_heads, dim=2) for t in (k, v))
            weights = torch.einsum("bqhd,bkhd->bhqk", q, k).div(math.sqrt(hd)).softmax(-1)
            out = d_att.o_proj(torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(1, x.shape[1], -1))
        else:
            out = layer.mixer(modulate(layer.norm(g), shift, scale))
        g = g + gate[:, None] * out
    return model.lm_head(den.norm_f(g)).float()


@pytest.mark.parametrize("prefix_len,block_size", [(1, 4), (7, 16), (19, 5)])
def test_denoiser_block_equals_direct_computation(model, prefix_len, block_size):
    gen = torch.Generator().manual_seed(prefix_len)
    prefix = torch.randint(4, 97, (1, prefix_len), generator=gen)
    x = torch.randint(4, 97, (1, block_size), generator=gen)
    x[0, ::2] = 3  # some positions masked
    t = torch.tensor([0.5])
    with torch.no_grad():
        context = model.encode_context(prefix)
        cached = model.denoise_block(x, t, context)
        at_masked = model.denoise_block(x, t, context, positions=x == 3)  # what the sampler asks for
        direct = direct_denoiser_logits(model, prefix, x, t)
    assert (cached - direct).abs().max() <= 1e-5
    assert at_masked.shape == (int((x == 3).sum()), direct.shape[-1])
    assert (at_masked - direct[x == 3]).abs().max() <= 1e-5


def test_context_is_not_modified_by_the_denoiser(model):
    prefix = torch.randint(4, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    context = model.encode_context(prefix)
    before = context.clone()
    model.denoise_block(torch.full((2, 4), 3), torch.ones(2), context)
    for a, b in zip(before.states, context.states):
        if a is not None:
            assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- batching and EOS

def left_pad(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("mode", MODES)
def test_batch_of_different_lengths_equals_one_by_one(model, mode):
    prompts = [[5, 9, 11], [7, 8, 9, 10, 11, 12, 13, 14, 15], [20], [30, 31, 32, 33, 34]]
    ids, mask = left_pad(prompts)
    kw = dict(max_new_tokens=10, block_size=4, steps_per_block=4)
    batched = run_mode(model, mode, ids, attention_mask=mask, **kw)
    for i, p in enumerate(prompts):
        alone = run_mode(model, mode, torch.tensor([p]), **kw)[0, len(p):]
        assert batched[i, ids.shape[1]:].tolist() == alone.tolist(), (mode, i)


@pytest.mark.parametrize("mode", MODES)
def test_eos_stops_each_row_and_the_rest_is_pad(model, mode):
    prompts = [[5, 9, 11], [7, 8, 9, 10]]
    ids, mask = left_pad(prompts)
    kw = dict(max_new_tokens=12, block_size=4, steps_per_block=4, attention_mask=mask)
    free = run_mode(model, mode, ids, **kw)
    eos = int(free[0, ids.shape[1] + 5])  # a token row 0 produces in its second block
    out = run_mode(model, mode, ids, eos_token_id=eos, return_dict_in_generate=True, **kw)
    for i in range(2):
        row, ref = out.sequences[i, ids.shape[1]:].tolist(), free[i, ids.shape[1]:].tolist()
        if eos in ref:
            cut = ref.index(eos) + 1
            assert row[:cut] == ref[:cut] and all(t == 0 for t in row[cut:])
        else:
            assert row == ref


# ---------------------------------------------------------------- the commit rule

def committed_per_step(model, **kw):
    counts = []
    model.generate_mask_diffusion(torch.tensor([[5, 6, 7]]), step_callback=lambda s: counts.append(
        (s.block, s.step, int(s.committed.sum()), int((s.tokens == 3).sum()))), **kw)
    return counts


def test_threshold_one_commits_exactly_ceil_masked_over_steps_left(model):
    counts = committed_per_step(model, max_new_tokens=16, block_size=16, steps_per_block=5, confidence_threshold=1.0)
    masked = 16
    for block, step, committed, left in counts:
        assert committed == math.ceil(masked / (5 - step))
        masked -= committed
        assert left == masked
    assert masked == 0 and len(counts) == 5


def test_threshold_zero_commits_the_block_in_one_step(model):
    counts = committed_per_step(model, max_new_tokens=32, block_size=16, steps_per_block=16, confidence_threshold=0.0)
    assert [(b, s, c) for b, s, c, _ in counts] == [(0, 0, 16), (1, 0, 16)]


def test_one_step_per_block_fills_the_block(model):
    counts = committed_per_step(model, max_new_tokens=8, block_size=8, steps_per_block=1, confidence_threshold=1.0)
    assert [(b, s, c) for b, s, c, _ in counts] == [(0, 0, 8)]


def test_commits_are_never_undone_and_never_the_mask_token(model):
    seen = []
    model.generate_mask_diffusion(torch.tensor([[5, 6, 7]]), max_new_tokens=16, block_size=16,
                                  step_callback=lambda s: seen.append(s.tokens.clone()))
    for before, after in zip(seen, seen[1:]):
        fixed = before != 3
        assert torch.equal(before[fixed], after[fixed])
    assert not (seen[-1] == 3).any()


# ---------------------------------------------------------------- statistics, seeds, streaming

@pytest.mark.parametrize("mode", MODES)
def test_statistics_count_what_they_claim(model, mode):
    calls = {"context": 0, "denoiser": 0}
    hooks = [model.context_tower.register_forward_hook(lambda *a: calls.__setitem__("context", calls["context"] + 1)),
             model.denoiser_tower.embeddings.register_forward_hook(
                 lambda *a: calls.__setitem__("denoiser", calls["denoiser"] + 1))]
    puts = []  # when the streamer was handed the prompt, then each piece of output

    class Clock:
        def put(self, value):
            puts.append(time.perf_counter())

        def end(self):
            pass

    try:
        ids, mask = left_pad([[5, 9, 11], [7, 8]])
        called = time.perf_counter()
        out = run_mode(model, mode, ids, attention_mask=mask, max_new_tokens=10, block_size=4, steps_per_block=4,
                       return_dict_in_generate=True, streamer=Clock())
    finally:
        for h in hooks:
            h.remove()
    stats = out.stats
    assert stats.context_forwards == calls["context"] and stats.denoiser_forwards == calls["denoiser"]
    assert stats.generated_tokens == out.sequences[:, ids.shape[1]:].numel() == 20
    if mode == "diffusion":
        assert stats.tokens_per_denoiser_forward == 20 / calls["denoiser"]
    assert stats.wall_time > 0
    # the first output's time, not the whole call's: noted before it reached the streamer
    assert 0 < stats.first_block_latency <= puts[1] - called < stats.wall_time


@pytest.mark.parametrize("mode", MODES)
def test_a_streamer_can_end_the_call_and_the_counts_so_far_remain(model, mode):
    ids = torch.tensor([[5, 9, 11]])
    got, stats = [], GenerationStats()
    streamer = RowStreamer(1, lambda row, tokens: got.extend(tokens), lambda row: len(got) >= 3, eos_token_id=None)
    with pytest.raises(StopGeneration):
        run_mode(model, mode, ids, max_new_tokens=40, block_size=4, streamer=streamer, stats=stats)
    full = run_mode(model, mode, ids, max_new_tokens=40, block_size=4, return_dict_in_generate=True)
    assert len(got) == (4 if mode == "diffusion" else 3)  # ended after the first block / the third token
    assert got == full.sequences[0, 3:3 + len(got)].tolist()
    so_far = (stats.context_forwards, stats.denoiser_forwards)
    whole = (full.stats.context_forwards, full.stats.denoiser_forwards)
    assert sum(so_far) > 0 and all(a <= b for a, b in zip(so_far, whole)) and sum(so_far) < sum(whole)


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_same_output_other_seed_differs(mode):
    model = build(seed=2, head_std=1.0)
    ids = torch.tensor([[5, 6, 7]])

    def run(seed):
        return run_mode(model, mode, ids, max_new_tokens=16, block_size=8, steps_per_block=8, temperature=1.5,
                        generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


class Collect(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_gets_prompt_then_each_committed_block(model):
    s = Collect()
    out = model.generate_mask_diffusion(torch.tensor([[5, 6, 7]]), max_new_tokens=10, block_size=4, streamer=s)
    assert s.ended and torch.equal(s.puts[0], torch.tensor([[5, 6, 7]]))
    assert [p.shape[1] for p in s.puts[1:]] == [4, 4, 2]
    assert torch.equal(torch.cat(s.puts[1:], 1), out[:, 3:])


def test_place_towers_on_devices_keeps_results(model):
    ids = torch.tensor([[5, 6, 7]])
    before = model.generate_mask_diffusion(ids, max_new_tokens=8, block_size=4)
    model.place_towers_on_devices("cpu", "cpu")
    assert model.context_device.type == "cpu" and model.denoiser_device.type == "cpu"
    assert torch.equal(before, model.generate_mask_diffusion(ids, max_new_tokens=8, block_size=4))


# ---------------------------------------------------------------- construction, layout, errors

def test_from_single_tower_copies_the_backbone_and_freezes_the_context():
    torch.manual_seed(0)
    single = randomize(NemotronHForCausalLM(tiny_config()).eval(), seed=5)
    model = TwoTowerForCausalLM.from_single_tower(single)
    sd = single.state_dict()
    for k, v in model.context_tower.state_dict().items():
        assert torch.equal(v, sd["backbone." + k]) and torch.equal(model.denoiser_tower.state_dict()[k], v)
    assert torch.equal(model.lm_head.weight, single.lm_head.weight)
    assert torch.equal(model.context_lm_head.weight, single.lm_head.weight)
    assert not any(p.requires_grad for p in model.context_tower.parameters())
    assert not model.context_lm_head.weight.requires_grad
    assert all(p.requires_grad for p in model.denoiser_tower.parameters())
    # the context tower with its head is the original AR model
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(model.generate_ar(ids, max_new_tokens=6), single.generate_ar(ids, max_new_tokens=6))


def test_release_layout_of_the_nano_preset_on_meta():
    config = TwoTowerConfig(**nemotron_3_nano_30b_config().to_dict())
    with torch.device("meta"):
        model = TwoTowerForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    n = sum(v.numel() for v in model.parameters())
    assert abs(n / 63.16e9 - 1) < 0.005, n
    expected = {
        "context_tower.embeddings.weight": (131072, 2688), "context_tower.norm_f.weight": (2688,),
        "context_lm_head.weight": (131072, 2688), "denoiser_tower.embeddings.weight": (131072, 2688),
        "denoiser_tower.norm_f.weight": (2688,), "lm_head.weight": (131072, 2688),
        "t_embedder.mlp.0.weight": (2688, 256), "t_embedder.mlp.0.bias": (2688,),
        "t_embedder.mlp.2.weight": (2688, 2688), "t_embedder.mlp.2.bias": (2688,),
        "t_block.1.weight": (8064, 2688), "t_block.1.bias": (8064,),
        "context_tower.layers.1.mixer.experts.5.up_proj.weight": (1856, 2688),
        "denoiser_tower.layers.5.mixer.k_proj.weight": (256, 2688),
    }
    for k, shape in expected.items():
        assert shapes[k] == shape, k
    assert [k for k in shapes if k.startswith("scale_shift_tables")] == [f"scale_shift_tables.{i}" for i in range(52)]
    assert all(shapes[f"scale_shift_tables.{i}"] == (3, 2688) for i in range(52))
    towers = {k.split(".", 1)[1] for k in shapes if k.startswith("context_tower.")}
    assert towers == {k.split(".", 1)[1] for k in shapes if k.startswith("denoiser_tower.")}
    assert config.mask_token_id == 3 and config.block_size == 16 and config.confidence_threshold == 0.8


@pytest.mark.parametrize("call,match", [
    (lambda m: m.generate_mask_diffusion(torch.tensor([[5, 3, 7]])), "mask token"),
    (lambda m: m.generate_mask_diffusion(torch.tensor([[5]]), steps_per_block=0), "steps_per_block"),
    (lambda m: m.generate_mask_diffusion(torch.tensor([[5]]), block_size=0), "block_size"),
    (lambda m: m.generate_mask_diffusion(torch.tensor([[5]]), confidence_threshold=1.5), "confidence_threshold"),
    (lambda m: m.generate_mask_diffusion(torch.tensor([[5]]), confidence_threshold=-0.1), "confidence_threshold"),
    (lambda m: m.generate_mask_diffusion(torch.zeros(1, 0, dtype=torch.long)), "empty"),
    (lambda m: m.generate_mock_ar(torch.zeros(1, 0, dtype=torch.long)), "empty"),
    (lambda m: m.generate_ar(torch.tensor([[5, 500]])), "vocabulary"),
    (lambda m: m.generate_mask_diffusion(torch.tensor([[5]]), max_new_tokens=0), "max_new_tokens"),
])
def test_bad_arguments_are_clear_errors(model, call, match):
    with pytest.raises(ValueError, match=match):
        call(model)
