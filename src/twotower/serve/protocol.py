"""The OpenAI-compatible request and response format, as pure functions (no HTTP, no model).

Requests: JSON bodies are parsed strictly (JSON types checked, unknown fields refused), fields
that OpenAI clients send with their no-op default are accepted (and refused with a clear message
when set to anything else), and the result becomes one frozen `Sampling`. Responses: the events of
a job (text deltas, then the finish reason and usage) become completion bodies or stream chunks.
Every refusal is an `APIError`, answered with OpenAI's error body.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import two_tower  # noqa: F401  (registers the model's generation modes)
from ..generation import GenerationStats
from ..modes import MODES, get_mode
from ..params import MIN_TEMPERATURE, DiffusionParams, SamplingParams
from ..sampler import UNMASKING_RULES
from .config import LOOPBACK_HOSTS, ServeConfig  # noqa: F401  (also importable from here)

CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"  # a base model would otherwise go on to write the user's next turn
MAX_STOP_CHARS = 64
OPENAI_DEFAULT_TEMPERATURE = 1.0  # an omitted temperature means what it means to OpenAI: sampling at 1
_TYPE_NAME = re.compile(r"str|int|float|bool|list\[.*\]|_\w+")

# Fields OpenAI clients and frameworks send with values that ask for nothing this server lacks:
# each is accepted with one of these values and refused (400) with any other.
NO_OP_VALUES = {
    "presence_penalty": (0,), "frequency_penalty": (0,), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
    "store": (None, False), "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
    "function_call": (None, "none", "auto"), "parallel_tool_calls": (None, True, False), "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
    "metadata": None, "service_tier": (None, "auto", "default"), "modalities": (None, ["text"]),
}  # None: any value (metadata is the caller's own annotation)


class APIError(Exception):
    """An error answered with an OpenAI-style body; `retry_after` (seconds) becomes Retry-After."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict:
        return {} if self.retry_after is None else {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


# ---------------------------------------------------------------------------------- requests


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Request(BaseModel):
    """Fields common to both endpoints; JSON types are checked strictly and unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    user: str | None = None
    mode: str | None = None  # a name in MODES, checked when the request is read (modes may be registered late)
    block_size: int | None = Field(None, ge=1, le=256)
    steps_per_block: int | None = Field(None, ge=1, le=1024)
    draft_steps: int | None = Field(None, ge=1, le=256)  # speculative decoding's draft steps
    confidence_threshold: float | None = Field(None, ge=0.0, le=1.0)
    unmasking: str | None = None  # a name in sampler.UNMASKING_RULES
    stream_steps: bool | None = None  # also stream every denoising step ("twotower.step" chunks)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


@dataclass(frozen=True)
class Sampling:
    """The decoding settings of one request: the mode, the library's settings objects (greedy
    requests carry the default `SamplingParams`, whatever filters they named), stop strings."""

    mode: str
    max_tokens: int
    sampling: SamplingParams
    diffusion: DiffusionParams | None  # None: a mode without diffusion
    stop: tuple[str, ...] = ()

    def batch_key(self):
        """Requests with equal keys may be decoded in one batch; None: this one runs alone (a seeded
        sampled request, so its answer depends only on its seed)."""
        return None if self.sampling.seed is not None else (self.mode, self.sampling, self.diffusion)

    def cost_key(self) -> tuple:
        """The settings that decide how long a token takes."""
        return self.mode, self.diffusion


def lone_surrogate(value) -> bool:
    """Whether a parsed JSON value holds a string with an unpaired UTF-16 surrogate ("\\ud800"),
    which JSON allows but no UTF-8 text (the tokenizer, the answer) can hold."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(lone_surrogate(k) or lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(lone_surrogate(v) for v in value)
    return False


def check_no_op_fields(data: dict) -> None:
    """Remove the fields of NO_OP_VALUES from a request body, refusing any set to a value that
    would ask for something this server does not do."""
    for name in [k for k in data if k in NO_OP_VALUES]:
        value, accepted = data.pop(name), NO_OP_VALUES[name]
        if accepted is not None and not any(type(value) is type(a) and value == a or
                                            isinstance(a, int) and not isinstance(a, bool) and
                                            type(value) is float and value == a for a in accepted):
            shown = ", ".join(json.dumps(a) for a in accepted)
            raise APIError(400, f"'{name}' = {json.dumps(value)[:80]} is not supported by this server "
                           f"(accepted: {shown})", param=name, code="unsupported_parameter")


