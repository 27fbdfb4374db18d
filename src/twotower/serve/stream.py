"""A job's events as an HTTP answer: one JSON body, or server-sent events when streaming."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from . import protocol as p


async def answer(events, head: dict, chat: bool, req, withdraw):
    """Answer a request from its job's `events` (see `Job.events_until`); `withdraw()` is called
    once the answer is over, however it ends."""
    try:
        first = await anext(events, None)
    except BaseException:
        withdraw()
        raise
    if first is None:  # the client went away while waiting
        withdraw()
        return client_gone()
    if not req.stream:
        try:
            parts, event = [first[1]], first
            if first[0] != "done":
                async for event in events:
                    parts.append(event[1])
        finally:
            withdraw()
        return (JSONResponse(p.completion_body(head, chat, "".join(parts), event[2], event[3]))
                if event[0] == "done" else client_gone())
    include_usage = req.stream_options is not None and req.stream_options.include_usage

    async def stream():
        try:
            for chunk in p.stream_opening(head, chat) + p.stream_chunks(head, chat, first, include_usage):
                yield p.sse(chunk)
            if first[0] != "done":
                async for event in events:
                    for chunk in p.stream_chunks(head, chat, event, include_usage):
                        yield p.sse(chunk)
            yield p.sse("[DONE]")
        except p.APIError as error:
            yield p.sse(error.body())
        finally:
            withdraw()

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def client_gone() -> JSONResponse:
    """The answer to a client that has already left; nobody reads it, but the access log does."""
    return JSONResponse(p.APIError(499, "the client closed the request", code="client_closed").body(),
                        status_code=499)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) one larger than `limit` bytes without reading it all."""
    too_large = p.APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    return bytes(body)
