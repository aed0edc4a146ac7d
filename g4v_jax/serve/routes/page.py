"""``GET /``: the web page (``serve/static/index.html``): upload or pick a video, see its frames, chat, watch
generated videos play."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

router = APIRouter()
STATIC = Path(__file__).resolve().parents[1] / "static"


@router.get("/")
async def page():
    index = STATIC / "index.html"
    if not index.is_file():
        return Response("g4v_jax server: the API is at /v1/chat/completions", media_type="text/plain")
    return FileResponse(index, media_type="text/html")
