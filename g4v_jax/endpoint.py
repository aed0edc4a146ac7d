"""An OpenAI-compatible chat endpoint (``/v1/chat/completions``), for the dataset builders and the QA judge.

``ChatEndpoint(url, model)`` talks to any such server (OpenAI, vLLM, llama.cpp, a test fake) with the standard
library only; ``g4v_jax.data.build.endpoint.run_requests`` (the builders' resumable loop) and ``g4v_jax.eval.judge``
use it.

Endpoint
    - ``url``: the server base (``http://host:port``, ``.../v1``) or the full ``.../chat/completions`` URL.
    - ``api_key`` defaults to ``$OPENAI_API_KEY``; sent as ``Authorization: Bearer <key>`` when set.
    - Request body: ``{"model", "messages", "temperature"}``; the reply is ``choices[0].message.content``.
    - Retried (up to ``max_retries`` times after the first attempt): HTTP 408, 409, 429 and 5xx, network errors and
      timeouts, and a 200 response that is not a chat completion (not JSON, no ``choices``, no text content).
      Before retry k (1-based) the wait is the server's ``Retry-After`` (seconds or an HTTP date; or
      ``retry-after-ms``) when it sends one, else ``backoff * 2**(k-1)`` seconds capped at ``max_backoff``.
      Exhausted retries raise ``EndpointUnavailable``.
    - Any other 4xx is not retried: ``EndpointRejected`` at once, with the status and the server's message.
      ``status in FATAL_STATUSES`` (401, 403, 404, 405: a bad key or URL, the same for every request) stops a builder
      run; other rejections (e.g. 400 for a prompt the provider's moderation refuses) concern that request only.
    - ``requests_per_minute``: every HTTP request (retries included) first takes a slot from a thread-safe
      ``RateLimiter`` that spaces requests ``60 / requests_per_minute`` seconds apart (no bursts).
    - ``calls`` counts HTTP requests made (thread-safe).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

_log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_STATUSES = frozenset({408, 409, 429})  # plus every 5xx
FATAL_STATUSES = frozenset({401, 403, 404, 405})  # wrong key or URL: every request would fail the same way
MAX_RETRY_AFTER = 600.0  # seconds; a longer Retry-After is taken as this (a typo'd header must not stall a run)


class EndpointError(RuntimeError):
    """A chat request that produced no usable reply."""


class EndpointRejected(EndpointError):
    """A non-retryable HTTP error (4xx other than 408/409/429)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

    @property
    def fatal(self) -> bool:
        """True when every request would fail the same way (bad key or URL)."""
        return self.status in FATAL_STATUSES or 300 <= self.status < 400  # a redirect: every request would get it


class EndpointUnavailable(EndpointError):
    """Retries exhausted: ``attempts`` made, ``last`` the last problem."""

    def __init__(self, message: str, attempts: int, last: str) -> None:
        super().__init__(message)
        self.attempts, self.last = attempts, last


class _Retry(Exception):
    """One attempt failed in a way worth retrying; ``wait`` is the server's Retry-After, if any."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.wait = reason, wait


# --------------------------------------------------------------------------------------------------------------------
# Rate limiter
# --------------------------------------------------------------------------------------------------------------------


class RateLimiter:
    """At most ``requests_per_minute`` acquisitions per minute, spaced evenly: ``acquire`` reserves the next free
    slot (``60 / requests_per_minute`` s after the previous one, or now if that has passed) under a lock, then sleeps
    until it outside the lock, so concurrent threads get distinct slots. ``clock``/``sleep`` are injectable for
    tests."""

    def __init__(self, requests_per_minute: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not requests_per_minute > 0:
            raise ValueError(f"requests_per_minute must be > 0, got {requests_per_minute!r}")
        self.interval = 60.0 / requests_per_minute
        self._clock, self._sleep = clock, sleep
        self._next_free: float | None = None
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take the next slot; seconds until it starts (0 when it is free now). Does not sleep."""
        with self._lock:
            now = self._clock()
            start = now if self._next_free is None else max(now, self._next_free)
            self._next_free = start + self.interval
        return start - now

    def acquire(self) -> float:
        """Take the next slot and sleep until it; returns the seconds waited."""
        delay = self.reserve()
        if delay > 0:
            self._sleep(delay)
        return delay


# --------------------------------------------------------------------------------------------------------------------
# Endpoint
# --------------------------------------------------------------------------------------------------------------------


def chat_completions_url(url: str) -> str:
    """``http://h:p`` or ``http://h:p/v1`` -> ``http://h:p/v1/chat/completions``; a full URL is kept."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"endpoint URL must start with http:// or https://, got {url!r}")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def retry_after_seconds(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """The wait a 429/503 response asks for: ``retry-after-ms``, or ``Retry-After`` as seconds or an HTTP date;
    None when absent or unreadable. Capped at ``MAX_RETRY_AFTER``; never negative."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    value = headers.get("Retry-After")
    seconds: float | None = None
    try:
        if ms is not None:
            seconds = float(ms) / 1000.0
        elif value is not None:
            seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is None and value is not None:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds is None or seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _reply_text(raw: bytes) -> str:
    """``choices[0].message.content`` of a chat-completions body; ``_Retry`` when it is not one."""
    try:
        data = json.loads(raw.decode("utf-8"))
        content = data["choices"][0]["message"]["content"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError):
        raise _Retry(f"not a chat-completions response: {raw[:200]!r}") from None
    if not isinstance(content, str):  # null content (e.g. a provider-side content filter) is not a reply
        raise _Retry(f"chat-completions response without text content: {raw[:200]!r}")
    return content


