"""What operators and clients ask of the server itself: ``GET /v1/models``, ``GET /health`` (open, for probes),
``GET /metrics`` (Prometheus) and ``GET /openapi.json`` (the API with its limits)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from g4v_jax.serve.openapi import openapi_spec
from g4v_jax.serve.routes import server_of

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request):
    server = server_of(request)
    return {"object": "list", "data": [{"id": server.cfg.model_name, "object": "model", "created": 0,
                                        "owned_by": "g4v_jax", "max_model_len": server.info.context}]}


@router.get("/health")
async def health(request: Request):
    server = server_of(request)
    alive = server.engine_alive
    return JSONResponse({"status": "ok" if alive else "engine stopped", "model": server.cfg.model_name},
                        status_code=200 if alive else 503)


@router.get("/metrics")
async def metrics(request: Request):
    return PlainTextResponse(server_of(request).metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/openapi.json")
async def openapi(request: Request):
    server = server_of(request)
    return openapi_spec(server.limits, server.cfg.max_videos, server.cfg.model_name,
                        api_key=bool(server.cfg.api_key))
