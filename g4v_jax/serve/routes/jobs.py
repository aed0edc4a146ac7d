"""Video generation jobs (SGLang's shape): ``GET /v1/videos/{id}`` (status, progress, the reason of a refusal or a
failure) and ``GET /v1/videos/{id}/content`` (the mp4)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from g4v_jax.serve import api
from g4v_jax.serve.jobs import VideoJob
from g4v_jax.serve.routes import server_of

router = APIRouter()


def _job(request: Request, job_id: str) -> VideoJob:
    jobs = server_of(request).jobs
    job = jobs.get(job_id) if jobs is not None else None
    if job is None:
        raise api.APIError(404, f"no video job {api.show_value(job_id)}", param="job_id")
    return job


@router.get("/v1/videos/{job_id}")
async def video_status(request: Request, job_id: str):
    return _job(request, job_id).public()


@router.get("/v1/videos/{job_id}/content")
async def video_content(request: Request, job_id: str):
    job = _job(request, job_id)
    if job.status != "succeeded" or job.path is None:
        raise api.APIError(404, f"video job {job_id!r} has no video ({job.status}"
                                + (f": {job.error}" if job.error else "") + ")", param="job_id")
    return FileResponse(job.path, media_type="video/mp4")