def _error_message(body: bytes) -> str:
    """The server's error message (OpenAI style ``{"error": {"message": ...}}``) or the start of the body."""
    try:
        err = json.loads(body.decode("utf-8"))["error"]
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return body[:300].decode("utf-8", "replace")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect becomes an ``HTTPError`` (3xx): following it would re-send the POST, and its Authorization header,
    to wherever the server points, another host included."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def is_loopback(host: str | None) -> bool:
    """``host`` names this machine (``localhost`` or a loopback address)."""
    import ipaddress

    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint_url(url: str, has_key: bool) -> None:
    """An API key travels only over https, or plain http to this machine (a local server); anything else is refused
    before a request is made."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"endpoint URL {url!r} must start with http:// or https://")
    if has_key and parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ValueError(f"refusing to send an API key over plain http to {parts.hostname}: use https:// (plain http "
                         "is allowed to this machine only: localhost, 127.0.0.1, ::1)")


class ChatEndpoint:
    """An OpenAI-compatible chat-completions endpoint with retries, backoff and a rate limit (module docstring).

    The key is sent only to the configured URL: redirects are not followed (a 3xx is an error naming the target), and
    a key is never sent over plain http except to this machine.
    """

    def __init__(self, url: str, model: str, api_key: str | None = None, *, max_retries: int = 5,
                 backoff: float = 1.0, timeout: float = 60, requests_per_minute: float | None = None,
                 max_backoff: float = 60.0, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError(f"need max_retries >= 0, backoff >= 0, timeout > 0; got {max_retries}, {backoff}, "
                             f"{timeout}")
        if not model:
            raise ValueError("the endpoint needs a model name")
        self.url, self.model = chat_completions_url(url), model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        check_endpoint_url(self.url, bool(self.api_key))
        self.max_retries, self.backoff, self.max_backoff, self.timeout = max_retries, backoff, max_backoff, timeout
        self.limiter = RateLimiter(requests_per_minute, clock=clock, sleep=sleep) if requests_per_minute else None
        self._sleep = sleep
        self._calls = 0
        self._lock = threading.Lock()

    @property
    def calls(self) -> int:
        """HTTP requests made so far (retries included)."""
        return self._calls

    def _post(self, messages: Sequence[Mapping[str, str]], temperature: float) -> str:
        """One HTTP request; the reply text, or ``_Retry`` / ``EndpointRejected``."""
        body = json.dumps({"model": self.model, "messages": [dict(m) for m in messages],
                           "temperature": temperature}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        if self.limiter is not None:
            self.limiter.acquire()
        with self._lock:
            self._calls += 1
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            if 300 <= e.code < 400:
                target = e.headers.get("Location", "?") if e.headers else "?"
                raise EndpointRejected(f"{self.url} redirected the request (HTTP {e.code}) to {target}; redirects are "
                                       "not followed, so the API key stays with the configured host: use the final "
                                       "URL", e.code) from None
            detail = _error_message(e.read() or b"")
            if e.code in RETRY_STATUSES or e.code >= 500:
                raise _Retry(f"HTTP {e.code}: {detail}", retry_after_seconds(e.headers)) from None
            raise EndpointRejected(f"{self.url} rejected the request: HTTP {e.code} {e.reason}: {detail}",
                                   e.code) from None
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, a server that hung up
            raise _Retry(f"{type(e).__name__}: {e}") from None
        return _reply_text(raw)

    def complete_checked(self, messages: Sequence[Mapping[str, str]], check: Callable[[str], T], *,
                         temperature: float = 0.0) -> tuple[str, T]:
        """(reply, ``check(reply)``); a ``ValueError`` from ``check`` counts as a malformed response and is retried
        like one (for replies that must parse, e.g. a judge verdict)."""
        last, last_wait = "no attempt", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._sleep(self._wait_before_retry(attempt, last_wait))
            last_wait = None
            try:
                reply = self._post(messages, temperature)
                return reply, check(reply)
            except _Retry as e:
                last, last_wait = e.reason, e.wait
            except ValueError as e:  # check() rejected the reply
                last = str(e)
            _log.debug("attempt %d to %s failed: %s", attempt + 1, self.url, last)
        attempts = self.max_retries + 1
        raise EndpointUnavailable(f"no reply from {self.url} after {attempts} attempt(s); last: {last}", attempts,
                                  last)

    def complete(self, messages: Sequence[Mapping[str, str]], *, temperature: float = 0.0) -> str:
        """The reply text of one chat request (retries as in the module docstring)."""
        return self.complete_checked(messages, lambda reply: None, temperature=temperature)[0]

    def _wait_before_retry(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        return min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
