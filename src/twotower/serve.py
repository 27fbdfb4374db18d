"""An OpenAI-compatible HTTP server for a TwoTower model (`twotower serve`).

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health.

One worker thread owns the model. Requests wait in a bounded queue (429 when full); the worker
takes the oldest one together with every queued request that can share its decoding settings and
decodes them as one left-padded batch. Streamed answers are server-sent events, one chunk per
committed block (per token in the AR modes). A request that runs past its timeout gets 504, and
a client that goes away, or whose answer hit a stop string, stops taking part in generation.

Safe defaults: loopback only, an optional API key on every route but /health, limits on body
size, prompt length and max_tokens, and an OpenAI-style 4xx error body for every bad request.
Beyond the OpenAI parameters a request may set `mode` (a name in `modes.MODES`: diffusion,
speculative, mock-ar, ar), `block_size`, `steps_per_block`, `draft_steps` (speculative),
`confidence_threshold`, `unmasking` (a rule of `sampler.UNMASKING_RULES`) and `top_k`;
`usage.tokens_per_denoiser_forward` reports how many tokens each denoiser forward produced for it,
and in speculative mode `usage` adds its drafted and accepted tokens and the tokens per
draft-and-verify round.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import os
import re
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .evaluate import left_pad
from .generation import GenerationStats, RowStreamer, StopGeneration, through_eos
from .modes import MODES, get_mode, run_mode
from .params import MIN_TEMPERATURE, DiffusionParams, SamplingParams
from .sampler import UNMASKING_RULES
from .tokenizer import IncrementalText

CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"  # a base model would otherwise go on to write the user's next turn
MAX_STOP_CHARS = 64
_TYPE_NAME = re.compile(r"str|int|float|bool|list\[.*\]|_\w+")


@dataclass
class ServeConfig:
    """Server limits and defaults."""

    model_name: str = "twotower"
    api_key: str | None = None
    max_prompt_tokens: int = 2048
    max_tokens_limit: int = 1024
    default_max_tokens: int = 128
    max_body_bytes: int = 1 << 20
    max_queue: int = 64  # requests waiting for the worker; more get 429
    max_batch_size: int = 16
    batch_wait: float = 0.01  # seconds the worker waits for compatible requests to join a batch
    request_timeout: float = 120.0  # seconds from arrival to the last token


class APIError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")


def _client_gone() -> JSONResponse:
    """The answer to a client that has already left; nobody reads it, but the access log does."""
    return JSONResponse(APIError(499, "the client closed the request", code="client_closed").body(), status_code=499)


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
    draft_steps: int | None = Field(None, ge=1, le=256)
    confidence_threshold: float | None = Field(None, ge=0.0, le=1.0)
    unmasking: str | None = None  # a name in sampler.UNMASKING_RULES


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


class ChatRequest(_Request):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


@dataclass(frozen=True)
class Sampling:
    """The decoding settings of one request, defaults filled in."""

    mode: str
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    block_size: int | None
    steps_per_block: int | None
    confidence_threshold: float | None
    unmasking: str | None
    seed: int | None
    stop: tuple[str, ...]
    draft_steps: int | None = None

    def batch_key(self):
        """Requests with equal keys may be decoded in one batch; None: this one runs alone (a seeded
        sampled request, so its answer depends only on its seed)."""
        sampled = self.temperature > 0
        if sampled and self.seed is not None:
            return None
        return (self.mode, self.sampling_params(), self.diffusion_params())

    def sampling_params(self) -> SamplingParams:
        if self.temperature < MIN_TEMPERATURE:
            return SamplingParams()
        return SamplingParams(self.temperature, self.top_k, self.top_p, seed=self.seed)

    def diffusion_params(self) -> DiffusionParams | None:
        if not get_mode(self.mode).uses_diffusion:
            return None
        return DiffusionParams(self.block_size, self.steps_per_block, self.confidence_threshold,
                               unmasking=self.unmasking or "confidence", draft_steps=self.draft_steps or 1)


def chat_prompt(messages: list[_Message]) -> str:
    """A plain transcript for base models: "User: ...\\nAssistant: ...\\n...\\nAssistant:"."""
    def text(content):
        return content if isinstance(content, str) else "".join(part.text for part in content)

    return "\n".join(f"{CHAT_ROLES[m.role]}: {text(m.content)}" for m in messages) + "\nAssistant:"


def _parse(model_type: type[BaseModel], raw: bytes) -> BaseModel:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model_type.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        # union branches appear in the location as type names ("str", "list[int]"); leave them out
        where = ".".join(str(part) for part in first["loc"] if not _TYPE_NAME.fullmatch(str(part)))
        raise APIError(400, f"invalid request field '{where}': {first['msg']}",
                       param=str(first["loc"][0]) if first["loc"] else None) from None


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) one larger than `limit` bytes without reading it all."""
    too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    return bytes(body)


