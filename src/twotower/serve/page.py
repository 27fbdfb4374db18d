"""The playground page at `/`: static files shipped in the package (no build step, nothing fetched
from elsewhere), served with a Content-Security-Policy that allows this server alone."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from ..modes import MODES
from ..sampler import UNMASKING_RULES
from .protocol import APIError

STATIC = Path(__file__).parent / "static"
FILES = {"playground.js": "text/javascript", "playground.css": "text/css"}
SAME_ORIGIN_ONLY = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
}


def add_page(app: FastAPI, model_config, max_tokens: int) -> None:
    """GET / (the page), /static/{name} (its script and style) and /playground.json (the modes,
    unmasking rules and the model's diffusion defaults that fill its settings)."""
    contents = {name: (STATIC / name).read_bytes() for name in ("index.html", *FILES)}  # read once

    def static(name: str, media_type: str) -> Response:
        return Response(contents[name], media_type=media_type, headers=SAME_ORIGIN_ONLY)

    @app.get("/")
    async def page():
        return static("index.html", "text/html; charset=utf-8")

    @app.get("/static/{name}")
    async def static_file(name: str):
        if name not in FILES:
            raise APIError(404, f"no static file '{name[:100]}'", code="not_found")
        return static(name, FILES[name])

    @app.get("/playground.json")
    async def options():
        return JSONResponse({"modes": list(MODES), "unmasking": list(UNMASKING_RULES), "max_tokens": max_tokens,
                             "block_size": model_config.block_size, "steps_per_block": model_config.steps_per_block,
                             "confidence_threshold": model_config.confidence_threshold}, headers=SAME_ORIGIN_ONLY)
