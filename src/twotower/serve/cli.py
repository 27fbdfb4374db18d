"""`twotower serve`: the command line, and running the app under uvicorn (also in a thread, for
tests and benchmarks)."""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager

from .config import LOOPBACK_HOSTS, ServeConfig


def read_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request (headers and
    body) within `seconds` of opening or of its previous answer; uvicorn itself waits forever for a
    first request and lets a trickle of bytes keep a connection open."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ReadTimeoutProtocol(H11Protocol):
        read_timer = None

        def _arm(self) -> None:
            if self.read_timer is not None:
                self.read_timer.cancel()
            self.read_timer = self.loop.call_later(seconds, self._read_timed_out)

        def _read_timed_out(self) -> None:
            if self.conn.their_state is not h11.DONE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            if self.read_timer is not None:
                self.read_timer.cancel()
            super().connection_lost(exc)

    return ReadTimeoutProtocol


def uvicorn_server(app, config: ServeConfig, **kw):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, http=read_timeout_protocol(config.read_timeout), **kw))


@contextmanager
def background_server(app, host: str = "127.0.0.1", port: int = 0):
    """Run `app` (from `create_app`) under uvicorn in a daemon thread (port 0: a free one); yields
    its base URL and stops it on exit. For tests, benchmarks and embedding in other programs."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))
    server = uvicorn_server(app, app.state.config, log_level="warning")
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


def add_arguments(parser) -> None:
    defaults = ServeConfig()
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--model-name", default=defaults.model_name, help="the model id clients send")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("TWOTOWER_API_KEY"),
                        help="require this bearer key on every route but /health (env: TWOTOWER_API_KEY)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a further Host name clients may use when no key is set (repeatable)")
    parser.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens_limit,
                        help="the largest max_tokens a request may ask for")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue)
    parser.add_argument("--timeout", type=float, default=defaults.request_timeout, help="seconds per request")
    parser.add_argument("--read-timeout", type=float, default=defaults.read_timeout,
                        help="seconds a connection has to send a whole request")
    parser.add_argument("--compile", action="store_true",
                        help="decode on the compiled path (torch.compile); compiles AR and diffusion decoding "
                             "(batches of 1 and 2) before serving, other modes and settings at first use")


def config_of(args) -> ServeConfig:
    """The server's settings from the command line; ValueError for settings it refuses."""
    if not args.host.strip():
        raise ValueError("--host is empty; give an address (127.0.0.1: this machine only, 0.0.0.0: every "
                         "interface)")
    wildcard = args.host in ("0.0.0.0", "::")
    hosts = LOOPBACK_HOSTS + tuple(h.lower() for h in args.allowed_host) + (() if wildcard else (args.host.lower(),))
    config = ServeConfig(model_name=args.model_name, api_key=args.api_key, allowed_hosts=hosts,
                         max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens,
                         max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                         request_timeout=args.timeout, read_timeout=args.read_timeout)
    config.validate()
    return config


def warm_up_compiled(model, tokenizer) -> float:
    """Switch the compiled path on and compile what serving needs first: AR and diffusion decoding
    of batches of one and of two rows (a batch of one compiles a graph of its own). Returns the
    seconds spent compiling."""
    import torch

    from ..compiled import compile_for_decoding, compile_seconds
    from ..modes import run_mode

    compile_for_decoding(model)
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    for batch in (ids, torch.cat([ids, ids])):
        for mode in ("ar", "diffusion"):
            run_mode(model, mode, batch, model.config.block_size)
    return compile_seconds(model)


def run(args) -> int:
    from ..default import load_model
    from .app import create_app

    try:
        config = config_of(args)
        model, tokenizer = load_model(args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2 if isinstance(e, ValueError) else 1
    if args.api_key is None and args.host not in LOOPBACK_HOSTS:
        print(f"warning: serving on {args.host} without an API key; anyone who can reach it may use it "
              f"(with a Host header among: {', '.join(config.allowed_hosts)})")
    if args.compile:
        print(f"compiled decoding ready after {warm_up_compiled(model, tokenizer):.0f}s of compiling", flush=True)
    uvicorn_server(create_app(model, tokenizer, config), config, host=args.host, port=args.port).run()
    return 0