# ---------------------------------------------------------------------------------- jobs


class Job:
    """One request on its way through the worker. The worker thread calls `take`/`fail`; the
    event loop reads `events` and may `cancel`."""

    def __init__(self, prompt_ids: list[int], sampling: Sampling, text: IncrementalText, eos_id: int | None,
                 loop: asyncio.AbstractEventLoop):
        self.prompt_ids, self.sampling, self.text, self.eos_id, self.loop = prompt_ids, sampling, text, eos_id, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = False
        self.completion_tokens = 0
        self.denoiser_forwards = 0
        self.batch_stats: tuple[GenerationStats, int] | None = None  # its batch's statistics and its row

    @property
    def done(self) -> bool:
        return self.finished or self.cancelled.is_set()

    def cancel(self) -> None:
        self.cancelled.set()

    def _emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def take(self, tokens: list[int]) -> None:
        """New tokens for this row: pass on their text, finish at EOS, a stop string or max_tokens."""
        if self.done:
            return
        tokens, hit_eos = through_eos(tokens[:self.sampling.max_tokens - self.completion_tokens], self.eos_id)
        self.completion_tokens += len(tokens)
        if self.sampling.mode == "mock-ar":
            self.denoiser_forwards += len(tokens)
        at_limit = self.completion_tokens >= self.sampling.max_tokens
        delta, stopped = self.text.feed(tokens[:-1] if hit_eos else tokens, final=hit_eos or at_limit)
        if stopped or hit_eos or at_limit:
            self.finished = True
            self._emit("done", delta, "stop" if stopped or hit_eos else "length", self.usage())
        else:
            self._emit("delta", delta)

    def fail(self, error: APIError) -> None:
        if not self.done:
            self.finished = True
            self._emit("error", error)

    def usage(self) -> dict:
        forwards = self.denoiser_forwards
        usage = {"prompt_tokens": len(self.prompt_ids), "completion_tokens": self.completion_tokens,
                 "total_tokens": len(self.prompt_ids) + self.completion_tokens,
                 "tokens_per_denoiser_forward": self.completion_tokens / forwards if forwards else None}
        stats, row = self.batch_stats or (None, None)
        if stats is not None and stats.speculation:  # speculative decoding: this row's rounds
            s = stats.speculation[row]
            usage.update(drafted_tokens=s.drafted, accepted_tokens=s.accepted,
                         tokens_per_round=s.tokens_per_round if s.rounds else None)
        return usage

    async def events_until(self, request: Request, deadline: float):
        """This job's events until done or error. Raises a 504 APIError at the deadline; ends
        quietly, cancelling the job, when the client has gone."""
        while True:
            left = deadline - self.loop.time()
            if left <= 0:
                self.cancel()
                raise APIError(504, "the request timed out before generation finished", type="timeout_error",
                               code="timeout")
            try:
                event = await asyncio.wait_for(self.events.get(), min(left, 0.5))
            except asyncio.TimeoutError:
                event = None
            if await request.is_disconnected():
                self.cancel()
                return
            if event is None:
                continue
            if event[0] == "error":
                raise event[1]
            yield event
            if event[0] == "done":
                return


