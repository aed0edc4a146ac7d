"""Text-to-video backends: the step after chat that turns the LLM's ``<video>`` prompts into video files (paper §3.2).

GPT4Video's LLM never sees the video generator: it writes a prompt between video tags (``g4v_jax.tags``) and any
text-to-video model renders it. ``T2VBackend`` is that boundary. A backend takes plain strings and returns uint8
frames, so swapping ZeroScope for another model (or for ``"solid"``, the weight-free test backend here) touches
neither the LLM, its checkpoint nor the chat code.

    backend = make_backend("diffusers", path="ckpt/zeroscope_v2_576w", scheduler="dpm")
    rendered = render_requests(backend, parse_video_tags(answer), T2VSettings(), "out/",
                               check_prompt=..., check_video=...)  # -> [RenderedVideo(request, path, error)]

``render_requests`` is the end-to-end step: it never raises for one bad request or a failing backend; every request
gets a ``RenderedVideo`` with either a file or an error text, so the text answer can always be shown.

Errors
    ``T2VError`` is what a backend raises for its own failures (missing weights, out of memory, output of the wrong
    shape), with a message naming the model and the cause. ``render_requests`` turns any ``Exception`` from
    ``generate`` into per-request error text.

Files
    ``write_videos`` writes ``{stem}_{i}.mp4`` (i from 1, as in ``<video1>``) with PyAV (``g4v_jax.data.video.
    write_video``: H.264, or MPEG-4 part 2 when FFmpeg lacks libx264) and, with ``gif=True``, a ``.gif`` next to each
    (PyAV's GIF encoder with the fixed 3-3-2 ``rgb8`` palette: a preview, not an archival copy).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import logging
import math
import os
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import av
import numpy as np

from g4v_jax.data.video import write_video
from g4v_jax.tags import VideoRequest

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "RenderedVideo",
    "SolidBackend",
    "T2VBackend",
    "T2VError",
    "T2VSettings",
    "check_videos",
    "make_backend",
    "register_backend",
    "render_requests",
    "write_gif",
    "write_videos",
]


class T2VError(RuntimeError):
    """A text-to-video backend failed (missing or invalid weights, out of memory, bad output); the message says why."""


@dataclasses.dataclass(frozen=True)
class T2VSettings:
    """What to render. The defaults are the paper's ZeroScope settings: 24 frames of 576x320, 40 steps, CFG 9.

    ``seed`` seeds each prompt's noise on its own, so a prompt's video does not depend on which other prompts share
    its batch (for backends that honour it: ``diffusers`` and ``solid`` do).
    """

    num_frames: int = 24
    height: int = 320
    width: int = 576
    steps: int = 40
    guidance_scale: float = 9.0
    seed: int = 0
    negative_prompt: str | None = None

    def __post_init__(self) -> None:
        for field in ("num_frames", "height", "width", "steps", "seed"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"T2VSettings.{field} must be an int, got {value!r}")
        for field in ("num_frames", "height", "width", "steps"):
            if getattr(self, field) < 1:
                raise ValueError(f"T2VSettings.{field} must be >= 1, got {getattr(self, field)}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"T2VSettings.seed must be in [0, 2**63), got {self.seed}")
        if not isinstance(self.guidance_scale, (int, float)) or not math.isfinite(self.guidance_scale):
            raise ValueError(f"T2VSettings.guidance_scale must be a finite number, got {self.guidance_scale!r}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise TypeError(f"T2VSettings.negative_prompt must be a str or None, got {self.negative_prompt!r}")


@runtime_checkable
class T2VBackend(Protocol):
    """Anything that renders prompts: ``generate(prompts, settings)`` -> uint8 (N, F, H, W, 3), one video per prompt.

    F, H, W should be ``settings``' but a backend may round them (e.g. to a multiple of 8); all N videos share one
    shape. Failures raise ``T2VError`` (other exceptions are tolerated by ``render_requests`` too). A JAX backend
    would implement this same method; nothing else in the project would change.
    """

    name: str

    def generate(self, prompts: Sequence[str], settings: T2VSettings) -> np.ndarray: ...


def check_videos(videos: Any, n: int) -> np.ndarray:
    """``videos`` as a uint8 (n, F, H, W, 3) array, or ``T2VError`` saying what is wrong with it."""
    if not isinstance(videos, np.ndarray):
        raise T2VError(f"backend returned {type(videos).__name__}, expected a numpy array (N, F, H, W, 3)")
    if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise T2VError(f"backend returned {videos.dtype} {videos.shape}, expected uint8 (N, F, H, W, 3)")
    if videos.shape[0] != n:
        raise T2VError(f"backend returned {videos.shape[0]} video(s) for {n} prompt(s)")
    if n and min(videos.shape[1:4]) == 0:
        raise T2VError(f"backend returned empty videos of shape {videos.shape}")
    return videos


# --------------------------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------------------------

BACKENDS: dict[str, Callable[..., T2VBackend]] = {}


def register_backend(name: str, factory: Callable[..., T2VBackend], *, replace: bool = False) -> None:
    """Make ``make_backend(name, **options)`` call ``factory(**options)``. Re-registering the same factory is a no-op;
    another factory under a taken name needs ``replace=True``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"backend factory for {name!r} is not callable: {factory!r}")
    if name in BACKENDS and BACKENDS[name] is not factory and not replace:
        raise ValueError(f"text-to-video backend {name!r} is already registered ({BACKENDS[name]!r}); "
                         "pass replace=True to override it")
    BACKENDS[name] = factory


