"""Video generation as jobs (SGLang's shape): each ``<video>`` prompt of an answer becomes a job that a worker thread
renders through the T2V backend, past the prompt gate and the output video check (``t2v.render_requests``).

A job is ``queued`` -> ``running`` -> ``succeeded`` (an mp4 under the server's output directory), or ``refused``
(the prompt gate or the output check said no, with the reason) or ``failed`` (the backend or the disk, with the
reason). The text answer never waits for, or depends on, a job.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from g4v_jax.tags import VideoRequest


@dataclasses.dataclass
class VideoJob:
    id: str
    prompt: str
    status: str = "queued"  # queued | running | succeeded | refused | failed
    progress: float = 0.0
    error: str | None = None
    path: Path | None = None
    created: float = dataclasses.field(default_factory=time.time)
    sent_prompt: str | None = None  # the prompt the T2V model got, when its backend adapts prompts
    notes: tuple[str, ...] = ()  # what the backend changed: frames or size rounded to the model's rules, a cut prompt

    def public(self) -> dict[str, Any]:
        """The job as the API shows it (no server paths)."""
        out = {"id": self.id, "object": "video", "prompt": self.prompt, "status": self.status,
               "progress": round(self.progress, 3), "created_at": int(self.created)}
        if self.error is not None:
            out["error"] = {"message": self.error}
        if self.status == "succeeded":
            out["url"] = f"/v1/videos/{self.id}/content"
        if self.sent_prompt is not None and self.sent_prompt != self.prompt:
            out["model_prompt"] = self.sent_prompt
        if self.notes:
            out["notes"] = list(self.notes)
        return out


class VideoJobs:
    """Renders jobs one at a time on a worker thread (a T2V model fills the accelerator on its own)."""

    def __init__(self, render: Callable[[list[VideoRequest], str], list], *, max_jobs: int = 1000) -> None:
        self._render = render  # (requests, stem) -> [RenderedVideo], e.g. inference.make_renderer(...)
        self._jobs: dict[str, VideoJob] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="t2v")
        self.max_jobs = max_jobs

    def submit(self, request: VideoRequest) -> VideoJob:
        job = VideoJob(id=f"video-{uuid.uuid4().hex[:16]}", prompt=request.prompt)
        with self._lock:
            if len(self._jobs) >= self.max_jobs:  # forget the oldest finished job
                done = [j for j in self._jobs.values() if j.status not in ("queued", "running")]
                if done:
                    self._jobs.pop(min(done, key=lambda j: j.created).id)
            self._jobs[job.id] = job
        self._pool.submit(self._run, job, request)
        return job

    def get(self, job_id: str) -> VideoJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def counts(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for j in self._jobs.values():
                out[j.status] = out.get(j.status, 0) + 1
            return out

    def _run(self, job: VideoJob, request: VideoRequest) -> None:
        job.status, job.progress = "running", 0.1
        try:
            (result,) = self._render([request], job.id)
        except Exception as e:  # noqa: BLE001 - a job reports its failure; the server goes on
            job.status, job.error = "failed", f"generation failed: {type(e).__name__}: {e}"
            return
        job.sent_prompt, job.notes = getattr(result, "sent_prompt", None), tuple(getattr(result, "notes", ()))
        if result.ok:
            job.status, job.path, job.progress = "succeeded", result.path, 1.0
        else:
            job.error = result.error
            job.status = "refused" if result.error.startswith(("refused:", "withheld:")) else "failed"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