class Engine:
    """The queue and the worker thread that owns the model."""

    def __init__(self, model, config: ServeConfig, eos_id: int | None, pad_id: int):
        self.model, self.config, self.eos_id, self.pad_id = model, config, eos_id, pad_id
        self.pending: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        # abandoned: rows whose client left or timed out before they were done
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "abandoned": 0}
        self.running: list[Job] = []
        self.thread = threading.Thread(target=self._work, name="twotower-serve-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for job in list(self.running):
            job.fail(_shutting_down())
        self.thread.join()
        for job in self.pending:
            job.fail(_shutting_down())
        self.pending.clear()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise _shutting_down()
            if len(self.pending) >= self.config.max_queue:
                raise APIError(429, "too many requests are waiting; try again later", type="rate_limit_error",
                               code="queue_full")
            self.pending.append(job)
            self.cond.notify_all()

    def withdraw(self, job: Job) -> None:
        """Cancel a job and drop it from the queue if it has not started."""
        job.cancel()
        with self.cond:
            if job in self.pending:
                self.pending.remove(job)

    def queued(self) -> int:
        with self.cond:
            return len(self.pending)

    def _next_batch(self) -> list[Job] | None:
        """The oldest waiting job and up to max_batch_size - 1 compatible ones, waiting at most
        batch_wait for them to arrive; None when stopping."""
        with self.cond:
            while not self.pending and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return None
            batch = [self.pending.popleft()]
            key = batch[0].sampling.batch_key()
            if key is None:
                return batch
            deadline = time.monotonic() + self.config.batch_wait
            while True:
                joining = [j for j in self.pending if j.sampling.batch_key() == key]
                joining = joining[:self.config.max_batch_size - len(batch)]
                for job in joining:
                    self.pending.remove(job)
                batch += joining
                left = deadline - time.monotonic()
                if len(batch) >= self.config.max_batch_size or left <= 0 or self.stopping:
                    return batch
                self.cond.wait(left)

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [job for job in batch if not job.done]
            if batch:
                self._generate(batch)

    def _generate(self, jobs: list[Job]) -> None:
        """Decode compatible jobs as one left-padded batch, handing each row's tokens to its job."""
        s = jobs[0].sampling
        self.stats["batches"] += 1
        self.stats["rows"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        streamer = RowStreamer(len(jobs), lambda row, tokens: jobs[row].take(tokens), lambda row: jobs[row].done,
                               self.eos_id)

        def count_step(step):  # diffusion's step_callback: one denoiser forward for each row in the step
            for row in step.rows.tolist():
                if not jobs[row].done:
                    jobs[row].denoiser_forwards += 1

        self.running = jobs
        stats = GenerationStats()
        for row, job in enumerate(jobs):
            job.batch_stats = (stats, row)
        try:
            ids, mask = left_pad([job.prompt_ids for job in jobs], self.pad_id)
            run_mode(self.model, s.mode, ids, max(job.sampling.max_tokens for job in jobs), attention_mask=mask,
                     sampling=s.sampling_params(), diffusion=s.diffusion_params(), eos_token_id=self.eos_id,
                     streamer=streamer, step_callback=count_step, stats=stats)
        except StopGeneration:
            pass
        except Exception as e:  # a failed batch answers its requests; the worker goes on
            for job in jobs:
                job.fail(APIError(500, f"generation failed: {e}", type="server_error", code="generation_failed"))
        finally:
            self.running = []
            self.stats["abandoned"] += sum(not job.finished for job in jobs)


# ---------------------------------------------------------------------------------- the app


def create_app(model, tokenizer, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving `model` (a TwoTowerForCausalLM) with `tokenizer`. Its worker
    thread runs during the app's lifespan; `app.state.engine.stats` counts batches and rows."""
    config = config or ServeConfig()
    model.eval()
    tokenizer_lock = threading.Lock()
    mask_id = model.config.mask_token_id
    mask_text = tokenizer.convert_ids_to_tokens(mask_id)
    eos_id = tokenizer.eos_token_id
    engine = Engine(model, config, eos_id, tokenizer.pad_token_id or 0)

    def encode(text: str) -> list[int]:
        with tokenizer_lock:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(ids: list[int]) -> str:
        with tokenizer_lock:
            return tokenizer.decode(ids, skip_special_tokens=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="twotower", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.config = config

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(APIError(error.status_code, str(error.detail), code=code).body(),
                            status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)

    async def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "a valid API key is required (Authorization: Bearer KEY)",
                           type="authentication_error", code="invalid_api_key")

    protected = [Depends(check_key)]

    def sampling_of(req: _Request, max_tokens: int | None, extra_stop: tuple[str, ...] = ()) -> Sampling:
        if req.model is not None and req.model != config.model_name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server has '{config.model_name}'",
                           param="model", code="model_not_found")
        if req.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n")
        max_tokens = config.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens > config.max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}, more than this server's limit of "
                           f"{config.max_tokens_limit}", param="max_tokens")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > 4 or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stop):
            raise APIError(400, f"stop must be a string of 1 to {MAX_STOP_CHARS} characters or a list of at most "
                           "4 of them", param="stop")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
        mode = req.mode or "diffusion"
        if mode not in MODES:
            raise APIError(400, f"mode must be one of {list(MODES)}, got {mode!r}", param="mode")
        if req.unmasking is not None and req.unmasking not in UNMASKING_RULES:
            raise APIError(400, f"unmasking must be one of {list(UNMASKING_RULES)}, got {req.unmasking!r}",
                           param="unmasking")
        temperature = req.temperature or 0.0
        return Sampling(mode=mode, max_tokens=max_tokens,
                        temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
                        top_p=req.top_p, top_k=req.top_k, block_size=req.block_size,
                        steps_per_block=req.steps_per_block, confidence_threshold=req.confidence_threshold,
                        unmasking=req.unmasking, seed=req.seed, stop=stop + extra_stop, draft_steps=req.draft_steps)

    def prompt_ids(prompt: str | list[int], param: str) -> list[int]:
        """The prompt's token ids, checked against the server's limits and the vocabulary."""
        if isinstance(prompt, str) and mask_text in prompt:
            raise APIError(400, f"the prompt contains the mask token {mask_text}, which only the sampler may "
                           "place", param=param)
        ids = encode(prompt) if isinstance(prompt, str) else prompt
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(ids) > config.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, more than this server's limit of "
                           f"{config.max_prompt_tokens}", param=param, code="context_length_exceeded")
        if any(i == mask_id for i in ids):
            raise APIError(400, f"the prompt contains token id {mask_id}, the mask token", param=param)
        if any(not 0 <= i < model.config.vocab_size for i in ids):
            raise APIError(400, f"the prompt has a token id outside [0, {model.config.vocab_size})", param=param)
        return ids

    async def start_job(request: Request, ids: list[int], sampling: Sampling):
        """Queue a job and wait for its first event: (job, its event iterator, the first event or None
        when the client left while waiting)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.request_timeout
        job = Job(ids, sampling, IncrementalText(decode, sampling.stop), eos_id, loop)
        engine.submit(job)
        events = job.events_until(request, deadline)
        try:
            first = await anext(events, None)
        except BaseException:
            engine.withdraw(job)
            raise
        if first is None:  # the client went away while waiting
            engine.withdraw(job)
        return job, events, first

    async def respond(request: Request, req: _Request, ids: list[int], sampling: Sampling, chat: bool):
        """Run the job and answer with one JSON body, or with server-sent events when streaming."""
        job, events, first = await start_job(request, ids, sampling)
        if first is None:
            return _client_gone()
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": config.model_name}

        def choice(text: str, finish: str | None, streamed: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            body = {"content": text} if streamed else {"role": "assistant", "content": text}
            return {"index": 0, "delta" if streamed else "message": body, "logprobs": None, "finish_reason": finish}

        if not req.stream:
            parts, event = [], first
            try:
                async for event in _chain(first, events):
                    parts.append(event[1])
            finally:
                engine.withdraw(job)
            if event[0] != "done":
                return _client_gone()
            return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion",
                                 "choices": [choice("".join(parts), event[2], False)], "usage": event[3]})

        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        include_usage = req.stream_options is not None and req.stream_options.include_usage

        def sse(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        async def stream():
            try:
                if chat:
                    yield sse({**head, "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}]})
                async for event in _chain(first, events):
                    finish = event[2] if event[0] == "done" else None
                    yield sse({**head, "choices": [choice(event[1], finish, True)]})
                    if finish and include_usage:
                        yield sse({**head, "choices": [], "usage": event[3]})
                    if finish:
                        yield "data: [DONE]\n\n"
            except APIError as error:
                yield sse(error.body())
            finally:
                engine.withdraw(job)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "queued": engine.queued(),
                "running": len(engine.running), **engine.stats}

    @app.get("/v1/models", dependencies=protected)
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "twotower"}]}

    @app.post("/v1/completions", dependencies=protected)
    async def completions(request: Request):
        req = _parse(CompletionRequest, await _read_body(request, config.max_body_bytes))
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        sampling = sampling_of(req, req.max_tokens)
        ids = prompt_ids(prompt, "prompt")
        return await respond(request, req, ids, sampling, chat=False)

    @app.post("/v1/chat/completions", dependencies=protected)
    async def chat_completions(request: Request):
        req = _parse(ChatRequest, await _read_body(request, config.max_body_bytes))
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        sampling = sampling_of(req, req.max_completion_tokens or req.max_tokens, (CHAT_STOP,))
        ids = prompt_ids(chat_prompt(req.messages), "messages")
        return await respond(request, req, ids, sampling, chat=True)

    return app


async def _chain(first, rest):
    yield first
    if first[0] != "done":
        async for event in rest:
            yield event


@contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Run `app` under uvicorn in a daemon thread (port 0: a free one); yields its base URL and
    stops it on exit. For tests, benchmarks and embedding in other programs."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


# ---------------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    defaults = ServeConfig()
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--model-name", default=defaults.model_name, help="the model id clients send")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("TWOTOWER_API_KEY"),
                        help="require this bearer key on every route but /health (env: TWOTOWER_API_KEY)")
    parser.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens_limit,
                        help="the largest max_tokens a request may ask for")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue)
    parser.add_argument("--timeout", type=float, default=defaults.request_timeout, help="seconds per request")


def run(args) -> int:
    import uvicorn

    from .default import load_model

    try:
        model, tokenizer = load_model(args.model)
    except FileNotFoundError as e:
        print(f"error: {e}")
        return 1
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without an API key; anyone who can reach it may use it")
    config = ServeConfig(model_name=args.model_name, api_key=args.api_key, max_prompt_tokens=args.max_prompt_tokens,
                         max_tokens_limit=args.max_tokens, max_batch_size=args.max_batch_size,
                         max_queue=args.max_queue, request_timeout=args.timeout)
    uvicorn.run(create_app(model, tokenizer, config), host=args.host, port=args.port)
    return 0
