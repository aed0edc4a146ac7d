"""The OpenAI chat-completions schema, as vLLM and SGLang take it, in and out.

In: ``{"model", "messages": [{"role": "system"|"developer"|"user"|"assistant", "content": str | [part]}],
"max_tokens" (or "max_completion_tokens"), "temperature", "top_p", "top_k" (vLLM's), "seed", "stop": str | [str],
"n": 1, "stream", "stream_options": {"include_usage"}, "user", "media_io_kwargs", "mm_processor_kwargs"}``; a part is
``{"type": "text", "text"}``, ``{"type": "video_url", "video_url": {"url"}}`` or ``{"type": "image_url", "image_url":
{"url"}}``. Consecutive ``image_url`` parts of one message are one video's frames, in order (what lmms-eval's and
VLMEvalKit's OpenAI clients send), as is vLLM's ``data:video/jpeg;base64,<frame>,<frame>,...``. A user message's
videos precede its text in the conversation, as the template puts them. vLLM's per-request frame sampling,
``media_io_kwargs: {"video": {"num_frames", "fps"}}`` or ``mm_processor_kwargs: {"num_frames", "fps"}``, is honoured
or refused, never ignored (``VideoOptions``). ``frequency_penalty``, ``presence_penalty``, ``logit_bias``, ``logprobs`` and ``top_logprobs``
are accepted only at their neutral values (this server does not implement them); every list and string is bounded
by ``RequestLimits`` before any work that grows with it.

Out: ``chat.completion`` / ``chat.completion.chunk`` objects. The model's ``<video>`` requests stay in the text as
generated; the extension field ``choices[0].message.video_generations`` (in the last stream chunk:
``choices[0].delta.video_generations``) lists each with its job: ``{"id", "prompt", "status", "url"}``.
Errors: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Mapping
from typing import Any

from g4v_jax.data.template import Turn

KNOWN_KEYS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n",
              "stream", "stream_options", "user", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs",
              "top_logprobs", "top_k", "media_io_kwargs", "mm_processor_kwargs"}
MAX_FPS = 240.0
# Accepted only at their neutral value: this server does not implement them, and a request that asks for them gets a
# 400 rather than an answer that silently ignored them.
UNSUPPORTED = {"frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "logprobs": (False,),
               "top_logprobs": (0,)}


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one chat request may hold, checked before any work that grows with it (README: Serving, limits).

    ``max_text_chars`` bounds the characters of all text before tokenizing: ``Server`` sets it to the context times
    the longest token of the vocabulary, above which no conversation can fit the context."""

    max_messages: int = 512
    max_parts: int = 64  # content parts per message
    max_stop: int = 4  # OpenAI's limit
    max_stop_chars: int = 256  # per stop string; the stream decoder's work per token is linear in it
    max_text_chars: int = 1 << 20
    max_user_chars: int = 256


class APIError(Exception):
    """An error answered in OpenAI's error JSON with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
                405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
                415: "invalid_request_error", 429: "rate_limit_error", 503: "server_busy"}.get(self.status,
                                                                                              "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class VideoPart:
    """One video of a request: a video URL, or the URLs of its frames (consecutive ``image_url`` parts, or a
    ``data:video/jpeg`` URL of base64 frames, split later), and where it sits in the request."""

    urls: tuple[str, ...]
    frames: bool  # True: ``urls`` are images, one per frame
    where: str  # "messages[i].content[j]" (the first part of a frame run)


@dataclasses.dataclass(frozen=True)
class VideoOptions:
    """vLLM's per-request frame sampling: read ``num_frames`` frames (at most the model's T; fewer are masked as a
    short video is) or the frames at ``fps`` per second (a video file only: frames sent as images have no time);
    ``None``: the model's own sampling of T frames. ``where`` names the field the values came from."""

    num_frames: int | None = None
    fps: float | None = None
    where: str = ""


@dataclasses.dataclass(frozen=True)
class ChatCall:
    """A parsed request: the conversation as template turns, the video URLs in order, and the settings."""

    turns: list[Turn]
    videos: list[VideoPart]
    system_prompt: str | None
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    messages: tuple[dict, ...] = ()  # the conversation as {"role", "content": text} (a chat template's input)
    video_options: VideoOptions = VideoOptions()


def _number(obj: Mapping, key: str, default: float, low: float, high: float) -> float:
    value = obj.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise APIError(400, f"{key!r} must be a number in [{low}, {high}], got {show_value(value)}", param=key)
    return float(value)


def _integer(obj: Mapping, key: str, low: int, high: int | None = None) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise APIError(400, f"{key!r} must be an integer {bound}, got {show_value(value)}", param=key)
    return value


