"""The playground: its step events over real HTTP (no browser), and the page itself in headless
Chromium driven by Playwright against a real server on loopback."""

from __future__ import annotations

import json
import shutil

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from twotower.serve import ServeConfig, background_server, create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DIFFUSION = dict(mode="diffusion", block_size=4, steps_per_block=4, confidence_threshold=1.0, temperature=0)


@pytest.fixture(scope="module")
def server(embedded):
    with background_server(create_app(*embedded, ServeConfig(max_tokens_limit=64))) as url:
        yield url


def events(url: str, body: dict) -> list[dict]:
    """The chunks of one streamed completion, in order."""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_step_events_come_one_per_step_before_their_block_and_add_up_to_the_answer(server):
    body = {"prompt": "Once upon a time", "max_tokens": 10, **DIFFUSION}
    plain = httpx.post(server + "/v1/completions", json=body, timeout=60).json()
    chunks = events(server, {**body, "stream": True, "stream_steps": True, "stream_options": {"include_usage": True}})
    usage = chunks[-1]["usage"]
    steps = [c for c in chunks if c["object"] == "twotower.step"]
    # threshold 1 commits one position a step: 4 steps for each of 3 blocks (the last trimmed to 2 tokens)
    assert len(steps) == usage["denoiser_forwards"] == 12 and usage["completion_tokens"] == 10
    text, block, shown = "", 0, None
    for c in chunks[:-1]:
        if c["object"] == "twotower.step":
            assert c["block"] == block and len(c["tokens"]) == len(c["committed"]) <= 4
            assert sum(c["committed"]) == 1  # threshold 1 commits one position a step
            committed_now = [t for t, new in zip(c["tokens"], c["committed"]) if new]
            assert None not in committed_now
            if shown is not None and c["step"] > 0:  # a position once shown stays
                assert all(t is not None for t, was in zip(c["tokens"], shown) if was is not None)
            shown = c["tokens"]
        else:
            text += c["choices"][0]["text"]
            if any(c2["object"] == "twotower.step" for c2 in chunks[:chunks.index(c)]):
                assert shown is not None and None not in shown  # a block's text follows its last step
            block += 1
    assert steps[0]["tokens"].count(None) == 3  # the first step of a block: all but one position masked
    assert text == plain["choices"][0]["text"] and usage == plain["usage"]


def test_step_events_are_opt_in_and_need_a_stream(server):
    body = {"prompt": "Once upon a time", "max_tokens": 6, "stream": True, **DIFFUSION}
    assert all(c["object"] == "text_completion" for c in events(server, body))
    ar = events(server, {**body, "mode": "ar", "stream_steps": True})
    assert all(c["object"] == "text_completion" for c in ar)  # no denoising steps in AR mode
    r = httpx.post(server + "/v1/completions", json={**body, "stream": False, "stream_steps": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_steps"


def test_the_page_and_its_files_are_served_same_origin_only(server):
    page = httpx.get(server + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    assert "http" not in page.text.replace("http-equiv", "")  # no address outside the server
    for name in ("playground.js", "playground.css"):
        r = httpx.get(f"{server}/static/{name}")
        assert r.status_code == 200 and "//" not in r.text.replace("// ", "")
    assert httpx.get(server + "/static/../serve.py").status_code == 404
    unlisted = httpx.get(server + "/static/index.html")  # a file of the folder that is not served as static
    assert unlisted.status_code == 404 and unlisted.json()["error"]["code"] == "not_found"
    options = httpx.get(server + "/playground.json").json()
    assert {"diffusion", "ar", "mock-ar"} <= set(options["modes"]) and "confidence" in options["unmasking"]


# ---------------------------------------------------------------------------------- in a browser


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no system Chromium (Debian: apt-get install chromium)")
    return path


def test_the_page_in_a_real_browser(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    executable = chromium()
    outside = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 1100})
        page.on("request", lambda r: None if r.url.startswith(server) else outside.append(r.url))
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server + "/")
        page.wait_for_selector("body[data-ready=true]")
        page.fill("#prompt", "The little dog ran to the")
        page.select_option("#mode", "diffusion")
        page.fill("#block_size", "8")
        page.fill("#steps_per_block", "8")
        page.fill("#confidence_threshold", "1")
        page.fill("#max_tokens", "16")
        page.click("#generate")
        page.wait_for_selector("#figures[data-done=true]", timeout=60_000)
        assert page.text_content("#status") == "done"
        assert page.locator("#steps .step-line").count() == 16  # one line per denoising step
        assert page.locator("#steps .step-line .mask").count() > 0  # intermediate steps with masks
        assert page.locator("#steps .step-line .new").count() == 16
        answer = page.text_content("#output .answer")
        assert answer and "tokens/s" in page.text_content("#figures")
        page.screenshot(path=str(tmp_path / "generate.png"), full_page=True)
        page.fill("#max_tokens", "12")
        page.click("#race")
        for lane in ("#lane-left", "#lane-right"):
            page.wait_for_selector(f"{lane} .figures[data-done=true]", timeout=60_000)
            figures = page.text_content(f"{lane} .figures")
            assert "tokens/s" in figures and "first block after" in figures and "denoiser forward" in figures
        assert page.text_content("#lane-left h3") == "ar" and page.text_content("#lane-right h3") == "diffusion"
        page.screenshot(path=str(tmp_path / "race.png"), full_page=True)
        assert page.text_content("#error") == ""
        browser.close()
    assert errors == []
    assert outside == [], outside


def test_the_page_asks_for_the_key_of_a_server_that_needs_one(embedded):
    playwright = pytest.importorskip("playwright.sync_api")
    executable = chromium()
    with background_server(create_app(*embedded, ServeConfig(api_key="page-key"))) as url, \
            playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready=true]")
        assert not page.is_visible("#api_key")
        page.select_option("#mode", "ar")
        page.fill("#max_tokens", "4")
        page.click("#generate")
        page.wait_for_selector("#api_key", state="visible")
        assert "API key" in page.text_content("#error")
        page.fill("#api_key", "page-key")
        page.click("#generate")
        page.wait_for_selector("#figures[data-done=true]", timeout=60_000)
        assert page.text_content("#error") == "" and page.text_content("#output .answer")
        browser.close()
