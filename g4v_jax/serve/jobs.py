"""Video generation as jobs (SGLang's shape): each ``<video>`` prompt of an answer becomes a job that a worker thread
renders through the T2V backend, past the prompt gate and the output video check (``t2v.render_requests``).

A job is ``queued`` -> ``running`` -> ``succeeded`` (an mp4 under the server's output directory), or ``refused``
(the prompt gate or the output check said no, with the reason) or ``failed`` (the backend or the disk, with the
reason). The text answer never waits for, or depends on, a job.

Retention: at most ``keep_files`` finished jobs keep their video, none longer than ``max_age_s``; past that the
oldest are deleted, files and all (their URLs answer 404). The job table keeps no more than ``max_jobs`` rows.
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

    def __init__(self, render: Callable[[list[VideoRequest], str], list], *, max_jobs: int = 1000,
                 keep_files: int = 200, max_age_s: float = 0.0, clock: Callable[[], float] = time.time) -> None:
        self._render = render  # (requests, stem) -> [RenderedVideo], e.g. inference.make_renderer(...)
        self._jobs: dict[str, VideoJob] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="t2v")
        self.max_jobs, self.keep_files, self.max_age_s = max_jobs, min(keep_files, max_jobs), max_age_s
        self._clock = clock

    def submit(self, request: VideoRequest) -> VideoJob:
        job = VideoJob(id=f"video-{uuid.uuid4().hex[:16]}", prompt=request.prompt, created=self._clock())
        with self._lock:
            self._prune(room=1)
            self._jobs[job.id] = job
        self._pool.submit(self._run, job, request)
        return job

    def prune(self) -> None:
        """Apply the retention policy now (it also runs at every submit and after every finished job)."""
        with self._lock:
            self._prune()

    def _prune(self, room: int = 0) -> None:
        done = sorted((j for j in self._jobs.values() if j.status not in ("queued", "running")),
                      key=lambda j: j.created)
        now = self._clock()
        with_file = [j for j in done if j.path is not None]
        drop = {j.id for j in with_file[:max(0, len(with_file) - self.keep_files)]}
        if self.max_age_s > 0:
            drop |= {j.id for j in done if now - j.created > self.max_age_s}
        excess = len(self._jobs) - len(drop) + room - self.max_jobs  # rows over the table's size: the oldest go
        drop |= {j.id for j in [j for j in done if j.id not in drop][:max(0, excess)]}
        for job_id in drop:
            _delete_files(self._jobs.pop(job_id))

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
            job.status, job.path, job.progress = "succeeded", Path(result.path), 1.0
        else:
            job.error = result.error
            job.status = "refused" if result.error.startswith(("refused:", "withheld:")) else "failed"
        self.prune()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _delete_files(job: VideoJob) -> None:
    """A job's video and the files written beside it (a .gif)."""
    if job.path is None:
        return
    for path in (job.path, job.path.with_suffix(".gif")):
        path.unlink(missing_ok=True)