def parse_request(model_type: type[BaseModel], raw: bytes) -> BaseModel:
    """A request body (bytes) -> the validated request, or an APIError (400)."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:  # ValueError: JSON errors, integers of 4,300+ digits
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    if lone_surrogate(data):
        raise APIError(400, "the request holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text")
    check_no_op_fields(data)
    try:
        return model_type.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        # union branches appear in the location as type names ("str", "list[int]"); leave them out
        where = ".".join(str(part) for part in first["loc"] if not _TYPE_NAME.fullmatch(str(part)))
        raise APIError(400, f"invalid request field '{where}': {first['msg']}",
                       param=str(first["loc"][0]) if first["loc"] else None) from None


def sampling_of(req: _Request, config: ServeConfig, model_defaults: dict, max_tokens: int | None,
                extra_stop: tuple[str, ...] = ()) -> Sampling:
    """A request's decoding settings, or an APIError. `model_defaults`: the model's `block_size` and
    `steps_per_block`; a diffusion block never spans more positions than `max_tokens` asks for."""
    if req.model is not None and req.model != config.model_name:
        raise APIError(404, f"the model '{req.model[:100]}' does not exist; this server has '{config.model_name}'",
                       param="model", code="model_not_found")
    if req.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    max_tokens = min(config.default_max_tokens, config.max_tokens_limit) if max_tokens is None else max_tokens
    if max_tokens > config.max_tokens_limit:
        raise APIError(400, f"max_tokens is {max_tokens}, more than this server's limit of "
                       f"{config.max_tokens_limit}", param="max_tokens")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > 4 or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise APIError(400, f"stop must be a string of 1 to {MAX_STOP_CHARS} characters or a list of at most "
                       "4 of them", param="stop")
    for name in ("stream_options", "stream_steps"):
        if getattr(req, name) and not req.stream:
            raise APIError(400, f"{name} is only allowed with stream: true", param=name)
    temperature = OPENAI_DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
    mode = req.mode or "diffusion"
    if mode not in MODES:
        raise APIError(400, f"mode must be one of {list(MODES)}, got {mode[:100]!r}", param="mode")
    if req.unmasking is not None and req.unmasking not in UNMASKING_RULES:
        raise APIError(400, f"unmasking must be one of {list(UNMASKING_RULES)}, got {req.unmasking[:100]!r}",
                       param="unmasking")
    try:
        sampling = SamplingParams() if temperature < MIN_TEMPERATURE else SamplingParams(
            temperature, req.top_k, req.top_p, seed=req.seed)
        diffusion = None
        if get_mode(mode).uses_diffusion:
            block = min(req.block_size or model_defaults["block_size"], max_tokens)
            diffusion = DiffusionParams(block, req.steps_per_block or min(model_defaults["steps_per_block"], block),
                                        req.confidence_threshold, unmasking=req.unmasking or "confidence",
                                        draft_steps=req.draft_steps or 1)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return Sampling(mode, max_tokens, sampling, diffusion, stop + extra_stop)


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    return prompt


def chat_max_tokens(req: ChatRequest) -> int | None:
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
    return req.max_completion_tokens or req.max_tokens


def chat_prompt(messages: list[_Message], template=None) -> str:
    """The prompt of a chat: `template(list of {"role", "content"}) -> str` when the tokenizer has a
    chat template, else a plain transcript for base models: "User: ...\\nAssistant: ...\\nAssistant:"."""
    if template is not None:
        return template([{"role": m.role, "content": m.text()} for m in messages])
    return "\n".join(f"{CHAT_ROLES[m.role]}: {m.text()}" for m in messages) + "\nAssistant:"


def check_prompt_chars(prompt: str, max_chars: int, param: str) -> None:
    """Refuse, before tokenizing, a prompt too long to fit in any number of tokens within the limit
    (`max_chars`: the token limit times the longest token's length)."""
    if len(prompt) > max_chars:
        raise APIError(400, f"the prompt has {len(prompt)} characters, more than this server's token limit "
                       "can hold", param=param, code="context_length_exceeded")


def check_prompt_ids(ids: list[int], max_tokens: int, vocab_size: int, mask_id: int, param: str) -> list[int]:
    """The prompt's token ids, checked against the server's limit and the vocabulary."""
    if not ids:
        raise APIError(400, "the prompt is empty", param=param)
    if len(ids) > max_tokens:
        raise APIError(400, f"the prompt has {len(ids)} tokens, more than this server's limit of "
                       f"{max_tokens}", param=param, code="context_length_exceeded")
    if any(i == mask_id for i in ids):
        raise APIError(400, f"the prompt contains token id {mask_id}, the mask token", param=param)
    if any(not 0 <= i < vocab_size for i in ids):
        raise APIError(400, f"the prompt has a token id outside [0, {vocab_size})", param=param)
    return ids


# ---------------------------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int, stats: GenerationStats, row: int | None = None) -> dict:
    """OpenAI's usage plus every counter of the batch's `GenerationStats` when the row finished (the
    forwards it took part in) and the tokens each denoiser forward gave this row (None: no denoiser);
    in speculative decoding also the row's (its index in the batch) drafted and accepted tokens and
    the tokens per draft-and-verify round."""
    counters = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)
                if f.type in ("int", int) and f.name != "generated_tokens"}
    forwards = counters.get("denoiser_forwards", 0)
    result = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
              "total_tokens": prompt_tokens + completion_tokens, **counters,
              "tokens_per_denoiser_forward": completion_tokens / forwards if forwards else None}
    if row is not None and stats.speculation:
        rounds = stats.speculation[row]
        result.update(drafted_tokens=rounds.drafted, accepted_tokens=rounds.accepted,
                      tokens_per_round=rounds.tokens_per_round if rounds.rounds else None)
    return result