# Backends registered by importing a module outside ``t2v`` (which must not import it: the world depends on t2v).
PROVIDERS = {"world": "g4v_jax.world.backend"}


def make_backend(name: str, **options: Any) -> T2VBackend:
    """The backend registered as ``name``, built with ``options`` (e.g. ``make_backend("diffusers", path=...)``)."""
    if name not in BACKENDS and name in PROVIDERS:
        importlib.import_module(PROVIDERS[name])
    try:
        factory = BACKENDS[name]
    except KeyError:
        known = ", ".join(sorted(BACKENDS)) or "none"
        raise ValueError(f"unknown text-to-video backend {name!r}; known backends: {known}") from None
    return factory(**options)


# --------------------------------------------------------------------------------------------------------------------
# "solid": no weights, deterministic (tests, demos)
# --------------------------------------------------------------------------------------------------------------------


class SolidBackend:
    """Renders a prompt as a solid colour taken from its SHA-256 with a vertical bar sweeping left to right.

    Deterministic across processes and machines (no ``hash()``): the colour depends on the prompt only, the bar's
    phase on ``settings.seed``. Steps, guidance and the negative prompt are ignored. Different prompts give different
    colours, so a test can tell which prompt a video came from.
    """

    name = "solid"

    def __init__(self, *, bar_fraction: float = 0.125) -> None:
        if not 0.0 < bar_fraction <= 1.0:
            raise ValueError(f"bar_fraction must be in (0, 1], got {bar_fraction}")
        self.bar_fraction = bar_fraction

    @staticmethod
    def colour(prompt: str) -> np.ndarray:
        """The prompt's background colour, uint8 (3,)."""
        return np.frombuffer(hashlib.sha256(prompt.encode("utf-8")).digest()[:3], np.uint8).copy()

    def generate(self, prompts: Sequence[str], settings: T2VSettings) -> np.ndarray:
        if isinstance(prompts, str):
            raise TypeError("generate takes a sequence of prompts, not a single str")
        f, h, w = settings.num_frames, settings.height, settings.width
        out = np.empty((len(prompts), f, h, w, 3), np.uint8)
        bar = max(1, round(w * self.bar_fraction))
        for i, prompt in enumerate(prompts):
            colour = self.colour(prompt)
            # Black bar on light colours, white on dark (ITU-R 601 luma), so it survives lossy coding.
            luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
            bar_colour = np.uint8(0 if luma > 127 else 255)
            out[i] = colour
            for t in range(f):
                left = round((w - bar) * ((t + settings.seed) % f) / max(f - 1, 1))
                out[i, t, :, left : left + bar] = bar_colour
        return out


register_backend("solid", SolidBackend)


# --------------------------------------------------------------------------------------------------------------------
# Writing files
# --------------------------------------------------------------------------------------------------------------------


def write_gif(path: str | os.PathLike, frames: np.ndarray, fps: int = 8) -> Path:
    """uint8 (F, H, W, 3) -> an animated GIF (PyAV, fixed ``rgb8`` palette, loops forever); returns the path."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"write_gif needs non-empty uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    out = Path(path)
    with av.open(os.fspath(out), mode="w", format="gif") as container:
        stream = container.add_stream("gif", rate=Fraction(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "rgb8"
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
        container.mux(stream.encode())
    return out


def _write_one(frames: np.ndarray, mp4: Path, fps: int, gif: bool) -> Path:
    write_video(mp4, frames, fps=fps)
    if gif:
        write_gif(mp4.with_suffix(".gif"), frames, fps=fps)
    return mp4


def _check_stem(stem: str) -> None:
    if not isinstance(stem, str) or not stem or os.sep in stem or (os.altsep and os.altsep in stem):
        raise ValueError(f"stem must be a plain file name prefix, got {stem!r}")


def write_videos(videos: np.ndarray, out_dir: str | os.PathLike, stem: str, fps: int = 8, gif: bool = False
                 ) -> list[Path]:
    """uint8 (N, F, H, W, 3) -> ``out_dir/{stem}_{i}.mp4`` for i = 1..N (and ``.gif`` s next to them if ``gif``).

    Returns the mp4 paths; the directory is created if missing and existing files are overwritten.
    """
    videos = np.asarray(videos)
    if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"write_videos needs uint8 videos (N, F, H, W, 3), got {videos.dtype} {videos.shape}")
    _check_stem(stem)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [_write_one(v, out / f"{stem}_{i}.mp4", fps, gif) for i, v in enumerate(videos, start=1)]


# --------------------------------------------------------------------------------------------------------------------
# The end-to-end step after chat
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RenderedVideo:
    """One request's outcome: ``path`` to the mp4 (``error`` None), or no file and ``error`` saying why.

    Error texts start with ``refused:`` (prompt check), ``withheld:`` (video check), ``generation failed:`` (the
    backend) or ``write failed:`` (the file system).
    """

    request: VideoRequest
    path: Path | None
    error: str | None
    sent_prompt: str | None = None  # what the backend received, when it adapts prompts (``plan``)
    notes: tuple[str, ...] = ()  # what the backend changed: frames or size rounded to its rules, a truncated prompt

    @property
    def ok(self) -> bool:
        return self.error is None


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _run_check(check: Callable[[Any], str | None] | None, value: Any, what: str) -> str | None:
    """The check's reason, or None to accept. A check that raises rejects (safety checks fail closed)."""
    if check is None:
        return None
    try:
        reason = check(value)
    except Exception as e:  # noqa: BLE001 - any failure of a safety check is a rejection
        logger.warning("%s check raised; treating it as a rejection: %s", what, _describe(e))
        return f"{what} check failed ({_describe(e)})"
    if reason is None:
        return None
    return str(reason) or "no reason given"


