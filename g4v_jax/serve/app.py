"""The HTTP server: an OpenAI-compatible video chat API over the inference engine, video generation jobs, health,
Prometheus metrics and the web page. ``create_app`` only assembles: the routers (``serve.routes``), the error
handlers, the access middleware (API key, request log) and CORS when origins are named.

    app = create_app(Server(model, tokenizer, ServeConfig(...)))      # any ASGI server runs it; __main__ uses uvicorn

Status codes: 400 bad input (the message names the field or content part), 401 no or a wrong API key, 404 unknown
job or model, 408 a body that did not arrive within ``body_timeout_s``, 413 body over ``max_body_bytes``, 415 a POST
body that is not ``application/json``, 429 queue full; a 500 is a bug (a one-line message to the client, the traceback
to the server's log), and the engine goes on after it.
"""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from g4v_jax.serve import api
from g4v_jax.serve.access import AccessMiddleware
from g4v_jax.serve.routes import chat, jobs, media, ops, page
from g4v_jax.serve.server import Server

logger = logging.getLogger(__name__)


def create_app(server: Server) -> FastAPI:
    """The ASGI app (FastAPI) serving ``server``; starts and stops its engine thread with the app."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start()
        try:
            yield
        finally:
            server.stop()

    app = FastAPI(title="g4v_jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    for routes in (chat, jobs, media, ops, page):
        app.include_router(routes.router)
    app.add_exception_handler(api.APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(AccessMiddleware, api_key=server.cfg.api_key)
    if server.cfg.allowed_origins:  # added last: outermost, so a preflight is answered before the key check
        app.add_middleware(CORSMiddleware, allow_origins=list(server.cfg.allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    return app


async def _api_error(request, exc: api.APIError):
    if exc.status >= 500:
        logger.error("answering %s: %s", request.url.path, exc.message)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request, exc):
    return JSONResponse(api.APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)


async def _unexpected(request, exc):
    logger.exception("unexpected error answering %s", request.url.path)
    return JSONResponse(api.APIError(500, f"internal error: {type(exc).__name__}").body(), status_code=500)
