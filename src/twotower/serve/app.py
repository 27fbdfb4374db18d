"""The HTTP routes: POST /v1/completions and /v1/chat/completions, GET /v1/models[/{id}], /health,
and the playground page (`page.py`)."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..tokenizer import IncrementalText
from . import protocol as p
from .engine import Engine, Job
from .page import add_page
from .prompts import Prompts
from .stream import answer, read_body


def create_app(model, tokenizer, config: p.ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving `model` (a TwoTowerForCausalLM) with `tokenizer`. Its worker
    thread runs during the app's lifespan; `app.state.engine.stats` counts batches and rows."""
    config = config or p.ServeConfig()
    config.validate()
    model.eval()
    prompts = Prompts(tokenizer, model.config, config)
    engine = Engine(model, config, tokenizer.eos_token_id, tokenizer.pad_token_id or 0)
    defaults = {"block_size": model.config.block_size, "steps_per_block": model.config.steps_per_block}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="twotower", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.config = engine, config

    def error_response(error: p.APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers())

    async def api_error(request: Request, error: p.APIError):
        return error_response(error)

    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return error_response(p.APIError(error.status_code, str(error.detail), code=code))

    async def server_error(request: Request, error: Exception):
        return error_response(p.APIError(500, "internal server error", type="server_error"))

    for kind, handler in ((p.APIError, api_error), (StarletteHTTPException, http_error), (Exception, server_error)):
        app.add_exception_handler(kind, handler)

    @app.middleware("http")
    async def same_site_only(request: Request, call_next):
        try:
            p.check_origin(request.headers.get("host"), request.headers.get("origin"), config)
        except p.APIError as error:
            return error_response(error)
        return await call_next(request)

    async def check_key(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if config.api_key is not None and (scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), config.api_key.encode())):
            raise p.APIError(401, "a valid API key is required (Authorization: Bearer KEY)",
                             type="authentication_error", code="invalid_api_key")

    async def body_of(request: Request, model_type):
        return p.parse_request(model_type, await read_body(request, config.max_body_bytes))

    async def respond(request: Request, req, ids: list[int], sampling: p.Sampling, chat: bool):
        """Run the job; answer with one JSON body, or with server-sent events when streaming."""
        loop = asyncio.get_running_loop()
        job = Job(ids, sampling, IncrementalText(prompts.decode, sampling.stop), tokenizer.eos_token_id, loop,
                  show_step=prompts.pieces if req.stream_steps and sampling.diffusion is not None else None)
        engine.submit(job, config.request_timeout)
        events = job.events_until(request.is_disconnected, loop.time() + config.request_timeout)
        head = p.response_head(chat, config.model_name, uuid.uuid4().hex, int(time.time()))
        return await answer(events, head, chat, req, lambda: engine.withdraw(job))

    add_page(app, model.config, config.max_tokens_limit)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "queued": engine.queued(),
                "running": len(engine.running), **engine.stats}

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "twotower"}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(check_key)])
    async def one_model(model_id: str):
        if model_id != config.model_name:
            raise p.APIError(404, f"the model '{model_id[:100]}' does not exist; this server has "
                             f"'{config.model_name}'", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request):
        req = await body_of(request, p.CompletionRequest)
        sampling = p.sampling_of(req, config, defaults, req.max_tokens)
        return await respond(request, req, await prompts.ids(p.completion_prompt(req), "prompt"), sampling, False)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request):
        req = await body_of(request, p.ChatRequest)
        extra_stop = () if prompts.template else (p.CHAT_STOP,)
        sampling = p.sampling_of(req, config, defaults, p.chat_max_tokens(req), extra_stop)
        return await respond(request, req, await prompts.ids(await prompts.chat(req.messages), "messages"),
                             sampling, True)

    return app
