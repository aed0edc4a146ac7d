"""The HTTP server: an OpenAI-compatible video chat API over the inference engine, video generation jobs, health,
Prometheus metrics and the web page.

    app = create_app(Server(model, tokenizer, ServeConfig(...)))      # any ASGI server runs it; __main__ uses uvicorn

The engine runs on its own thread (``Engine.serve_forever``); a request handler parses and checks the request,
decodes its videos on a worker thread, submits it, and awaits the engine's callbacks through an asyncio queue. A
client that goes away mid-stream cancels its request, which frees its slot before the next step.

Status codes: 400 bad input (the message names the field or content part), 401 no or a wrong API key, 404 unknown
job or model, 408 a body that did not arrive within ``body_timeout_s``, 413 body over ``max_body_bytes``, 415 a POST
body that is not ``application/json``, 429 queue full; a 500 is a bug (a one-line message to the client, the traceback
to the server's log), and the engine goes on after it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from fastapi import Request  # at module level: the route signatures' annotations are resolved from here

from g4v_jax.config import EngineConfig
from g4v_jax.data.template import SYSTEM_PROMPT, tokenize_chat_template, tokenize_conversation
from g4v_jax.inference.engine import Engine, EngineRequest, RequestError
from g4v_jax.inference.generate import SamplingConfig
from g4v_jax.inference.session import STOP_STRING, check_vocab, model_info, with_stops
from g4v_jax.inference.text import finish_answer
from g4v_jax.safety.refusal import POLITE_REFUSAL, is_refusal
from g4v_jax.serve import api
from g4v_jax.serve.access import AccessMiddleware
from g4v_jax.serve.jobs import VideoJobs
from g4v_jax.serve.media import MediaError, MediaLimits, load_video_part
from g4v_jax.serve.openapi import openapi_spec

logger = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


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
        jobs = server.jobs
        if jobs is not None:
            for status in ("queued", "running", "succeeded", "refused", "failed"):
                Gauge(f"g4v_video_jobs_{status}", f"video jobs {status}", registry=r).set_function(
                    lambda s=status: jobs.counts().get(s, 0))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


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

    @staticmethod
    def _mkdir(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self.engine.serve_forever, args=(self._stop,), daemon=True,
                                            name="engine")
            self._thread.start()

    def stop(self) -> None:
        self.engine.close(self._stop)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.jobs is not None:
            self.jobs.close()
        shutil.rmtree(self.upload_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ one request

    def load_video(self, url: str, where: str, gate: bool = True):
        """One video part -> (clip, flagged by the input gate), on a worker thread; ``MediaError`` names the part.
        At most ``max_concurrent_decodes`` decode at once: even a header probe decodes one frame at the declared
        size (up to ``max_frame_pixels``), so concurrency, not only each video, must be bounded."""
        with self._decoding:
            return load_video_part(url, where, media_dir=self.media_dir, upload_dir=self.upload_dir,
                                   limits=self.cfg.limits, num_frames=self.info.num_frames, size=self.info.image_size,
                                   sampling=self.info.sampling, resize=self.info.resize,
                                   gate=self.video_gate if gate else None)

    def load_videos(self, call: api.ChatCall) -> tuple[list, bool]:
        """Decode every video part -> (clips, any flagged by the input gate)."""
        out = [self.load_video(url, where) for url, where in call.video_urls]
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


def create_app(server: Server):
    """The ASGI app (FastAPI) serving ``server``; starts and stops its engine thread with the app."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start()
        try:
            yield
        finally:
            server.stop()

    app = FastAPI(title="g4v_jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    model_name = server.cfg.model_name
    app.add_middleware(AccessMiddleware, api_key=server.cfg.api_key)
    if server.cfg.allowed_origins:  # added last: outermost, so a preflight is answered before the key check
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(server.cfg.allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(api.APIError)
    async def api_error(request, exc: api.APIError):
        if exc.status >= 500:
            logger.error("answering %s: %s", request.url.path, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return JSONResponse(api.APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request, exc):
        logger.exception("unexpected error answering %s", request.url.path)
        return JSONResponse(api.APIError(500, f"internal error: {type(exc).__name__}").body(), status_code=500)

    async def read_json(request: Request):
        """The body as JSON: ``application/json`` only (a text/plain POST is a 'simple' request any web page can
        send cross-origin), at most ``max_body_bytes``, all of it within ``body_timeout_s``."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise api.APIError(415, f"the request body must be JSON sent as Content-Type: application/json, got "
                                    f"{kind or 'none'!r}")
        limit = server.cfg.max_body_bytes
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
            raw = await asyncio.wait_for(whole(), server.cfg.body_timeout_s)
        except asyncio.TimeoutError:
            raise api.APIError(408, f"the request body did not arrive within {server.cfg.body_timeout_s:g} s") \
                from None
        try:
            return json.loads(raw)
        except RecursionError:
            raise api.APIError(400, "the request body nests JSON too deeply") from None
        except ValueError as e:  # JSONDecodeError, bad UTF-8, an integer of more than 4300 digits
            raise api.APIError(400, f"the request body is not JSON ({_first_line(e)})") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            obj = await read_json(request)
            server.check_model(obj)
            call = api.parse_chat(obj, max_videos=server.cfg.max_videos, default_temperature=server.cfg.temperature,
                                  limits=server.limits)
            clips, flagged = await run_in_threadpool(server.load_videos, call)
        except (api.APIError, MediaError) as e:
            server.metrics.requests.labels("bad_request").inc()
            raise e if isinstance(e, api.APIError) else api.APIError(400, str(e)) from None
        cid = api.completion_id()
        if flagged:  # the model never sees the video
            server.metrics.requests.labels("refused_input").inc()
            return _refusal(cid, model_name, call.stream, call.include_usage)
        try:
            req = server.engine_request(call, clips)
        except api.APIError:
            server.metrics.requests.labels("bad_request").inc()
            raise
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_text(piece: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("text", piece))

        def on_done(result) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("done", result))

        try:
            handle = server.engine.submit(req, on_text=on_text, on_done=on_done)
        except RequestError as e:
            busy = "queue is full" in str(e)
            server.metrics.requests.labels("busy" if busy else "bad_request").inc()
            raise api.APIError(429 if busy else 400, str(e), param=None if busy else "max_tokens") from None

        def account(result) -> dict:
            server.metrics.requests.labels(result.finish_reason).inc()
            server.metrics.prompt_tokens.inc(result.prompt_tokens)
            server.metrics.generated_tokens.inc(len(result.tokens))
            if result.token_times:
                server.metrics.ttft.observe(result.ttft)
                server.metrics.latency.observe(result.token_times[-1] - result.submitted)
            use = api.usage(result.prompt_tokens, len(result.tokens))
            request.state.usage = use
            if result.finish_reason == "error":
                logger.error("the engine failed request %s: %s", cid, result.error)
            return use

        if not call.stream:
            # nobody else reads the connection now: a disconnect is the next ASGI message it gives
            gone = asyncio.ensure_future(_disconnect(request))
            done = asyncio.ensure_future(_finished(events))
            try:
                await asyncio.wait({gone, done}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not done.done():
                    done.cancel()
                    handle.cancel()
                gone.cancel()
            if not done.done() or done.cancelled():
                server.metrics.requests.labels("disconnected").inc()
                return Response(status_code=499)
            value = done.result()
            use = account(value)
            if value.finish_reason == "error":
                raise api.APIError(500, "internal error: the engine failed this request (the server goes on)")
            jobs = server.start_jobs(value.text)
            return JSONResponse(api.completion(cid, model_name, value.text, value.finish_reason, use, jobs,
                                               refusal=is_refusal(value.text)))

        async def sse():
            finished = False
            try:
                yield _sse(api.chunk(cid, model_name, {"role": "assistant", "content": ""}))
                while True:
                    kind, value = await events.get()
                    if kind == "text":
                        yield _sse(api.chunk(cid, model_name, {"content": value}))
                        continue
                    finished = True
                    use = account(value)
                    if value.finish_reason == "error":  # the status is sent: say it in the stream, as vLLM does
                        err = api.APIError(500, "internal error: the engine failed this request (the server goes on)")
                        yield _sse(err.body())
                        yield "data: [DONE]\n\n"
                        return
                    jobs = server.start_jobs(value.text)
                    delta = {"video_generations": jobs} if jobs else {}
                    if is_refusal(value.text):
                        delta["refusal"] = value.text
                    yield _sse(api.chunk(cid, model_name, delta, value.finish_reason))
                    if call.include_usage:
                        yield _sse(api.chunk(cid, model_name, {}, use=use, choices=False))
                    yield "data: [DONE]\n\n"
                    return
            finally:
                if not finished:  # the client went away: free the slot now
                    handle.cancel()
                    server.metrics.requests.labels("disconnected").inc()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/video/frames")
    async def video_frames(request: Request):
        """The T frames the model reads of a video (its sampling and resizing), as PNG data URLs: the page shows
        them. Body: ``{"url": data: or file:// URL}``; the same checks as a chat request's video parts."""
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

    @app.get("/v1/media")
    async def media():
        """The videos a file:// URL may name (the media directory's top level), for the page's picker."""
        if server.media_dir is None or not server.media_dir.is_dir():
            return {"videos": []}
        names = sorted(p.name for p in server.media_dir.iterdir()
                       if p.is_file() and p.suffix.lower() in (".mp4", ".webm", ".mov", ".mkv", ".avi"))
        return {"videos": names[:500]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "g4v_jax",
                                            "max_model_len": server.info.context}]}

    @app.get("/v1/videos/{job_id}")
    async def video_status(job_id: str):
        job = server.jobs.get(job_id) if server.jobs is not None else None
        if job is None:
            raise api.APIError(404, f"no video job {job_id!r}", param="job_id")
        return job.public()

    @app.get("/v1/videos/{job_id}/content")
    async def video_content(job_id: str):
        job = server.jobs.get(job_id) if server.jobs is not None else None
        if job is None:
            raise api.APIError(404, f"no video job {job_id!r}", param="job_id")
        if job.status != "succeeded" or job.path is None:
            raise api.APIError(404, f"video job {job_id!r} has no video ({job.status}"
                                    + (f": {job.error}" if job.error else "") + ")", param="job_id")
        return FileResponse(job.path, media_type="video/mp4")

    @app.get("/openapi.json")
    async def openapi():
        return openapi_spec(server.limits, server.cfg.max_videos, model_name, api_key=bool(server.cfg.api_key))

    @app.get("/health")
    async def health():
        alive = server._thread is not None and server._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped", "model": model_name},
                            status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        index = STATIC / "index.html"
        if not index.is_file():
            return Response("g4v_jax server: the API is at /v1/chat/completions", media_type="text/plain")
        return FileResponse(index, media_type="text/html")

    return app


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _longest_token(tokenizer) -> int:
    """Characters of the vocabulary's longest token (>= 1): no text longer than context x this can fit the
    context, so longer text is refused before it is tokenized."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return max((len(t) for t in vocab), default=16) or 1


def _png_data_url(frame) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def _disconnect(request) -> None:
    """Returns when the client has gone away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _finished(events: asyncio.Queue):
    """The engine's result, skipping the streamed text pieces (a plain request does not stream)."""
    while True:
        kind, value = await events.get()
        if kind == "done":
            return value


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _refusal(cid: str, model_name: str, stream: bool, include_usage: bool):
    from fastapi.responses import JSONResponse, StreamingResponse

    if not stream:
        return JSONResponse(api.completion(cid, model_name, POLITE_REFUSAL, "refused", api.usage(0, 0), [],
                                           refusal=True))

    async def sse():
        yield _sse(api.chunk(cid, model_name, {"role": "assistant", "content": ""}))
        yield _sse(api.chunk(cid, model_name, {"content": POLITE_REFUSAL}))
        yield _sse(api.chunk(cid, model_name, {"refusal": POLITE_REFUSAL}, "refused"))
        if include_usage:
            yield _sse(api.chunk(cid, model_name, {}, use=api.usage(0, 0), choices=False))
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")
