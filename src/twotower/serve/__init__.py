"""An OpenAI-compatible HTTP server for a TwoTower model (`twotower serve`).

* `protocol`: the request and response format as pure functions (schemas, request -> `Sampling`,
  job events -> completion bodies and stream chunks, errors, who may ask);
* `engine`: the worker thread that owns the model, the bounded queue, batching and admission;
* `prompts`: the tokenizer's side; `stream`: a job's events as one JSON body or server-sent events;
* `app`: the routes (POST /v1/completions, /v1/chat/completions; GET /v1/models, /health);
* `page`: the playground at `/` (files in `static/`);
* `cli`: the command line and uvicorn.

Safe defaults: loopback only, an optional API key on every route but /health, Host and Origin
checks, read timeouts, limits on body size, prompt length and max_tokens, and an OpenAI-style 4xx
error body for every bad request. Beyond the OpenAI parameters a request may set `mode`,
`block_size`, `steps_per_block`, `confidence_threshold` and `top_k`.
"""

from ..lazy_imports import lazy_attributes

# public name -> the submodule that defines it (imported on first use: `--help` needs no fastapi)
_SOURCES = {"APIError": "protocol", "Engine": "engine", "Job": "engine", "Sampling": "protocol",
            "ServeConfig": "config", "add_arguments": "cli", "background_server": "cli", "create_app": "app",
            "run": "cli"}
__all__ = list(_SOURCES)
__getattr__, __dir__ = lazy_attributes(globals(), _SOURCES)
