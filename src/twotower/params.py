"""The settings of a generate call, as frozen objects validated once, in their constructors.

* `SamplingParams`: how a token is drawn from logits (greedy, or temperature with top-k / top-p /
  epsilon / eta filtering, and a seed or a generator); every mode reads it.
* `DiffusionParams`: how mask diffusion fills a block (block size, steps, the unmasking rule and
  its threshold, the mask token); fields left None take the model's config.
* `GenerateOptions`: what a call does around the decoding (EOS, streamer, step callback, cache,
  result form, statistics, a time limit).

gpt-fast passes one `sampling_kwargs` through its decoding functions in the same spirit; vLLM's
`SamplingParams` is the model for the validated object. `split_settings` turns the loose keyword
arguments of the public generate functions into these objects.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from .sampler import UNMASKING_RULES

MIN_TEMPERATURE = 1e-3  # below this, sampling is greedy in all but name and logits / t can overflow


def _check_int(name: str, value, low: int, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_fraction(name: str, value, closed_low: bool, optional: bool = True) -> None:
    """value in [0, 1] (closed_low) or (0, 1]; None allowed when optional."""
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 1.0 and (
        value >= 0.0 if closed_low else value > 0.0)
    if not ok:
        raise ValueError(f"{name} must be a number in {'[0' if closed_low else '(0'}, 1], got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Token choice. temperature < MIN_TEMPERATURE (the default 0) is greedy and ignores the
    filters. Otherwise logits / temperature keep the top_k largest, the top_p nucleus, the tokens
    of probability >= epsilon_cutoff, and those of probability >= min(eta, sqrt(eta) * exp(-entropy))
    for eta_cutoff (transformers' `EpsilonLogitsWarper` / `EtaLogitsWarper`, Hewitt et al. 2022,
    "Truncation Sampling as Language Model Desmoothing"); at least the most likely token stays.
    Randomness comes from `generator`, or from a fresh generator seeded with `seed` at every call
    (so a seeded call repeats), or from torch's global generator."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    epsilon_cutoff: float | None = None
    eta_cutoff: float | None = None
    seed: int | None = None
    generator: torch.Generator | None = None

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        _check_int("top_k", self.top_k, 1)
        _check_fraction("top_p", self.top_p, closed_low=False)
        for name in ("epsilon_cutoff", "eta_cutoff"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0.0 <= value < 1.0):
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        _check_int("seed", self.seed, 0)
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(self.generator).__name__}")
        if self.seed is not None and self.generator is not None:
            raise ValueError("give a seed or a generator, not both")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def for_call(self) -> "SamplingParams":
        """These settings with the generator one call uses (a fresh one for a seed)."""
        if self.seed is None:
            return self
        return dataclasses.replace(self, seed=None, generator=torch.Generator().manual_seed(self.seed))


@dataclass(frozen=True)
class DiffusionParams:
    """Mask diffusion of one block: up to `steps_per_block` denoising steps over `block_size`
    positions that start as `mask_token_id`; the unmasking rule (a name in
    `sampler.UNMASKING_RULES`) decides which predictions each step commits, the "confidence" rule
    by `confidence_threshold`. None: the model's config value (see `resolve`). Speculative
    decoding drafts its blocks in `draft_steps` steps instead (the rule deciding all but the last)."""

    block_size: int | None = None
    steps_per_block: int | None = None
    confidence_threshold: float | None = None
    mask_token_id: int | None = None
    unmasking: str = "confidence"
    draft_steps: int = 1

    def __post_init__(self):
        _check_int("block_size", self.block_size, 1)
        _check_int("steps_per_block", self.steps_per_block, 1)
        _check_int("draft_steps", self.draft_steps, 1, optional=False)
        _check_fraction("confidence_threshold", self.confidence_threshold, closed_low=True)
        _check_int("mask_token_id", self.mask_token_id, 0)
        if self.unmasking not in UNMASKING_RULES:
            raise ValueError(f"unmasking must be one of {tuple(UNMASKING_RULES)}, got {self.unmasking!r}")

    def resolve(self, config) -> "DiffusionParams":
        """Every None field from the model's `config`; the mask token checked against its vocabulary."""
        filled = {f: getattr(config, f) for f in ("block_size", "steps_per_block", "confidence_threshold",
                                                  "mask_token_id") if getattr(self, f) is None}
        resolved = dataclasses.replace(self, **filled)
        if resolved.mask_token_id >= config.vocab_size:
            raise ValueError(f"mask_token_id {resolved.mask_token_id} is outside the vocabulary")
        return resolved

    def rule(self):
        """The unmasking rule object this names (see `twotower.sampler`)."""
        return UNMASKING_RULES[self.unmasking].from_params(self)


@dataclass(frozen=True)
class GenerateOptions:
    """What a generate call does besides choosing tokens.

    eos_token_id: a row stops after it (the rest of its row is padding). streamer: transformers'
    `put`/`end` protocol (`put` raising `generation.StopGeneration` ends the call). step_callback:
    sees every denoising step (diffusion modes). use_cache=False: the slow exact reference that
    recomputes the context. return_dict_in_generate: a `GenerateOutput` with statistics. stats: a
    `GenerationStats` filled as they grow. max_time: seconds after which no new block or token
    begins (transformers' `MaxTimeCriteria`). compile: switch the model's compiled decoding path
    on (`twotower.compiled`; it stays on), its compile time reported in the statistics."""

    eos_token_id: int | None = None
    streamer: object = None
    step_callback: object = None
    use_cache: bool = True
    return_dict_in_generate: bool = False
    stats: object = None
    max_time: float | None = None
    compile: bool = False

    def __post_init__(self):
        _check_int("eos_token_id", self.eos_token_id, 0)
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        if self.step_callback is not None and not callable(self.step_callback):
            raise ValueError("step_callback must be callable")
        if self.max_time is not None and (isinstance(self.max_time, bool) or not isinstance(
                self.max_time, (int, float)) or not self.max_time > 0):
            raise ValueError(f"max_time must be a number of seconds > 0, got {self.max_time!r}")


