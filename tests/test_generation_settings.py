"""The settings objects, the mode table, and generate() as a transformers user calls it: every
generation-config setting honoured or refused, right padding refused, EOS inside a block."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from conftest import randomize, tiny_config
from twotower import DiffusionParams, GenerateOptions, NemotronHForCausalLM, SamplingParams, TwoTowerForCausalLM
from twotower.modes import MODES, Mode, get_mode, register_mode, run_mode
from twotower.params import DESCRIPTIVE_GENERATION_FIELDS, HONOURED_GENERATION_FIELDS, split_settings

IDS = torch.tensor([[5, 6, 7, 8]])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    single = randomize(NemotronHForCausalLM(tiny_config()).eval(), seed=3, head_std=8.0)
    model = TwoTowerForCausalLM.from_single_tower(single).eval()
    randomize(model.denoiser_tower, seed=4)
    randomize(model.lm_head, seed=5, head_std=8.0)
    return model


# ---------------------------------------------------------------- the settings objects

@pytest.mark.parametrize("cls,fields,message", [
    (SamplingParams, dict(temperature=-1.0), "temperature"),
    (SamplingParams, dict(temperature=float("nan")), "temperature"),
    (SamplingParams, dict(top_k=0), "top_k"),
    (SamplingParams, dict(top_p=0.0), "top_p"),
    (SamplingParams, dict(top_p=1.5), "top_p"),
    (SamplingParams, dict(epsilon_cutoff=1.0), "epsilon_cutoff"),
    (SamplingParams, dict(seed=-1), "seed"),
    (SamplingParams, dict(seed=1, generator=torch.Generator()), "not both"),
    (DiffusionParams, dict(block_size=0), "block_size"),
    (DiffusionParams, dict(steps_per_block=2.5), "steps_per_block"),
    (DiffusionParams, dict(confidence_threshold=1.5), "confidence_threshold"),
    (DiffusionParams, dict(unmasking="random"), "unmasking"),
    (GenerateOptions, dict(max_time=0), "max_time"),
    (GenerateOptions, dict(eos_token_id=-2), "eos_token_id"),
])
def test_settings_are_validated_when_made(cls, fields, message):
    with pytest.raises(ValueError, match=message):
        cls(**fields)


def test_settings_are_frozen_and_keywords_apply_over_them():
    base = SamplingParams(temperature=0.7, top_k=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.temperature = 1.0
    sampling, diffusion, options = split_settings("f", dict(top_k=9, block_size=4, eos_token_id=2), base)
    assert (sampling, base.top_k) == (SamplingParams(temperature=0.7, top_k=9), 5)
    assert diffusion == DiffusionParams(block_size=4) and options == GenerateOptions(eos_token_id=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'beams'"):
        split_settings("f", dict(beams=2))
    with pytest.raises(TypeError, match="unexpected keyword argument 'block_size'"):
        split_settings("f", dict(block_size=4), takes=("sampling", "options"))
    with pytest.raises(ValueError, match="top_p"):
        split_settings("f", dict(top_p=2.0), base)  # keywords are validated too


def test_diffusion_settings_default_to_the_model_config(model):
    resolved = DiffusionParams(block_size=4).resolve(model.config)
    assert (resolved.block_size, resolved.steps_per_block, resolved.mask_token_id) == (4, 16, 3)
    assert resolved.confidence_threshold == model.config.confidence_threshold
    with pytest.raises(ValueError, match="vocabulary"):
        DiffusionParams(mask_token_id=500).resolve(model.config)


def test_objects_and_keywords_give_the_same_tokens(model):
    kw = dict(temperature=0.9, top_k=20, block_size=4, steps_per_block=2, confidence_threshold=0.5)
    by_keywords = model.generate_mask_diffusion(IDS, 12, seed=7, **kw)
    by_objects = model.generate_mask_diffusion(
        IDS, 12, sampling=SamplingParams(temperature=0.9, top_k=20, seed=7),
        diffusion=DiffusionParams(block_size=4, steps_per_block=2, confidence_threshold=0.5))
    assert torch.equal(by_keywords, by_objects)
    # a seed makes a fresh generator per call: the same settings object repeats its answer
    again = model.generate_mask_diffusion(IDS, 12, seed=7, **kw)
    other = model.generate_mask_diffusion(IDS, 12, seed=8, **kw)
    assert torch.equal(again, by_keywords) and not torch.equal(other, by_keywords)
    with pytest.raises(ValueError, match="step_callback"):
        model.generate_ar(IDS, 4, step_callback=print)


# ---------------------------------------------------------------- the mode table

def test_a_registered_mode_is_reachable_by_name(model):
    calls = []

    def echo(model, input_ids, max_new_tokens, *, attention_mask, sampling, options):
        calls.append((sampling, options))
        return input_ids.repeat(1, 2)[:, :input_ids.shape[1] + max_new_tokens]

    register_mode(Mode("echo", echo, False, "repeats the prompt"))
    try:
        assert "echo" in MODES and get_mode("echo").summary == "repeats the prompt"
        out = run_mode(model, "echo", IDS, 3, temperature=0.5, block_size=8, step_callback=print)
        assert out.tolist() == [[5, 6, 7, 8, 5, 6, 7]]
        assert calls[0][0].temperature == 0.5 and calls[0][1].step_callback is None  # dropped: not diffusion
        assert torch.equal(model.generate(IDS, mode="echo", max_new_tokens=3), out)
        with pytest.raises(ValueError, match="already registered"):
            register_mode(Mode("echo", print, False, "another"))
    finally:
        del MODES["echo"]
    with pytest.raises(ValueError, match="mode must be one of .*'ar'"):
        get_mode("echo")


# ---------------------------------------------------------------- generate() and the generation config

SPECIAL_VALUES = {"early_stopping": True, "cache_implementation": "static", "suppress_tokens": [5],
                  "begin_suppress_tokens": [5], "bad_words_ids": [[5]], "force_words_ids": [[5]],
                  "sequence_bias": {(5,): 1.0}, "watermarking_config": transformers.WatermarkingConfig(),
                  "assistant_ensemble_weight": 0.5, "compile_config": transformers.CompileConfig(),
                  "stop_strings": ["x"], "prefill_chunk_size": 64, "num_return_sequences": 2}


def unhonoured_fields():
    skip = set(HONOURED_GENERATION_FIELDS) | set(DESCRIPTIVE_GENERATION_FIELDS)
    return [k for k in transformers.GenerationConfig().to_dict() if k not in skip]


@pytest.mark.parametrize("field", unhonoured_fields())
def test_every_generation_setting_not_honoured_is_refused(model, field):
    config = transformers.GenerationConfig(max_new_tokens=3, do_sample=field == "num_return_sequences")
    config.update(**{field: SPECIAL_VALUES.get(field, 2)})
    with pytest.raises(ValueError, match=field):
        model.generate(IDS, generation_config=config)


def test_generate_arguments_it_cannot_use_are_refused(model):
    processors = transformers.LogitsProcessorList([transformers.TemperatureLogitsWarper(0.5)])
    with pytest.raises(TypeError, match="generate.. got an unexpected keyword argument 'logits_processor'"):
        model.generate(IDS, max_new_tokens=3, logits_processor=processors)


def test_off_values_of_refused_settings_are_accepted(model):
    off = dict(num_beams=1, repetition_penalty=1.0, typical_p=1.0, no_repeat_ngram_size=0, output_scores=False)
    assert torch.equal(model.generate(IDS, max_new_tokens=3, **off), model.generate_ar(IDS, 3))


@pytest.mark.parametrize("mode,width", [("ar", 1), ("mock-ar", 1), ("diffusion", 4)])
def test_max_time_ends_generation_after_the_first_token_or_block(model, mode, width):
    out = model.generate(IDS, mode=mode, max_new_tokens=12, block_size=4, max_time=1e-9)
    assert out.shape == (1, 4 + width)
    assert torch.equal(out, run_mode(model, mode, IDS, 12, block_size=4)[:, :4 + width])


@pytest.mark.parametrize("mode", ["ar", "diffusion"])
def test_epsilon_and_eta_cutoffs_are_applied(model, mode):
    greedy = model.generate(IDS, mode=mode, max_new_tokens=8, block_size=4)

    def hot(temperature=50.0, **cutoff):
        return model.generate(IDS, mode=mode, max_new_tokens=8, block_size=4, do_sample=True,
                              temperature=temperature, generator=torch.Generator().manual_seed(0), **cutoff)

    assert not torch.equal(hot(), greedy)
    # at temperature 50 every probability is near 1/97: an epsilon of 0.5 leaves only the argmax
    assert torch.equal(hot(epsilon_cutoff=0.5), greedy)
    # eta = min(0.5, sqrt(0.5) exp(-entropy)) leaves the likely tokens: the same draws as the filter's own
    eta = hot(2.0, eta_cutoff=0.5)
    direct = run_mode(model, mode, IDS, 8, block_size=4, sampling=SamplingParams(
        2.0, eta_cutoff=0.5, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(eta, direct) and not torch.equal(eta, hot(2.0))
    assert torch.equal(model.generate(IDS, mode=mode, max_new_tokens=8, block_size=4, renormalize_logits=True),
                       greedy)


def test_right_padding_is_refused_with_a_clear_message(model):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    for mode in MODES:
        with pytest.raises(ValueError, match="padding_side = 'left'"):
            model.generate(ids, attention_mask=right, mode=mode, max_new_tokens=4)
    with pytest.raises(ValueError, match="left"):
        model.generate_ar(ids, 4, attention_mask=torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]))  # a gap
    left = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    assert model.generate(left, attention_mask=right.flip(1), max_new_tokens=4).shape == (2, 8)


class Collect:
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("mode", ["diffusion", "mock-ar", "ar"])
def test_eos_inside_a_block_never_reaches_the_streamer_or_the_result_as_padding(model, mode):
    free = model.generate(IDS, mode=mode, max_new_tokens=16, block_size=8)[0, 4:].tolist()
    eos = free[2]  # inside the first block
    cut = free.index(eos) + 1
    streamer = Collect()
    out = model.generate(IDS, mode=mode, max_new_tokens=16, block_size=8, eos_token_id=eos, streamer=streamer)
    assert out[0, 4:].tolist() == free[:cut]
    assert sum(streamer.puts[1:], []) == free[:cut] and streamer.ended