def render_requests(
    backend: T2VBackend,
    requests: Sequence[VideoRequest],
    settings: T2VSettings,
    out_dir: str | os.PathLike,
    *,
    check_prompt: Callable[[str], str | None] | None = None,
    check_video: Callable[[np.ndarray], str | None] | None = None,
    stem: str = "video",
    fps: int | None = None,
    gif: bool = False,
    batch_size: int | None = None,
) -> list[RenderedVideo]:
    """Render the LLM's video requests; one ``RenderedVideo`` per request, in order. Never raises for a request or a
    backend failure (argument errors, e.g. a bad ``batch_size``, still raise).

    1. ``check_prompt(prompt)`` -> a reason to refuse, or None. Refused: no file, error ``"refused: <reason>"``.
    2. The accepted prompts go to ``backend.generate`` in batches of ``batch_size`` (None: all in one call). A batch
       whose call raises (or returns the wrong shape) gives each of its requests ``"generation failed: ..."``; the
       other batches still run.
    3. ``check_video(frames uint8 (F, H, W, 3))`` -> a reason to withhold, or None. Withheld: no file is written,
       error ``"withheld: <reason>"``.
    4. Files: ``out_dir/{stem}_{i}.mp4`` with i the request's 1-based position in ``requests`` (and a ``.gif`` if
       ``gif``), at ``fps`` frames a second (None: the backend's ``fps``, e.g. 16 for Wan, else 8); an OS error gives
       ``"write failed: ..."``.

    A backend with ``plan(prompts, settings)`` and ``run(plan)`` methods (``DiffusersBackend``; its ``generate`` is
    ``run(plan(...))``) is asked through them, so it plans once and reports what it sent: each result carries the
    adapted prompt and the notes (frames or size moved to the model's rules, a truncated prompt).

    A check that raises counts as a rejection (fail closed). The checks are the caller's: ``g4v_jax.t2v`` does not
    depend on the safety module.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    _check_stem(stem)
    fps = getattr(backend, "fps", 8) if fps is None else fps
    if not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be an int >= 1, got {fps!r}")
    requests = list(requests)
    results: list[RenderedVideo | None] = [None] * len(requests)
    accepted: list[int] = []
    for i, request in enumerate(requests):
        reason = _run_check(check_prompt, request.prompt, "prompt")
        if reason is not None:
            results[i] = RenderedVideo(request, None, f"refused: {reason}")
        else:
            accepted.append(i)

    step = batch_size or max(len(accepted), 1)
    for start in range(0, len(accepted), step):
        batch = accepted[start : start + step]
        prompts = [requests[i].prompt for i in batch]
        sent, notes = [None] * len(batch), [()] * len(batch)
        try:
            if hasattr(backend, "plan"):  # a backend that adapts prompts or settings says how, per prompt
                plan = backend.plan(prompts, settings)
                sent, notes = list(plan.prompts), list(plan.notes)
                videos = backend.run(plan)
            else:
                videos = backend.generate(prompts, settings)
            videos = check_videos(videos, len(batch))
        except Exception as e:  # noqa: BLE001 - the text answer must survive any backend failure
            name = getattr(backend, "name", type(backend).__name__)
            logger.warning("text-to-video backend %r failed on %d prompt(s): %s", name, len(batch), _describe(e))
            for i in batch:
                results[i] = RenderedVideo(requests[i], None, f"generation failed: {_describe(e)}")
            continue
        for i, frames, sent_prompt, note in zip(batch, videos, sent, notes):
            done = functools.partial(RenderedVideo, requests[i], sent_prompt=sent_prompt, notes=tuple(note))
            reason = _run_check(check_video, frames, "video")
            if reason is not None:
                results[i] = done(None, f"withheld: {reason}")
                continue
            try:
                out = Path(out_dir)
                out.mkdir(parents=True, exist_ok=True)
                path = _write_one(frames, out / f"{stem}_{i + 1}.mp4", fps, gif)
            except (OSError, ValueError, av.error.FFmpegError) as e:
                results[i] = done(None, f"write failed: {_describe(e)}")
            else:
                results[i] = done(path, None)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]