SETTINGS_CLASSES = {"sampling": SamplingParams, "diffusion": DiffusionParams, "options": GenerateOptions}
FIELD_OWNER = {f.name: owner for owner, cls in SETTINGS_CLASSES.items() for f in dataclasses.fields(cls)}


def split_settings(caller: str, kwargs: dict, sampling=None, diffusion=None, options=None,
                   takes=("sampling", "diffusion", "options")):
    """(sampling, diffusion, options) from the settings objects given (or defaults) with loose
    keyword arguments applied over them, each to the object that has that field. A keyword no
    object of `takes` has is a TypeError, as Python's own for an unexpected argument."""
    given = {"sampling": sampling, "diffusion": diffusion, "options": options}
    for owner, value in given.items():
        cls = SETTINGS_CLASSES[owner]
        if value is not None and not isinstance(value, cls):
            raise TypeError(f"{caller}() {owner} must be a {cls.__name__}, got {type(value).__name__}")
    updates = {owner: {} for owner in given}
    for name, value in kwargs.items():
        owner = FIELD_OWNER.get(name)
        if owner is None or owner not in takes:
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")
        updates[owner][name] = value
    result = []
    for owner in ("sampling", "diffusion", "options"):
        base = given[owner] if given[owner] is not None else SETTINGS_CLASSES[owner]()
        result.append(dataclasses.replace(base, **updates[owner]) if updates[owner] else base)
    return tuple(result)


# transformers' GenerationConfig fields that `TwoTowerForCausalLM.generate` honours. renormalize_logits
# changes nothing here: tokens are always drawn from normalised probabilities, and no scores are returned.
HONOURED_GENERATION_FIELDS = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p",
                              "epsilon_cutoff", "eta_cutoff", "eos_token_id", "pad_token_id", "use_cache",
                              "return_dict_in_generate", "max_time", "renormalize_logits")
# fields that describe the model or the library, or tune an assistant model (which generate refuses)
DESCRIPTIVE_GENERATION_FIELDS = ("_from_model_config", "transformers_version", "bos_token_id",
                                 "decoder_start_token_id", "is_assistant", "num_assistant_tokens",
                                 "num_assistant_tokens_schedule", "assistant_confidence_threshold",
                                 "assistant_lookbehind", "target_lookbehind", "max_matching_ngram_size")
# values that switch a refused feature off (transformers 4.x wrote them into generation_config.json);
# False, 0 and None are off for every field
OFF_VALUES = {"num_beams": 1, "num_return_sequences": 1, "num_beam_groups": 1, "repetition_penalty": 1.0,
              "encoder_repetition_penalty": 1.0, "length_penalty": 1.0, "typical_p": 1.0, "guidance_scale": 1.0}
DIFFUSION_FIELDS = tuple(f.name for f in dataclasses.fields(DiffusionParams))


def refused_generation_fields(config, model_config) -> list[str]:
    """The fields of a GenerationConfig switched on (not transformers' default, nor an off value)
    that generate() does not honour: every one, so that none is silently ignored.
    prefill_chunk_size (copied from the model's config) must be the model's."""
    defaults = GenerationConfig().to_dict()
    skip = set(HONOURED_GENERATION_FIELDS) | set(DESCRIPTIVE_GENERATION_FIELDS)
    if getattr(config, "prefill_chunk_size", None) in (None, getattr(model_config, "prefill_chunk_size", None)):
        skip.add("prefill_chunk_size")
    return sorted(k for k, v in config.to_dict().items()
                  if k in defaults and k not in skip and v != defaults[k] and v and v != OFF_VALUES.get(k))


def generation_settings(config, model_config, prompt_length: int) -> tuple[int, dict]:
    """(max_new_tokens, the settings objects' fields) that a transformers GenerationConfig asks
    for; ValueError for any setting not honoured."""
    refused = refused_generation_fields(config, model_config)
    if refused:
        raise ValueError(f"generate() does not support {refused} (set them to transformers' defaults)")
    eos = config.eos_token_id
    if isinstance(eos, (list, tuple)):
        if len(eos) > 1:
            raise ValueError(f"generate() takes one eos_token_id, got {list(eos)}")
        eos = eos[0] if eos else None
    max_new_tokens = config.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = (config.max_length or 20) - prompt_length
    settings = dict(eos_token_id=eos, use_cache=config.use_cache is not False, max_time=config.max_time,
                    return_dict_in_generate=bool(config.return_dict_in_generate))
    if config.do_sample:
        settings.update(temperature=1.0 if config.temperature is None else config.temperature, top_k=config.top_k,
                        top_p=config.top_p, epsilon_cutoff=config.epsilon_cutoff, eta_cutoff=config.eta_cutoff)
    settings.update({k: getattr(config, k) for k in DIFFUSION_FIELDS if getattr(config, k, None) is not None})
    return max_new_tokens, settings
