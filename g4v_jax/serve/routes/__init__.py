"""The server's routes, one router per concern: ``chat`` (``POST /v1/chat/completions``), ``jobs`` (video generation
jobs), ``media`` (the frames a video gives the model, the media directory), ``ops`` (models, health, metrics, the
OpenAPI description) and ``page`` (the web page). Each reaches the ``Server`` as ``request.app.state.server``
(``server_of``) and reads request bodies with ``read_json`` (JSON only, bounded in size and time)."""

from __future__ import annotations

import asyncio
import json

from fastapi import Request

from g4v_jax.serve import api
from g4v_jax.serve.server import Server


def server_of(request: Request) -> Server:
    return request.app.state.server


async def read_json(request: Request):
    """The body as JSON: ``application/json`` only (a text/plain POST is a 'simple' request any web page can send
    cross-origin), at most ``max_body_bytes``, all of it within ``body_timeout_s``."""
    cfg = server_of(request).cfg
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise api.APIError(415, f"the request body must be JSON sent as Content-Type: application/json, got "
                                f"{kind or 'none'!r}")
    limit = cfg.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise api.APIError(413, f"the request body is {int(declared)} bytes, over the limit of {limit} bytes")

    async def whole() -> bytes:
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise api.APIError(413, f"the request body is over the limit of {limit} bytes")
        return bytes(body)

    try:
        raw = await asyncio.wait_for(whole(), cfg.body_timeout_s)
    except asyncio.TimeoutError:
        raise api.APIError(408, f"the request body did not arrive within {cfg.body_timeout_s:g} s") from None
    try:
        return json.loads(raw)
    except RecursionError:
        raise api.APIError(400, "the request body nests JSON too deeply") from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8, an integer of more than 4300 digits
        raise api.APIError(400, f"the request body is not JSON ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
