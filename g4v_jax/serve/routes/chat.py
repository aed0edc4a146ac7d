"""``POST /v1/chat/completions``: OpenAI's chat completions over the engine, whole or streamed (SSE).

A request is read and checked (``api.parse_chat``, the model's name), its videos decoded on a worker thread (past the
input gate: a flagged video gets the polite refusal and never reaches the model), then submitted to the engine, whose
callbacks reach this request through an asyncio queue. A client that goes away frees its slot before the next step
(a streamed one when its generator is closed, a plain one when its connection says ``http.disconnect``). A request
the engine fails is a 500 (streamed: an error event, then ``[DONE]``); the engine goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from g4v_jax.inference.engine import RequestError
from g4v_jax.safety.refusal import POLITE_REFUSAL, is_refusal
from g4v_jax.serve import api
from g4v_jax.serve.media import MediaError
from g4v_jax.serve.routes import read_json, server_of
from g4v_jax.serve.server import Server

logger = logging.getLogger(__name__)
router = APIRouter()
ENGINE_FAILED = "internal error: the engine failed this request (the server goes on)"


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    server = server_of(request)
    call, clips, flagged = await _read_call(request, server)
    cid = api.completion_id()
    frames = [c.num_real_frames for c in clips]  # usage.video_frames: what the model read of each video
    if flagged:  # the model never sees the video
        server.metrics.requests.labels("refused_input").inc()
        return _refusal(cid, server.cfg.model_name, call.stream, call.include_usage, frames)
    events: asyncio.Queue = asyncio.Queue()
    handle = _submit(server, call, clips, events)
    answer = _Answer(server, request, cid, frames)
    if not call.stream:
        return await answer.whole(handle, events)
    return StreamingResponse(answer.stream(handle, events, call.include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _read_call(request: Request, server: Server):
    """(the checked call, its decoded clips, whether the input gate flagged one); a 4xx names what is wrong."""
    try:
        obj = await read_json(request)
        server.check_model(obj)
        call = api.parse_chat(obj, max_videos=server.cfg.max_videos, default_temperature=server.cfg.temperature,
                              limits=server.limits)
        clips, flagged = await run_in_threadpool(server.load_videos, call)
    except (api.APIError, MediaError) as e:
        server.metrics.requests.labels("bad_request").inc()
        raise e if isinstance(e, api.APIError) else api.APIError(400, str(e)) from None
    return call, clips, flagged


def _submit(server: Server, call: api.ChatCall, clips: list, events: asyncio.Queue):
    """Queue the request on the engine; its text pieces and its result arrive in ``events``."""
    try:
        req = server.engine_request(call, clips)
    except api.APIError:
        server.metrics.requests.labels("bad_request").inc()
        raise
    loop = asyncio.get_running_loop()
    try:
        return server.engine.submit(
            req, on_text=lambda piece: loop.call_soon_threadsafe(events.put_nowait, ("text", piece)),
            on_done=lambda result: loop.call_soon_threadsafe(events.put_nowait, ("done", result)))
    except RequestError as e:
        busy = "queue is full" in str(e)
        server.metrics.requests.labels("busy" if busy else "bad_request").inc()
        raise api.APIError(429 if busy else 400, str(e), param=None if busy else "max_tokens") from None


class _Answer:
    """The engine's answer to one request, as a ``chat.completion`` or as a stream of chunks."""

    def __init__(self, server: Server, request: Request, cid: str, video_frames: list[int]) -> None:
        self.server, self.request, self.cid, self.video_frames = server, request, cid, video_frames
        self.model = server.cfg.model_name

    def account(self, result) -> dict:
        """Metrics and the access log's token counts for a finished request; its ``usage``."""
        m = self.server.metrics
        m.requests.labels(result.finish_reason).inc()
        m.prompt_tokens.inc(result.prompt_tokens)
        m.generated_tokens.inc(len(result.tokens))
        if result.token_times:
            m.ttft.observe(result.ttft)
            m.latency.observe(result.token_times[-1] - result.submitted)
        use = api.usage(result.prompt_tokens, len(result.tokens), self.video_frames)
        self.request.state.usage = use
        if result.finish_reason == "error":
            logger.error("the engine failed request %s: %s", self.cid, result.error)
        return use

    async def whole(self, handle, events: asyncio.Queue):
        # nobody else reads the connection now: a disconnect is the next ASGI message it gives
        gone = asyncio.ensure_future(_disconnect(self.request))
        done = asyncio.ensure_future(_finished(events))
        try:
            await asyncio.wait({gone, done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not done.done():
                done.cancel()
                handle.cancel()
            gone.cancel()
        if not done.done() or done.cancelled():
            self.server.metrics.requests.labels("disconnected").inc()
            return Response(status_code=499)
        result = done.result()
        use = self.account(result)
        if result.finish_reason == "error":
            raise api.APIError(500, ENGINE_FAILED)
        jobs = self.server.start_jobs(result.text)
        return JSONResponse(api.completion(self.cid, self.model, result.text, result.finish_reason, use, jobs,
                                           refusal=is_refusal(result.text)))

    async def stream(self, handle, events: asyncio.Queue, include_usage: bool):
        finished = False
        try:
            yield _sse(api.chunk(self.cid, self.model, {"role": "assistant", "content": ""}))
            while True:
                kind, value = await events.get()
                if kind == "text":
                    yield _sse(api.chunk(self.cid, self.model, {"content": value}))
                    continue
                finished = True
                use = self.account(value)
                if value.finish_reason == "error":  # the status is sent: say it in the stream, as vLLM does
                    yield _sse(api.APIError(500, ENGINE_FAILED).body())
                    yield "data: [DONE]\n\n"
                    return
                jobs = self.server.start_jobs(value.text)
                delta = {"video_generations": jobs} if jobs else {}
                if is_refusal(value.text):
                    delta["refusal"] = value.text
                yield _sse(api.chunk(self.cid, self.model, delta, value.finish_reason))
                if include_usage:
                    yield _sse(api.chunk(self.cid, self.model, {}, use=use, choices=False))
                yield "data: [DONE]\n\n"
                return
        finally:
            if not finished:  # the client went away: free the slot now
                handle.cancel()
                self.server.metrics.requests.labels("disconnected").inc()


async def _disconnect(request: Request) -> None:
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


def _refusal(cid: str, model_name: str, stream: bool, include_usage: bool, video_frames: list[int]):
    if not stream:
        return JSONResponse(api.completion(cid, model_name, POLITE_REFUSAL, "refused",
                                           api.usage(0, 0, video_frames), [], refusal=True))

    async def sse():
        yield _sse(api.chunk(cid, model_name, {"role": "assistant", "content": ""}))
        yield _sse(api.chunk(cid, model_name, {"content": POLITE_REFUSAL}))
        yield _sse(api.chunk(cid, model_name, {"refusal": POLITE_REFUSAL}, "refused"))
        if include_usage:
            yield _sse(api.chunk(cid, model_name, {}, use=api.usage(0, 0, video_frames), choices=False))
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")
