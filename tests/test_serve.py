"""The OpenAI-compatible server, exercised over real loopback HTTP with the real `openai` client."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
psutil = pytest.importorskip("psutil")

from twotower.serve import ServeConfig, background_server, create_app  # noqa: E402
from twotower.tokenizer import IncrementalText  # noqa: E402

KEY = "test-key"
MODEL = "twotower"
PROMPTS = ["Once upon a time", "The little dog ran to the", "Lily and Tom", "One day, a big red ball"]
# one denoiser forward per committed token in 256-wide blocks: a request that keeps the worker busy
SLOW = dict(mode="diffusion", block_size=256, steps_per_block=256, confidence_threshold=1.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@contextmanager
def serving(model, tokenizer, config: ServeConfig):
    """A real uvicorn server on a free loopback port, in a background thread; yields its URL."""
    with background_server(create_app(model, tokenizer, config)) as url:
        yield url


@pytest.fixture(scope="module")
def server(embedded):
    with serving(*embedded, ServeConfig(model_name=MODEL, api_key=KEY, max_prompt_tokens=64, max_body_bytes=8192)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def ask(client, prompt: str, chat: bool = False, stream: bool = False, max_tokens: int = 8, temperature=0.0,
        seed=None, **extensions):
    """(text, finish_reason, usage, content chunks) through the openai client."""
    kw = dict(model=MODEL, max_tokens=max_tokens, temperature=temperature, extra_body=extensions)
    if seed is not None:
        kw["seed"] = seed
    create = client.chat.completions.create if chat else client.completions.create
    target = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    if not stream:
        r = create(**target, **kw)
        text = r.choices[0].message.content if chat else r.choices[0].text
        return text, r.choices[0].finish_reason, r.usage, 1
    parts, finish, usage, chunks = [], None, None, 0
    for chunk in create(**target, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        piece = (choice.delta.content if chat else choice.text)
        if chat and choice.delta.role == "assistant":  # the opening chunk, before any block
            continue
        parts.append(piece or "")
        chunks += 1
        finish = choice.finish_reason or finish
    return "".join(parts), finish, usage, chunks


def wait_for(http, predicate, what: str, limit: float = 30.0) -> dict:
    deadline = time.monotonic() + limit
    while not predicate(health := http.get("/health").json()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {health}"
        time.sleep(0.005)
    return health


# ---------------------------------------------------------------------------------- answers


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("mode,temperature,seed", [("diffusion", 0.0, None), ("diffusion", 0.9, 1234),
                                                   ("ar", 0.9, 77)], ids=["diffusion-greedy",
                                                                          "diffusion-seeded", "ar-seeded"])
def test_streamed_text_equals_plain_text(client, chat, mode, temperature, seed):
    kw = dict(chat=chat, max_tokens=12, temperature=temperature, seed=seed, mode=mode, block_size=4)
    text, finish, usage, _ = ask(client, PROMPTS[0], **kw)
    streamed, s_finish, s_usage, chunks = ask(client, PROMPTS[0], stream=True, **kw)
    assert (streamed, s_finish) == (text, finish)
    assert finish in ("stop", "length")
    assert s_usage.completion_tokens == usage.completion_tokens <= 12
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    per_chunk = 4 if mode == "diffusion" else 1  # one chunk per committed block, per token in AR
    assert chunks == math.ceil(usage.completion_tokens / per_chunk)
    forwards = usage.model_extra["tokens_per_denoiser_forward"]
    assert (forwards > 0) if mode == "diffusion" else forwards is None
    if seed is not None:  # the seed alone decides a sampled answer
        assert ask(client, PROMPTS[0], **kw)[0] == text


def test_the_unmasking_rule_is_a_request_field(client):
    """At threshold 0 the confidence rule commits a whole 8-token block in one forward; the fixed
    rule commits block_size / steps_per_block = 2 tokens per forward whatever the confidence."""
    kw = dict(max_tokens=8, mode="diffusion", block_size=8, steps_per_block=4, confidence_threshold=0.0)
    per_forward = {rule: ask(client, PROMPTS[0], unmasking=rule, **kw)[2].model_extra["tokens_per_denoiser_forward"]
                   for rule in ("confidence", "fixed")}
    assert per_forward == {"confidence": 8.0, "fixed": 2.0}


def test_a_mode_registered_later_is_served(client):
    """The server reads the mode table per request: a mode added after it started is served."""
    from twotower.modes import MODES, Mode, get_mode, register_mode

    register_mode(Mode("ar-again", get_mode("ar").generate, False, "the AR mode under another name"))
    try:
        assert ask(client, PROMPTS[0], mode="ar-again")[0] == ask(client, PROMPTS[0], mode="ar")[0]
    finally:
        del MODES["ar-again"]


def test_incremental_text_adds_up_decodes_windows_and_stops(embedded):
    """IncrementalText (the server's streams) with the real tokenizer, token by token: the pieces add up to the whole decode
    (characters split across byte-level tokens included), no call decodes more than a few tokens
    however long the answer, and a stop string ends the text without any of it leaking out."""
    tokenizer = embedded[1]
    text = "Once upon a time, Lily said: \"Café déjà vu, naïve ☃ 日本語!\" " * 12
    ids = tokenizer.encode(text, add_special_tokens=False)
    windows = []

    def decode(window):
        windows.append(len(window))
        return tokenizer.decode(window, skip_special_tokens=True)

    stream = IncrementalText(decode, ())
    pieces = [stream.feed([i], final=False)[0] for i in ids[:-1]] + [stream.feed(ids[-1:], final=True)[0]]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert len(ids) > 300 and max(windows) <= 8, max(windows)

    stream = IncrementalText(decode, ("vu, na",))
    pieces, stopped = [], False
    for i in ids:
        piece, stopped = stream.feed([i], final=False)
        pieces.append(piece)
        if stopped:
            break
    assert stopped and "".join(pieces) == text[:text.find("vu, na")]


def test_models_route_and_stop_strings(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    full = ask(client, PROMPTS[1], max_tokens=16, mode="ar")[0]
    stop = next(full[i:i + 2] for i in range(len(full) // 2, len(full) - 1) if full[i:i + 2].isascii()
                and full[i:i + 2].isalpha())
    cut = full[:full.find(stop)]
    for stream in (False, True):
        text, finish, _, _ = ask(client, PROMPTS[1], stream=stream, max_tokens=16, mode="ar", stop=[stop])
        assert (text, finish) == (cut, "stop")


def test_concurrent_clients_equal_sequential_and_memory_settles(client, http):
    kw = dict(max_tokens=8, block_size=4)
    jobs = [(PROMPTS[i % 4], ("diffusion", "ar")[i // 4 % 2]) for i in range(32)]
    alone = {(p, m): ask(client, p, mode=m, **kw)[0] for p, m in set(jobs)}
    before_rss, before = psutil.Process().memory_info().rss, http.get("/health").json()
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda job: ask(client, job[0], mode=job[1], **kw)[0], jobs))
    assert together == [alone[job] for job in jobs]
    after = http.get("/health").json()
    assert after["rows"] - before["rows"] == 32 and after["batches"] - before["batches"] < 32
    assert psutil.Process().memory_info().rss - before_rss < 200 * 2**20


def test_speculative_answers_are_ar_answers_with_draft_counts_in_usage(client):
    kw = dict(max_tokens=16, block_size=4)
    text, finish, usage, _ = ask(client, PROMPTS[1], mode="speculative", draft_steps=2, **kw)
    streamed, s_finish, s_usage, chunks = ask(client, PROMPTS[1], stream=True, mode="speculative", draft_steps=2, **kw)
    assert (text, finish) == (streamed, s_finish) == ask(client, PROMPTS[1], mode="ar", **kw)[:2]
    extra = usage.model_extra
    assert 0 < extra["accepted_tokens"] <= extra["drafted_tokens"] and extra["tokens_per_round"] > 1
    assert s_usage.model_extra == extra
    assert chunks < usage.completion_tokens  # a chunk per round, which commits accepted drafts too
    with ThreadPoolExecutor(4) as pool:  # batched rows accept different numbers and still equal alone
        together = list(pool.map(lambda p: ask(client, p, mode="speculative", **kw)[0], PROMPTS))
    assert together == [ask(client, p, mode="ar", **kw)[0] for p in PROMPTS]


def test_concurrent_compatible_requests_share_one_batch(client, http):
    """Two requests queued behind a busy worker run as one batch of two rows."""
    with ThreadPoolExecutor(3) as pool:
        busy = pool.submit(ask, client, PROMPTS[0], max_tokens=256, **SLOW)
        wait_for(http, lambda h: h["running"] == 1, "the slow request to start")
        before = http.get("/health").json()
        pair = [pool.submit(ask, client, p, max_tokens=8, block_size=4) for p in PROMPTS[1:3]]
        wait_for(http, lambda h: h["queued"] == 2, "two queued requests")
        busy.result(), [f.result() for f in pair]
    after = http.get("/health").json()
    assert (after["batches"] - before["batches"], after["rows"] - before["rows"]) == (1, 2)
    assert after["largest_batch"] >= 2


def test_a_client_that_disconnects_stops_its_generation(client, http):
    before = http.get("/health").json()
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=1024, stream=True, extra_body=dict(
        mode="diffusion", block_size=16, steps_per_block=16, confidence_threshold=1.0))
    next(iter(stream))
    stream.close()
    after = wait_for(http, lambda h: h["running"] == 0 and h["abandoned"] > before["abandoned"], "the abort")
    assert after["abandoned"] == before["abandoned"] + 1


# ---------------------------------------------------------------------------------- limits


def test_full_queue_answers_429_and_slow_requests_504(embedded):
    """One busy row, one queued: a third request is refused; past the timeout both answer 504.
    The timeout is half of a measured slow request, so this holds on any machine speed (the
    admission estimate, which would refuse such work up front, is off to reach the 504)."""
    config = ServeConfig(model_name=MODEL, max_queue=1, max_batch_size=1, request_timeout=60, refuse_late_work=False)
    with serving(*embedded, config) as url, httpx.Client(base_url=url, timeout=60) as http:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        start = time.monotonic()
        ask(client, PROMPTS[0], max_tokens=256, **SLOW)
        config.request_timeout = (time.monotonic() - start) / 2
        with ThreadPoolExecutor(2) as pool:
            slow = [pool.submit(ask, client, PROMPTS[0], max_tokens=256, **SLOW)]
            wait_for(http, lambda h: h["running"] == 1, "the slow request to start")
            slow.append(pool.submit(ask, client, PROMPTS[1], max_tokens=256, **SLOW))
            wait_for(http, lambda h: h["queued"] == 1, "a queued request")
            with pytest.raises(openai.RateLimitError) as refused:
                ask(client, PROMPTS[2], max_tokens=1, mode="ar")
            assert refused.value.body["code"] == "queue_full"
            for future in slow:
                with pytest.raises(openai.APIStatusError) as late:
                    future.result()
                assert late.value.status_code == 504 and late.value.body["type"] == "timeout_error"
        config.request_timeout = 60
        assert ask(client, PROMPTS[2], max_tokens=2, mode="ar")[1] in ("stop", "length")


def test_api_key_is_required_except_for_health(server):
    assert httpx.get(server + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(server + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).completions.create(
            model=MODEL, prompt="Hi", max_tokens=1)


C, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "Hi"}]
BAD_REQUESTS = [
    ("malformed json", C, b'{"prompt": "Hi",', 400, None),
    ("body not an object", C, b'["Hi"]', 400, None),
    ("json nested too deeply", C, b"[" * 4000 + b"]" * 4000, 400, None),
    ("body not utf-8", C, b'{"prompt": "\xff"}', 400, None),
    ("body too large", C, {"prompt": "x" * 9000}, 413, None),
    ("prompt of the wrong type", C, {"prompt": 5}, 400, "prompt"),
    ("prompt missing", C, {"max_tokens": 4}, 400, "prompt"),
    ("empty prompt", C, {"prompt": ""}, 400, "prompt"),
    ("empty token prompt", C, {"prompt": []}, 400, "prompt"),
    ("prompt over the token limit", C, {"prompt": "word " * 200}, 400, "prompt"),
    ("mask token text in the prompt", C, {"prompt": "a <mask> b"}, 400, "prompt"),
    ("mask token id in the prompt", C, {"prompt": [40, 3, 41]}, 400, "prompt"),
    ("token id outside the vocabulary", C, {"prompt": [40, 10**9]}, 400, "prompt"),
    ("several prompts", C, {"prompt": ["a", "b"]}, 400, "prompt"),
    ("max_tokens negative", C, {"prompt": "Hi", "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens zero", C, {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens huge", C, {"prompt": "Hi", "max_tokens": 10**9}, 400, "max_tokens"),
    ("max_tokens as a string", C, {"prompt": "Hi", "max_tokens": "8"}, 400, "max_tokens"),
    ("temperature negative", C, {"prompt": "Hi", "temperature": -0.5}, 400, "temperature"),
    ("temperature not a number", C, b'{"prompt": "Hi", "temperature": NaN}', 400, "temperature"),
    ("top_p zero", C, {"prompt": "Hi", "top_p": 0}, 400, "top_p"),
    ("top_k zero", C, {"prompt": "Hi", "top_k": 0}, 400, "top_k"),
    ("seed negative", C, {"prompt": "Hi", "seed": -1}, 400, "seed"),
    ("n of two", C, {"prompt": "Hi", "n": 2}, 400, "n"),
    ("unknown mode", C, {"prompt": "Hi", "mode": "beam"}, 400, "mode"),
    ("block_size zero", C, {"prompt": "Hi", "block_size": 0}, 400, "block_size"),
    ("draft_steps zero", C, {"prompt": "Hi", "mode": "speculative", "draft_steps": 0}, 400, "draft_steps"),
    ("block_size huge", C, {"prompt": "Hi", "block_size": 10**6}, 400, "block_size"),
    ("confidence_threshold above one", C, {"prompt": "Hi", "confidence_threshold": 1.5}, 400,
     "confidence_threshold"),
    ("unknown unmasking rule", C, {"prompt": "Hi", "unmasking": "random"}, 400, "unmasking"),
    ("stream not a boolean", C, {"prompt": "Hi", "stream": "yes"}, 400, "stream"),
    ("five stop strings", C, {"prompt": "Hi", "stop": list("abcde")}, 400, "stop"),
    ("stop string too long", C, {"prompt": "Hi", "stop": "x" * 65}, 400, "stop"),
    ("unknown field", C, {"prompt": "Hi", "frequency_penality": 1}, 400, "frequency_penality"),
    ("unknown model", C, {"prompt": "Hi", "model": "gpt-4"}, 404, "model"),
    ("chat without messages", CHAT, {"messages": []}, 400, "messages"),
    ("chat with an unknown role", CHAT, {"messages": [{"role": "robot", "content": "Hi"}]}, 400, "messages"),
    ("chat content of the wrong type", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ("chat with the mask token", CHAT, {"messages": [{"role": "user", "content": "<mask>"}]}, 400, "messages"),
    ("chat with both token limits", CHAT, {"messages": MSG, "max_tokens": 2, "max_completion_tokens": 2}, 400,
     "max_tokens"),
    ("unknown route", "/v1/engines", None, 404, None),
    ("wrong method", "GET " + C, None, 405, None),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(http, name, path, body, status, param):
    if path.startswith("GET "):
        r = http.get(path[4:])
    elif body is None:
        r = http.post(path, json={})
    elif isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    ok = http.post(C, json={"model": MODEL, "prompt": "Hi", "max_tokens": 1, "mode": "ar"})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1