def response_head(chat: bool, model_name: str, request_id: str, created: int) -> dict:
    return {"id": ("chatcmpl-" if chat else "cmpl-") + request_id, "created": created, "model": model_name}


def _choice(chat: bool, text: str, finish: str | None, streamed: bool) -> dict:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    body = {"content": text} if streamed else {"role": "assistant", "content": text}
    return {"index": 0, "delta" if streamed else "message": body, "logprobs": None, "finish_reason": finish}


def completion_body(head: dict, chat: bool, text: str, finish: str, usage: dict) -> dict:
    """The whole answer of a request that did not stream."""
    return {**head, "object": "chat.completion" if chat else "text_completion",
            "choices": [_choice(chat, text, finish, False)], "usage": usage}


def stream_chunks(head: dict, chat: bool, event: tuple, include_usage: bool) -> list[dict]:
    """The chunks of one job event: ("delta", text), ("done", text, finish_reason, usage), or
    ("step", {"block", "step", "tokens", "committed"}): one denoising step, sent only to a request
    that set `stream_steps` (tokens: each position's text, null where still masked; committed:
    the positions this step committed)."""
    if event[0] == "step":
        return [{**head, "object": "twotower.step", **event[1]}]
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    finish = event[2] if event[0] == "done" else None
    chunks = [{**head, "choices": [_choice(chat, event[1], finish, True)]}]
    if finish and include_usage:
        chunks.append({**head, "choices": [], "usage": event[3]})
    return chunks


def stream_opening(head: dict, chat: bool) -> list[dict]:
    """What a stream sends before the first block: the assistant's role, in chat."""
    if not chat:
        return []
    return [{**head, "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}]


def sse(payload: dict | str) -> str:
    """One server-sent event; "[DONE]" ends an OpenAI stream."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


# ---------------------------------------------------------------------------------- who may ask


def _hostname(authority: str) -> str:
    """"host:port" or "[v6]:port" -> host, lower case."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:authority.find("]")] if "]" in authority else authority
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def check_origin(host: str | None, origin: str | None, config: ServeConfig) -> None:
    """Refuse (403) a request from a web page of another site (its Origin is not this server) and,
    when no API key is set, one whose Host is not a name of this server: a page on another site
    could otherwise reach a loopback server by DNS rebinding."""
    if config.api_key is None and (host is None or _hostname(host) not in config.allowed_hosts):
        raise APIError(403, f"requests for host '{(host or '')[:100]}' are not served here (allowed: "
                       f"{', '.join(config.allowed_hosts)}; an API key lifts this check)", code="host_not_allowed")
    if origin is not None and origin != "null":
        scheme, _, authority = origin.partition("://")
        if host is None or authority.lower() != host.strip().lower() or scheme not in ("http", "https"):
            raise APIError(403, "cross-origin requests are not served: the page's origin "
                           f"'{origin[:100]}' is not this server", code="origin_not_allowed")
