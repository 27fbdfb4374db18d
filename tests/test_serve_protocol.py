"""The server's request and response format as pure functions, without HTTP or a model."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi")

from twotower.generation import GenerationStats  # noqa: E402
from twotower.modes import MODES  # noqa: E402
from twotower.params import DiffusionParams, SamplingParams  # noqa: E402
from twotower.serve.protocol import (  # noqa: E402
    APIError, ChatRequest, CompletionRequest, ServeConfig, check_origin, check_prompt_ids, chat_prompt,
    completion_body, parse_request, sampling_of, stream_chunks, stream_opening, usage)

CONFIG = ServeConfig(model_name="twotower", max_tokens_limit=64, default_max_tokens=32)
DEFAULTS = {"block_size": 16, "steps_per_block": 16}


def parse(body: dict | bytes, model=CompletionRequest):
    return parse_request(model, body if isinstance(body, bytes) else json.dumps(body).encode())


def refused(call, *args, **kw) -> APIError:
    with pytest.raises(APIError) as e:
        call(*args, **kw)
    return e.value


def sampling(body: dict, max_tokens=None):
    req = parse({"prompt": "Hi", **body})
    return sampling_of(req, CONFIG, DEFAULTS, req.max_tokens if max_tokens is None else max_tokens)


def test_parse_refuses_lone_surrogates_and_huge_integers_with_400():
    for raw in (b'{"prompt": "a \\ud800"}', b'{"prompt": "Hi", "model": "\\udfff"}',
                b'{"prompt": "Hi", "stop": ["\\ud800x"]}'):
        error = refused(parse, raw)
        assert error.status == 400 and "surrogate" in error.message
    assert parse(b'{"prompt": "\\ud83d\\ude00"}').prompt == "\U0001F600"  # a pair is one character
    error = refused(parse, b'{"prompt": "Hi", "max_tokens": ' + b"9" * 5000 + b"}")
    assert error.status == 400 and "not valid JSON" in error.message
    chat = b'{"messages": [{"role": "user", "content": "\\ud800"}]}'
    assert refused(parse, chat, ChatRequest).status == 400


def test_no_op_openai_defaults_are_accepted_and_other_values_refused():
    body = {"prompt": "Hi", "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": None, "store": False,
            "tools": None, "user": "u1", "n": 1, "echo": False, "best_of": 1, "logit_bias": {},
            "response_format": {"type": "text"}, "metadata": {"any": "thing"}, "tool_choice": "none"}
    assert parse(body).prompt == "Hi"
    assert parse({"prompt": "Hi", "logprobs": False}).prompt == "Hi"
    for name, value in [("presence_penalty", 0.5), ("frequency_penalty", -1), ("logprobs", 5), ("logprobs", True),
                        ("store", True), ("tools", [{"type": "function"}]), ("echo", True), ("best_of", 2),
                        ("logit_bias", {"50": 100}), ("response_format", {"type": "json_object"})]:
        error = refused(parse, {"prompt": "Hi", name: value})
        assert (error.status, error.param, error.code) == (400, name, "unsupported_parameter")
        assert name in error.message
    assert refused(parse, {"prompt": "Hi", "frequency_penality": 0}).param == "frequency_penality"


def test_sampling_follows_openai_defaults_and_limits():
    s = sampling({})
    assert (s.mode, s.max_tokens, s.sampling) == ("diffusion", 32, SamplingParams(1.0))  # OpenAI's temperature
    assert sampling({"temperature": 0}).sampling == SamplingParams()
    assert sampling({"temperature": 1e-5, "top_p": 0.5, "seed": 3}).sampling == SamplingParams()  # greedy
    assert sampling({"top_p": 0.5}).sampling == SamplingParams(1.0, top_p=0.5)
    assert sampling({"temperature": 0.7, "top_k": 5, "seed": 9}).sampling == SamplingParams(0.7, 5, seed=9)
    assert sampling({"unmasking": "fixed"}).diffusion.unmasking == "fixed"
    assert refused(sampling, {"max_tokens": 65}).param == "max_tokens"
    small = parse({"prompt": "Hi"})
    assert sampling_of(small, ServeConfig(max_tokens_limit=8), DEFAULTS, None).max_tokens == 8  # default <= limit
    assert refused(sampling, {"model": "gpt-4"}).status == 404
    assert refused(sampling, {"n": 2}).param == "n"
    assert refused(sampling, {"stop": ["a"] * 5}).param == "stop"
    assert refused(sampling, {"stream_options": {"include_usage": True}}).param == "stream_options"
    assert refused(sampling, {"unmasking": "random"}).param == "unmasking"
    assert [sampling({"mode": name}).mode for name in MODES] == list(MODES)  # the registry's modes, every one


def test_a_diffusion_block_never_spans_more_than_max_tokens():
    assert sampling({"max_tokens": 1}).diffusion == DiffusionParams(1, 1)
    assert sampling({"max_tokens": 5, "block_size": 8, "steps_per_block": 3}).diffusion == DiffusionParams(5, 3)
    assert sampling({"max_tokens": 40, "confidence_threshold": 0.5}).diffusion == DiffusionParams(16, 16, 0.5)
    assert sampling({"mode": "ar", "max_tokens": 1}).diffusion is None


def test_batch_keys_group_compatible_requests_and_isolate_seeded_sampling():
    greedy = [sampling({"temperature": 0, "top_p": p, "seed": seed}) for p, seed in ((0.3, None), (0.9, 5))]
    assert greedy[0].batch_key() == greedy[1].batch_key() is not None  # greedy ignores top_p and seed
    assert sampling({"temperature": 0.7, "seed": 3}).batch_key() is None
    assert sampling({"temperature": 0.7}).batch_key() == sampling({"temperature": 0.7}).batch_key()
    assert sampling({"temperature": 0, "mode": "ar"}).batch_key() != greedy[0].batch_key()
    assert sampling({"temperature": 0, "block_size": 4}).batch_key() != greedy[0].batch_key()
    assert sampling({"temperature": 0, "block_size": 4}).cost_key() == sampling({"block_size": 4}).cost_key()


@dataclass
class StatsWithDrafts(GenerationStats):
    accepted_tokens: int = 0


def test_usage_is_built_from_generation_stats_alone():
    ar = usage(5, 3, GenerationStats(generated_tokens=9, context_forwards=4))
    assert ar == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, "denoiser_forwards": 0,
                  "context_forwards": 4, "tokens_per_denoiser_forward": None}
    diffusion = usage(5, 6, GenerationStats(denoiser_forwards=4, context_forwards=2))
    assert diffusion["tokens_per_denoiser_forward"] == 1.5 and diffusion["denoiser_forwards"] == 4
    assert usage(1, 2, StatsWithDrafts(denoiser_forwards=2, accepted_tokens=7))["accepted_tokens"] == 7


def test_events_become_openai_bodies_and_chunks():
    head = {"id": "x", "created": 1, "model": "m"}
    u = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    text = completion_body(head, False, "ab", "length", u)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "ab" and text["usage"] == u
    chat = completion_body(head, True, "ab", "stop", u)
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "ab"}
    assert stream_opening(head, False) == [] and stream_opening(head, True)[0]["choices"][0]["delta"]["role"]
    [delta] = stream_chunks(head, True, ("delta", "a"), include_usage=True)
    assert delta["choices"][0] == {"index": 0, "delta": {"content": "a"}, "logprobs": None, "finish_reason": None}
    last, tail = stream_chunks(head, False, ("done", "b", "stop", u), include_usage=True)
    assert last["choices"][0]["finish_reason"] == "stop" and tail == {**head, "object": "text_completion",
                                                                       "choices": [], "usage": u}
    assert len(stream_chunks(head, False, ("done", "b", "stop", u), include_usage=False)) == 1


def test_chat_prompt_uses_a_template_when_given():
    req = parse({"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}, ChatRequest)
    assert chat_prompt(req.messages) == "System: Be brief.\nUser: Hi\nAssistant:"
    assert chat_prompt(req.messages, lambda ms: "|".join(m["role"] + "=" + m["content"] for m in ms)) == \
        "system=Be brief.|user=Hi"


def test_prompt_ids_are_checked():
    assert check_prompt_ids([5, 6], 4, 100, 3, "prompt") == [5, 6]
    for ids, code in (([], None), ([5] * 5, "context_length_exceeded"), ([5, 3], None), ([5, 100], None)):
        error = refused(check_prompt_ids, ids, 4, 100, 3, "prompt")
        assert (error.status, error.param, error.code) == (400, "prompt", code)


def test_host_and_origin_checks():
    keyless, keyed = ServeConfig(), ServeConfig(api_key="k")
    for host in ("127.0.0.1:8000", "localhost:80", "[::1]:8000", "LOCALHOST"):
        check_origin(host, None, keyless)
        check_origin(host, f"http://{host.lower()}", keyless)
    for host in ("evil.example:8000", None, "127.0.0.1.evil.example"):
        assert refused(check_origin, host, None, keyless).code == "host_not_allowed"
    check_origin("evil.example:8000", None, keyed)  # a key guards the server wherever it is reached from
    for origin in ("http://evil.example", "http://127.0.0.1:9999", "file://x"):
        assert refused(check_origin, "127.0.0.1:8000", origin, keyed).code == "origin_not_allowed"


def test_empty_api_key_is_refused():
    for key in ("", "  "):
        with pytest.raises(ValueError, match="empty"):
            ServeConfig(api_key=key).validate()
    ServeConfig(api_key="k").validate()


def test_chat_prompts_use_the_tokenizers_chat_template_when_it_has_one():
    """Prompts (the tokenizer's side of the server) with the shipped tokenizer, without and with a
    chat template: the template's text is what gets tokenized, and no transcript stop is needed."""
    import asyncio
    from types import SimpleNamespace

    from twotower.default import DEFAULT_MODEL_DIR
    from twotower.serve.prompts import Prompts
    from twotower.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL_DIR)
    model_config = SimpleNamespace(mask_token_id=3, vocab_size=len(tokenizer))
    messages = parse({"messages": [{"role": "user", "content": "Hi"}]}, ChatRequest).messages
    plain = Prompts(tokenizer, model_config, CONFIG)
    assert plain.template is None and asyncio.run(plain.chat(messages)) == "User: Hi\nAssistant:"
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    templated = Prompts(tokenizer, model_config, CONFIG)
    text = asyncio.run(templated.chat(messages))
    assert text == "<user>Hi<assistant>"
    ids = asyncio.run(templated.ids(text, "messages"))
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(APIError) as e:
        asyncio.run(templated.ids("x" * (templated.max_chars + 1), "messages"))
    assert e.value.code == "context_length_exceeded"