def show_value(value: Any) -> str:
    """A client's value in an error message, cut short (a message never grows with the request)."""
    text = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _string(value: Any, where: str) -> str:
    """``value`` if it is a string that UTF-8 can carry (JSON's ``\\ud800`` escapes make lone surrogates)."""
    if not isinstance(value, str):
        raise APIError(400, f"{where} must be a string, got {type(value).__name__}", param=where)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{where} holds a lone surrogate ({e.object[e.start:e.end]!a} at {e.start}): not valid "
                            "Unicode text", param=where) from None
    return value


def parse_chat(obj: Any, *, max_videos: int, default_temperature: float = 0.0,
               limits: RequestLimits = RequestLimits()) -> ChatCall:
    """Check a request body (module docstring); ``APIError(400)`` names the field that is wrong. ``temperature``
    defaults to the server's (greedy unless it was started otherwise), not OpenAI's 1. Every list and string is
    checked against ``limits`` before anything is done with it."""
    if not isinstance(obj, Mapping):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(obj) - KNOWN_KEYS)
    if unknown:
        raise APIError(400, f"unknown field(s) {[show_value(k) for k in unknown[:5]]}", param=show_value(unknown[0]))
    for key, neutral in UNSUPPORTED.items():
        value = obj.get(key)
        if value is not None and (isinstance(value, bool) != (key == "logprobs") or value not in neutral):
            raise APIError(400, f"{key!r} is not supported by this server (got {show_value(obj[key])}); leave it out",
                           param=key)
    n = obj.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise APIError(400, f"'n' must be 1, got {show_value(n)}", param="n")
    if obj.get("user") is not None and len(_string(obj["user"], "user")) > limits.max_user_chars:
        raise APIError(400, f"'user' is over {limits.max_user_chars} characters", param="user")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    if len(messages) > limits.max_messages:
        raise APIError(400, f"{len(messages)} messages; this server takes at most {limits.max_messages}",
                       param="messages")
    turns: list[Turn] = []
    plain: list[dict] = []
    urls: list[VideoPart] = []
    system = None
    chars = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, Mapping) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"{where} must be an object with role system, user or assistant"
                                + (f", got {show_value(role)}" if isinstance(m, Mapping) else ""), param=where)
        texts, videos = _content(m.get("content"), where, limits)
        chars += sum(len(t) for t in texts)
        if chars > limits.max_text_chars:
            raise APIError(400, f"the messages' text is over {limits.max_text_chars} characters, more than the "
                                "model's context can hold", param="messages")
        text = "\n".join(texts)
        if role in ("system", "developer"):
            if videos:
                raise APIError(400, f"{where}: a system message cannot hold videos", param=where)
            system = text
            plain.append({"role": "system", "content": system})
            continue
        if role == "assistant":
            if videos:
                raise APIError(400, f"{where}: an assistant message cannot hold videos", param=where)
            if text.strip():  # an empty answer leaves no turn
                turns.append(Turn("ai", text))
            plain.append({"role": "assistant", "content": text})
            continue
        for part in videos:
            turns.append(Turn("human", video=len(urls)))
            urls.append(part)
        if text.strip():
            turns.append(Turn("human", text))
        plain.append({"role": "user", "content": text})
    if not turns or turns[-1].role != "human" or turns[-1].video is not None:
        raise APIError(400, "the last message must be a user message with text (the model answers it)",
                       param="messages")
    if len(urls) > max_videos:
        raise APIError(400, f"{len(urls)} videos in one request; this server takes at most {max_videos}",
                       param="messages")
    max_tokens = _integer(obj, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(obj, "max_tokens", 1)
    stop = _stops(obj.get("stop"), limits)
    options = obj.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, Mapping) or set(options) - {"include_usage"} or not isinstance(
            options.get("include_usage", False), bool):
        raise APIError(400, "'stream_options' must be {\"include_usage\": true|false}", param="stream_options")
    stream = obj.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be true or false, got {show_value(stream)}", param="stream")
    seed = _integer(obj, "seed", -2**63, 2**64 - 1)
    top_k = _integer(obj, "top_k", -1)  # vLLM's convention: -1 or 0 turn it off
    return ChatCall(turns, urls, system, max_tokens, _number(obj, "temperature", default_temperature, 0.0, 2.0),
                    _number(obj, "top_p", 1.0, 1e-6, 1.0), max(top_k or 0, 0), seed or 0, stop, bool(stream),
                    bool(options.get("include_usage", False)), tuple(plain), video_options(obj))


def _sampling_fields(value: Any, where: str) -> tuple[int | None, float | None]:
    """(num_frames, fps) of a ``{"num_frames", "fps"}`` object; any other key is a 400 naming it."""
    if value is None:
        return None, None
    if not isinstance(value, Mapping):
        raise APIError(400, f"'{where}' must be an object", param=where)
    other = sorted(str(k) for k in value if k not in ("num_frames", "fps"))
    if other:
        raise APIError(400, f"'{where}': {[show_value(k) for k in other[:5]]} not supported; this server's video "
                            "sampling takes num_frames and fps", param=where)
    n, fps = value.get("num_frames"), value.get("fps")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise APIError(400, f"'{where}.num_frames' must be an integer >= 1, got {show_value(n)}",
                       param=f"{where}.num_frames")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= MAX_FPS):
        raise APIError(400, f"'{where}.fps' must be a number in (0, {MAX_FPS:g}], got {show_value(fps)}",
                       param=f"{where}.fps")
    return n, None if fps is None else float(fps)


