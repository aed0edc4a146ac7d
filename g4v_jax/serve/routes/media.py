"""What the page needs of videos: ``POST /v1/video/frames`` (the T frames the model reads of a video, with its own
sampling and resizing, as PNG data URLs) and ``GET /v1/media`` (the videos a ``file://`` URL may name)."""

from __future__ import annotations

import base64
import io

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from g4v_jax.serve import api
from g4v_jax.serve.media import MediaError
from g4v_jax.serve.routes import read_json, server_of

router = APIRouter()
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi")


@router.post("/v1/video/frames")
async def video_frames(request: Request):
    """Body: ``{"url": data: or file:// URL}``; the same checks as a chat request's video parts."""
    server = server_of(request)
    obj = await read_json(request)
    url = obj.get("url") if isinstance(obj, dict) else None
    if not isinstance(url, str):
        raise api.APIError(400, "the body must be {\"url\": a data: or file:// video URL}", param="url")
    try:
        clip, _ = await run_in_threadpool(server.load_video, url, "url", False)
    except MediaError as e:
        raise api.APIError(400, str(e), param="url") from None
    return {"frames": [_png_data_url(f) for f in clip.frames], "frame_mask": clip.frame_mask.tolist(),
            "sampling": server.info.sampling, "resize": server.info.resize}


@router.get("/v1/media")
async def media(request: Request):
    """The media directory's top level, for the page's picker."""
    media_dir = server_of(request).media_dir
    if media_dir is None or not media_dir.is_dir():
        return {"videos": []}
    # hidden names are no one's pick: a writer's temporary file (``data.video.write_video``), a user's dotfiles
    names = sorted(p.name for p in media_dir.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in VIDEO_SUFFIXES)
    return {"videos": names[:500]}


def _png_data_url(frame) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
