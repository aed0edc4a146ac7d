"""The OpenAI chat-completions schema, as vLLM and SGLang take it, in and out.

In: ``{"model", "messages": [{"role": "system"|"user"|"assistant", "content": str | [part]}], "max_tokens"
(or "max_completion_tokens"), "temperature", "top_p", "seed", "stop": str | [str], "n": 1, "stream",
"stream_options": {"include_usage"}}``; a part is ``{"type": "text", "text"}`` or ``{"type": "video_url",
"video_url": {"url"}}``. A user message's videos precede its text in the conversation, as the template puts them.

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
              "stream", "stream_options", "user", "frequency_penalty", "presence_penalty", "logprobs",
              "top_logprobs", "top_k"}


class APIError(Exception):
    """An error answered in OpenAI's error JSON with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                429: "rate_limit_error", 503: "server_busy"}.get(self.status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class ChatCall:
    """A parsed request: the conversation as template turns, the video URLs in order, and the settings."""

    turns: list[Turn]
    video_urls: list[tuple[str, str]]  # (url, where: "messages[i].content[j]")
    system_prompt: str | None
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _number(obj: Mapping, key: str, default: float, low: float, high: float) -> float:
    value = obj.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise APIError(400, f"{key!r} must be a number in [{low}, {high}], got {value!r}", param=key)
    return float(value)


def _integer(obj: Mapping, key: str, low: int) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise APIError(400, f"{key!r} must be an integer >= {low}, got {value!r}", param=key)
    return value


def parse_chat(obj: Any, *, max_videos: int, default_temperature: float = 0.0) -> ChatCall:
    """Check a request body (module docstring); ``APIError(400)`` names the field that is wrong. ``temperature``
    defaults to the server's (greedy unless it was started otherwise), not OpenAI's 1."""
    if not isinstance(obj, Mapping):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(obj) - KNOWN_KEYS)
    if unknown:
        raise APIError(400, f"unknown field(s) {unknown}", param=unknown[0])
    n = obj.get("n", 1)
    if n != 1:
        raise APIError(400, f"'n' must be 1, got {n!r}", param="n")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    turns: list[Turn] = []
    urls: list[tuple[str, str]] = []
    system = None
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping) or m.get("role") not in ("system", "user", "assistant"):
            raise APIError(400, f"{where} must be an object with role system, user or assistant", param=where)
        role, content = m["role"], m.get("content")
        texts, videos = _content(content, where)
        if role == "system":
            if videos:
                raise APIError(400, f"{where}: a system message cannot hold videos", param=where)
            system = "\n".join(texts)
            continue
        if role == "assistant":
            if videos:
                raise APIError(400, f"{where}: an assistant message cannot hold videos", param=where)
            turns.append(Turn("ai", "\n".join(texts)))
            continue
        for url, part_where in videos:
            turns.append(Turn("human", video=len(urls)))
            urls.append((url, part_where))
        if texts:
            turns.append(Turn("human", "\n".join(texts)))
    if not turns or turns[-1].role != "human" or turns[-1].video is not None:
        raise APIError(400, "the last message must be a user message with text (the model answers it)",
                       param="messages")
    if len(urls) > max_videos:
        raise APIError(400, f"{len(urls)} videos in one request; this server takes at most {max_videos}",
                       param="messages")
    max_tokens = _integer(obj, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(obj, "max_tokens", 1)
    stop = obj.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop):
        stop = tuple(stop)
    else:
        raise APIError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    options = obj.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    seed = obj.get("seed", 0)
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise APIError(400, f"'seed' must be an integer, got {seed!r}", param="seed")
    return ChatCall(turns, urls, system, max_tokens, _number(obj, "temperature", default_temperature, 0.0, 2.0),
                    _number(obj, "top_p", 1.0, 1e-6, 1.0), _integer(obj, "top_k", 0) or 0, seed, stop,
                    bool(obj.get("stream", False)), bool(options.get("include_usage", False)))


def _content(content: Any, where: str) -> tuple[list[str], list[tuple[str, str]]]:
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
    texts, videos = [], []
    for j, part in enumerate(content):
        pw = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "video_url":
            ref = part.get("video_url")
            url = ref.get("url") if isinstance(ref, Mapping) else ref
            if not isinstance(url, str):
                raise APIError(400, f"{pw}: video_url must be {{\"url\": string}}", param=pw)
            videos.append((url, pw))
        else:
            raise APIError(400, f"{pw}: unsupported content part type {kind!r} (this model takes 'text' and "
                                "'video_url')", param=pw)
    return texts, videos


# --------------------------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop", "refused": "stop"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


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