def video_options(obj: Mapping) -> VideoOptions:
    """``media_io_kwargs.video`` / ``mm_processor_kwargs`` (vLLM's names) -> ``VideoOptions``; both at once, or
    num_frames and fps at once, is a 400 (which would win is not obvious; vLLM's models differ)."""
    media = obj.get("media_io_kwargs")
    if media is not None:
        if not isinstance(media, Mapping) or set(media) - {"video"}:
            raise APIError(400, "'media_io_kwargs' takes {\"video\": {\"num_frames\", \"fps\"}} here (this "
                                "model reads videos only)", param="media_io_kwargs")
        media = media.get("video")
    found = [(where, _sampling_fields(value, where)) for where, value in
             (("media_io_kwargs.video", media), ("mm_processor_kwargs", obj.get("mm_processor_kwargs")))
             if value is not None]
    found = [(w, f) for w, f in found if f != (None, None)]
    if not found:
        return VideoOptions()
    if len(found) > 1:
        raise APIError(400, "give the frame sampling in media_io_kwargs.video or in mm_processor_kwargs, not both",
                       param="mm_processor_kwargs")
    where, (n, fps) = found[0]
    if n is not None and fps is not None:
        raise APIError(400, f"'{where}': give num_frames or fps, not both", param=where)
    return VideoOptions(n, fps, where)


def _stops(stop: Any, limits: RequestLimits) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not 0 < len(stops) <= limits.max_stop:
        raise APIError(400, f"'stop' must be a string or a list of 1 to {limits.max_stop} strings", param="stop")
    for j, s in enumerate(stops):
        if not _string(s, f"stop[{j}]") or len(s) > limits.max_stop_chars:
            raise APIError(400, f"stop[{j}] must be 1 to {limits.max_stop_chars} characters, got {len(s)}",
                           param="stop")
    return tuple(stops)


def _content(content: Any, where: str, limits: RequestLimits) -> tuple[list[str], list[VideoPart]]:
    if isinstance(content, str):
        return [_string(content, f"{where}.content")], []
    if content is None:
        return [], []
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
    if len(content) > limits.max_parts:
        raise APIError(400, f"{where}.content has {len(content)} parts; this server takes at most "
                            f"{limits.max_parts}", param=f"{where}.content")
    texts: list[str] = []
    videos: list[VideoPart] = []
    frames: list[str] = []  # the image_url run being read
    first = where
    for j, part in enumerate(content):
        pw = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "image_url" and frames:
            videos.append(VideoPart(tuple(frames), True, first))
            frames = []
        if kind == "text":
            texts.append(_string(part.get("text"), f"{pw}.text"))
        elif kind in ("video_url", "image_url"):
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, Mapping) else ref
            if not isinstance(url, str):
                raise APIError(400, f"{pw}: {kind} must be {{\"url\": string}}", param=pw)
            url = _string(url, f"{pw}.{kind}.url")
            if kind == "video_url":
                videos.append(VideoPart((url,), url[:16].lower().startswith("data:video/jpeg"), pw))
            else:
                if not frames:
                    first = pw
                frames.append(url)
        else:
            raise APIError(400, f"{pw}: unsupported content part type {show_value(kind)} (this model takes 'text', "
                                "'video_url' and 'image_url': consecutive images are one video's frames)", param=pw)
    if frames:
        videos.append(VideoPart(tuple(frames), True, first))
    return texts, videos


# --------------------------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop", "refused": "stop"}


def usage(prompt_tokens: int, completion_tokens: int, video_frames: list[int] | None = None) -> dict:
    """OpenAI's usage, and ``video_frames``: the frames the model read of each video of the request, in order."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if video_frames is not None:
        out["video_frames"] = list(video_frames)
    return out


def completion(cid: str, model: str, text: str, finish: str, use: dict, jobs: list[dict], *,
               refusal: bool = False) -> dict:
    """``message.refusal`` (OpenAI's field) repeats the text when the answer is a refusal (``safety.is_refusal``)."""
    message = {"role": "assistant", "content": text, "refusal": text if refusal else None, "video_generations": jobs}
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": FINISH.get(finish, "stop"), "logprobs": None}],
            "usage": use}


def chunk(cid: str, model: str, delta: dict, finish: str | None = None, use: dict | None = None,
          choices: bool = True) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": FINISH.get(finish, finish) if finish else None,
                        "logprobs": None}] if choices else []}
    if use is not None:
        out["usage"] = use
    return out
