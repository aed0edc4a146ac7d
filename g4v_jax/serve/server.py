"""A loaded model behind the API: the server's settings (``ServeConfig``), its state (``Server``: the engine and its
thread, the video jobs, the input gate, the limits) and its Prometheus metrics. The routes (``serve.routes``) reach it
as ``request.app.state.server``; ``serve.app.create_app`` assembles them.

    app = create_app(Server(model, tokenizer, ServeConfig(...)))      # any ASGI server runs it; __main__ uses uvicorn
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from g4v_jax.config import EngineConfig
from g4v_jax.data.template import SYSTEM_PROMPT, tokenize_chat_template, tokenize_conversation
from g4v_jax.data.video import ClipCache
from g4v_jax.inference.engine import Engine, EngineRequest
from g4v_jax.inference.generate import SamplingConfig
from g4v_jax.inference.session import STOP_STRING, check_vocab, model_info, with_stops
from g4v_jax.inference.text import finish_answer
from g4v_jax.serve import api
from g4v_jax.serve.jobs import VideoJobs
from g4v_jax.serve.media import FrameRequest, MediaLimits, load_frames_part, load_video_part

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model_name: str = "g4v"
    media_dir: str = ""  # file:// video URLs are allowed inside it only ("" : off)
    output_dir: str = "serve_out"  # rendered videos, uploads while they are decoded
    max_body_bytes: int = 96 * 2**20
    max_videos: int = 4  # per request
    max_tokens: int = 256  # default max_tokens
    temperature: float = 0.0  # default temperature (the release's chat decodes greedily)
    system_prompt: str = SYSTEM_PROMPT
    limits: MediaLimits = MediaLimits()
    requests: api.RequestLimits | None = None  # None: the defaults, max_text_chars from the model (Server)
    engine: EngineConfig = EngineConfig()
    api_key: str = ""  # "": open; else every /v1/* route needs "Authorization: Bearer <key>"
    allowed_origins: tuple[str, ...] = ()  # CORS: none unless origins are named ("*" for any)
    body_timeout_s: float = 60.0  # the whole request body must arrive within this
    max_concurrent_decodes: int = 2  # videos decoded at once (each may hold a frame of max_frame_pixels)
    clip_cache_mb: float = 256.0  # decoded videos kept by content hash (the frames route and the chat route share it)
    keep_videos: int = 200  # generated videos kept on disk (the oldest finished ones are deleted)
    video_max_age_s: float = 24 * 3600.0  # and none older than this (0: no age limit)
    chat_template: bool = True  # a text-only LLM whose tokenizer has a chat template is served with it


class Metrics:
    """Prometheus metrics of one server (its own registry: several servers in one process stay apart)."""

    def __init__(self, server: "Server") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("g4v_requests", "chat completion requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("g4v_prompt_tokens", "prompt tokens of answered requests", registry=r)
        self.generated_tokens = Counter("g4v_generation_tokens", "generated tokens", registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.ttft = Histogram("g4v_time_to_first_token_seconds", "submit to first token", buckets=buckets,
                              registry=r)
        self.latency = Histogram("g4v_request_latency_seconds", "submit to last token", buckets=buckets, registry=r)
        engine = server.engine
        Gauge("g4v_queue_depth", "requests waiting for a slot", registry=r).set_function(lambda: len(engine.queue))
        Gauge("g4v_slots_busy", "decode slots in use", registry=r).set_function(
            lambda: engine.cfg.num_slots - engine.free_slots())
        Gauge("g4v_slots_total", "decode slots", registry=r).set_function(lambda: engine.cfg.num_slots)
        r.register(_EngineCounters(server))
        jobs = server.jobs
        if jobs is not None:
            for status in ("queued", "running", "succeeded", "refused", "failed"):
                Gauge(f"g4v_video_jobs_{status}", f"video jobs {status}", registry=r).set_function(
                    lambda s=status: jobs.counts().get(s, 0))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _EngineCounters:
    """The engine's and the clip cache's running counts as Prometheus counters (read at each scrape)."""

    def __init__(self, server: "Server") -> None:
        self.server = server

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        stats, clips = self.server.engine.stats, self.server.clips
        for name, doc, value in (
                ("g4v_prefill_tokens", "prompt tokens computed", stats.prefill_tokens),
                ("g4v_prefix_cache_hit_tokens", "prompt tokens read from the prefix cache", stats.prefix_hit_tokens),
                ("g4v_encoded_videos", "videos run through the vision tower and abstractor", stats.encoded_videos),
                ("g4v_video_token_cache_hits", "videos whose tokens came from the video cache",
                 stats.video_cache_hits),
                ("g4v_decoded_video_cache_hits", "videos not decoded again (clip cache)", clips.hits),
                ("g4v_decode_steps", "decode steps", stats.steps)):
            yield CounterMetricFamily(name, doc, value=value)


class Server:
    """A loaded model behind the API: the engine and its thread, the video jobs, the input gate."""

    def __init__(self, model, tokenizer, cfg: ServeConfig = ServeConfig(), *,
                 renderer: Callable[[list, str], list] | None = None,
                 video_gate: Callable[[str], bool] | None = None) -> None:
        self.cfg = cfg
        self.model, self.tokenizer = model, tokenizer
        self.info = model_info(model, tokenizer, None, None)
        self.limits = cfg.requests or api.RequestLimits(max_text_chars=self.info.context * _longest_token(tokenizer))
        self.chat_template = (cfg.chat_template and not self.info.has_vision
                              and bool(getattr(tokenizer, "chat_template", None)))
        self.engine = Engine(model, tokenizer, dataclasses.replace(cfg.engine, max_videos=cfg.max_videos),
                             eos_id=self.info.eos_id)
        self.stops = with_stops(SamplingConfig(1), tokenizer).stop_sequences
        self.jobs = (VideoJobs(renderer, keep_files=cfg.keep_videos, max_age_s=cfg.video_max_age_s)
                     if renderer is not None else None)
        self.video_gate = video_gate  # (video path) -> flagged: safety.gates.make_video_gate
        self.output_dir = Path(cfg.output_dir)
        self.upload_dir = Path(tempfile.mkdtemp(prefix="uploads-", dir=self._mkdir(self.output_dir)))
        self.media_dir = Path(cfg.media_dir) if cfg.media_dir else None
        self.metrics = Metrics(self)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._decoding = threading.BoundedSemaphore(cfg.max_concurrent_decodes)
        self.clips = ClipCache(int(cfg.clip_cache_mb * 2**20))  # decoded videos by content: a chat resends them

    @staticmethod
    def _mkdir(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self.engine.serve_forever, args=(self._stop,), daemon=True,
                                            name="engine")
            self._thread.start()

    @property
    def engine_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self.engine.close(self._stop)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.jobs is not None:
            self.jobs.close()
        shutil.rmtree(self.upload_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ one request

    def load_video(self, url: str, where: str, gate: bool = True, *, frames: tuple[str, ...] | None = None,
                   read: FrameRequest = FrameRequest()):
        """One video part (or, with ``frames``, the image URLs of one video's frames) -> (clip, flagged by the input
        gate), on a worker thread; ``MediaError`` names the part. At most ``max_concurrent_decodes`` decode at once:
        even a header probe decodes one frame at the declared size (up to ``max_frame_pixels``), so concurrency, not
        only each video, must be bounded."""
        common = dict(media_dir=self.media_dir, upload_dir=self.upload_dir, limits=self.cfg.limits,
                      num_frames=self.info.num_frames, size=self.info.image_size, sampling=self.info.sampling,
                      resize=self.info.resize, gate=self.video_gate if gate else None, cache=self.clips, read=read)
        with self._decoding:
            if frames is not None:
                return load_frames_part(frames, where, **common)
            return load_video_part(url, where, **common)

    def load_videos(self, call: api.ChatCall) -> tuple[list, bool]:
        """Decode every video of the request -> (clips, any flagged by the input gate)."""
        o = call.video_options
        read = FrameRequest(o.num_frames, o.fps, o.where)
        out = [self.load_video(v.urls[0], v.where, frames=v.urls if v.frames else None, read=read)
               for v in call.videos]
        return [clip for clip, _ in out], any(flagged for _, flagged in out)

    def engine_request(self, call: api.ChatCall, clips: list) -> EngineRequest:
        if clips and not self.info.has_vision:
            raise api.APIError(400, "this model is a text-only LLM: it cannot take videos", param="messages")
        if self.chat_template:
            conv = tokenize_chat_template(self.tokenizer, call.messages)
        else:
            conv = tokenize_conversation(self.tokenizer, call.turns, num_video_tokens=self.info.num_video_tokens,
                                         system_prompt=self.cfg.system_prompt if call.system_prompt is None
                                         else call.system_prompt, add_generation_prompt=True)
        try:
            check_vocab(self.info, conv)
        except ValueError as e:
            raise api.APIError(500, str(e)) from None
        room = min(self.engine.cfg.max_length, self.info.context)
        max_tokens = call.max_tokens if call.max_tokens is not None else min(self.cfg.max_tokens,
                                                                             max(1, room - len(conv)))
        if len(conv) + max_tokens > room:
            raise api.APIError(400, f"the conversation is {len(conv)} tokens (videos included); with max_tokens="
                                    f"{max_tokens} it does not fit the {room} tokens this server gives a request",
                               param="messages")
        # a top_k beyond the vocabulary keeps every token, as top_k = vocabulary does
        sampling = SamplingConfig(max_tokens, temperature=call.temperature, top_k=min(call.top_k, self.info.vocab_size),
                                  top_p=call.top_p, stop_sequences=() if self.chat_template else self.stops)
        stops = call.stop if self.chat_template else (STOP_STRING, *call.stop)
        return EngineRequest.from_conversation(conv, [(c.frames, c.frame_mask) for c in clips], sampling,
                                               seed=call.seed, stop_strings=stops)

    def check_model(self, obj) -> None:
        """A request naming another model than the one served is a 404, as vLLM answers it (no name: this one)."""
        name = obj.get("model") if isinstance(obj, dict) else None
        if name is not None and name != self.cfg.model_name:
            shown = api.show_value(name)
            raise api.APIError(404, f"the model {shown} does not exist; this server serves {self.cfg.model_name!r}",
                               param="model", code="model_not_found")

    def start_jobs(self, text: str) -> list[dict]:
        answer = finish_answer(text, 0)
        if not answer.requests:
            return []
        if self.jobs is None:
            return [{"id": None, "prompt": r.prompt, "status": "not_rendered",
                     "error": {"message": "this server has no text-to-video backend"}} for r in answer.requests]
        return [self.jobs.submit(r).public() for r in answer.requests]


def _longest_token(tokenizer) -> int:
    """Characters of the vocabulary's longest token (>= 1): no text longer than context x this can fit the
    context, so longer text is refused before it is tokenized."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return max((len(t) for t in vocab), default=16) or 1
