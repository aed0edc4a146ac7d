"""An OpenAI-compatible chat endpoint, and the resumable request loop every dataset builder runs through it.

``ChatEndpoint(url, model)`` talks to any ``/v1/chat/completions`` server (OpenAI, vLLM, llama.cpp, a test fake) with
the standard library only, and is shared by the dataset builders (``instruct``, ``safety_data``) and the QA judge
(``g4v_jax.eval.judge``). ``run_requests`` is the one loop the builders use: a thread pool, a rate limit, a progress
bar, and progress appended to disk as it goes so that a rerun resumes without repeating a call.

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

Resumable loop (``run_requests``)
    A ``Job`` is one chat request (``id``, ``messages``) and its ``parse`` function, ``reply -> Parsed`` (manifest
    examples as dicts, and rejected parts counted by reason). Two files record progress, both appended and flushed
    as each request finishes (in the main thread, so lines never interleave):

    - ``OUT`` (the manifest JSONL): the request's examples, each validated with ``manifest.example_from_dict``;
    - ``OUT.progress.jsonl``: one line per finished request, written after its examples:
      ``{"request": id, "examples": [example ids], "rejected": {reason: n}}`` plus ``"reply"`` (the raw reply, when
      something was rejected, for inspection) or ``"error"`` (an ``EndpointRejected`` message).

    A request is finished when its reply was parsed (even if every part was rejected: asking again would cost a call
    for the same kind of reply) or the endpoint rejected it with a non-fatal 4xx. A request whose retries were
    exhausted is not finished: it is counted as failed and asked again on the next run. After
    ``max_consecutive_failures`` such failures in a row the run stops early (the endpoint is down; rerun later).

    On start, finished requests are read from the progress file and skipped (no calls). The manifest is then
    repaired if a crash left it inconsistent: lines that are cut off, or whose example belongs to no finished
    request (written just before a crash, before their progress line), are dropped, and the file is rewritten
    atomically. Rerun with the same arguments: the job ids, not the arguments, decide what is done. Output order is
    completion order.

    ``RunSummary.markdown()`` is the report the CLIs print: requests planned / finished before / finished now /
    failed / not started, examples written, rejected parts by reason, HTTP calls.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import email.utils
import http.client
import json
import logging
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

from g4v_jax.data.manifest import example_from_dict

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


def _is_loopback(host: str | None) -> bool:
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
    if has_key and parts.scheme == "http" and not _is_loopback(parts.hostname):
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


# --------------------------------------------------------------------------------------------------------------------
# Resumable request loop
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Parsed:
    """What a reply became: manifest examples (dicts) and rejected parts counted by reason."""

    examples: list[dict[str, Any]]
    rejected: Mapping[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, eq=False)
class Job:
    """One chat request: ``id`` (unique; the resume key), the messages, and how to turn its reply into examples."""

    id: str
    messages: list[dict[str, str]]
    parse: Callable[[str], Parsed]


@dataclasses.dataclass
class RunSummary:
    planned: int = 0  # jobs given
    finished_before: int = 0  # skipped: finished by an earlier run, no calls
    finished: int = 0  # finished by this run
    failed: int = 0  # retries exhausted in this run; asked again by the next run
    not_started: int = 0  # left for a later run (limit, or the run stopped early)
    examples_written: int = 0  # by this run
    examples_total: int = 0  # in the output file now
    rejected: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # this run, by reason
    calls: int = 0  # HTTP requests made by this run
    dropped_on_repair: int = 0  # manifest lines of unfinished requests dropped at start
    stopped: str | None = None  # why the run stopped early

    def markdown(self, title: str = "", preamble: str = "") -> str:
        """The summary as a Markdown table, under an optional ``### title`` and ``preamble`` paragraph."""
        rows = [("requests planned", self.planned),
                ("finished before (skipped, no calls)", self.finished_before),
                ("finished in this run", self.finished),
                ("failed in this run (retried on a rerun)", self.failed),
                ("not started (limit or early stop)", self.not_started),
                ("examples written in this run", self.examples_written),
                ("examples in the output", self.examples_total)]
        rows += [(f"rejected: {reason}", n) for reason, n in sorted(self.rejected.items())]
        rows.append(("HTTP calls", self.calls))
        if self.dropped_on_repair:
            rows.append(("output lines dropped on resume (unfinished requests)", self.dropped_on_repair))
        lines = [f"### {title}", ""] if title else []
        lines += [preamble.strip(), ""] if preamble.strip() else []
        lines += ["| | count |", "|---|---:|", *(f"| {name} | {n} |" for name, n in rows)]
        if self.stopped:
            lines += ["", f"Stopped early: {self.stopped}"]
        return "\n".join(lines) + "\n"


def progress_path(out_path: str | os.PathLike) -> Path:
    """The progress file next to a builder's output manifest."""
    out = Path(out_path)
    return out.with_name(out.name + ".progress.jsonl")


def _read_lines(path: Path) -> list[tuple[int, str, bool]]:
    """(line number, text, complete) for each non-blank line; the last is incomplete if it lacks its newline."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        if line.strip():
            out.append((i + 1, line, i < len(lines) - 1))
    return out


def _write_lines_atomic(path: Path, lines: Iterable[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)


def load_progress(out_path: str | os.PathLike) -> tuple[dict[str, dict], int]:
    """Finished requests (id -> progress record) and the number of manifest lines dropped while repairing the
    manifest (module docstring). A progress line cut off by a crash is ignored; any other bad line is an error
    naming ``file:line``. A finished request whose examples are not all in the manifest (the file was edited) is
    not finished any more: its remaining lines are dropped and it is done again."""
    out, prog = Path(out_path), progress_path(out_path)
    progress_lines = _read_lines(prog)
    records: dict[str, dict] = {}
    for lineno, line, complete in progress_lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not (isinstance(rec, dict) and isinstance(rec.get("request"), str) and isinstance(rec.get("examples"),
                                                                                              list)):
            if not complete:
                continue  # cut off by a crash mid-write: that request is simply not finished
            raise ValueError(f"{prog}:{lineno}: not a progress record (expected {{\"request\": id, \"examples\": "
                             f"[...]}}); delete {prog} and {out} to start over")
        records[rec["request"]] = rec

    manifest: list[tuple[str | None, str]] = []
    manifest_lines = _read_lines(out)
    for _, line, complete in manifest_lines:
        try:
            ex_id = json.loads(line).get("id") if complete else None
        except (json.JSONDecodeError, AttributeError):
            ex_id = None
        manifest.append((ex_id if isinstance(ex_id, str) else None, line))
    present = {ex_id for ex_id, _ in manifest}
    records = {req: rec for req, rec in records.items() if all(e in present for e in rec["examples"])}
    wanted = {e for rec in records.values() for e in rec["examples"]}
    kept: list[str] = []
    for ex_id, line in manifest:
        if ex_id in wanted:
            kept.append(line)
            wanted.discard(ex_id)  # a repeated line is kept once
    dropped = len(manifest_lines) - len(kept)
    if dropped:
        _log.warning("%s: dropped %d line(s) of unfinished requests (a crash mid-run); they will be redone", out,
                     dropped)
        _write_lines_atomic(out, kept)
    if len(records) != len(progress_lines):
        _write_lines_atomic(prog, (json.dumps(rec, ensure_ascii=False) for rec in records.values()))
    return records, dropped


def _validated(examples: Sequence[dict[str, Any]],
               taken: set[str]) -> tuple[list[dict[str, Any]], collections.Counter]:
    """Examples that pass the manifest schema and have new ids; the others counted as rejected."""
    good, bad = [], collections.Counter()
    for ex in examples:
        try:
            example_from_dict(ex)
        except ValueError as e:
            bad["invalid_example"] += 1
            _log.warning("example %r rejected by the manifest schema: %s", ex.get("id"), e)
            continue
        if ex["id"] in taken:
            bad["duplicate_id"] += 1
            continue
        taken.add(ex["id"])
        good.append(ex)
    return good, bad


def _work(job: Job, endpoint: ChatEndpoint, temperature: float) -> tuple[str, Parsed]:
    """Runs in a worker thread: the request and the parse. A crashing parser is logged and counted, not raised, so
    one odd reply cannot end a long run."""
    reply = endpoint.complete(job.messages, temperature=temperature)
    try:
        return reply, job.parse(reply)
    except Exception:  # noqa: BLE001 - a parser bug must not end the run; the traceback is logged
        _log.exception("parsing the reply to %s crashed", job.id)
        return reply, Parsed([], {"parser_crash": 1})


def run_requests(jobs: Sequence[Job], endpoint: ChatEndpoint, out_path: str | os.PathLike, *,
                 temperature: float = 0.7, workers: int = 4, limit: int | None = None, progress: bool = True,
                 max_consecutive_failures: int = 10) -> RunSummary:
    """Run every job not finished yet, appending to ``out_path`` and its progress file (module docstring).

    ``limit``: at most this many new requests in this run (the rest count as not started). Raises
    ``EndpointRejected`` for a fatal rejection (bad key or URL), after recording what finished before it."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    ids = [job.id for job in jobs]
    if len(set(ids)) != len(ids):
        dup = next(i for i, n in collections.Counter(ids).items() if n > 1)
        raise ValueError(f"job ids must be unique; {dup!r} appears more than once")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    records, dropped = load_progress(out)
    taken = {ex_id for rec in records.values() for ex_id in rec["examples"]}
    summary = RunSummary(planned=len(jobs), dropped_on_repair=dropped)
    todo = [job for job in jobs if job.id not in records]
    summary.finished_before = len(jobs) - len(todo)
    if limit is not None:
        summary.not_started = max(len(todo) - limit, 0)
        todo = todo[:limit]
    calls_before = endpoint.calls
    examples_total = len(taken)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), disable=not progress, unit="req", desc=out.name)
    queue = iter(todo)
    in_flight: dict[Future, Job] = {}
    consecutive_failures = 0
    with out.open("a", encoding="utf-8") as manifest, progress_path(out).open("a", encoding="utf-8") as log, \
            ThreadPoolExecutor(max_workers=workers) as pool:

        def submit_next() -> None:
            job = next(queue, None)
            if job is not None:
                in_flight[pool.submit(_work, job, endpoint, temperature)] = job

        def record(rec: dict[str, Any], examples: Sequence[dict[str, Any]]) -> None:
            # examples first: a crash between the two writes leaves examples without a progress line, which the
            # next run drops (load_progress) and redoes
            if examples:
                manifest.write("".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples))
                manifest.flush()
            log.write(json.dumps(rec, ensure_ascii=False) + "\n")
            log.flush()

        try:
            # exactly `workers` in flight: memory stays flat, an interrupt or an early stop wastes no queued call,
            # and with one worker requests run strictly in order
            for _ in range(workers):
                submit_next()
            while in_flight:
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    job = in_flight.pop(future)
                    bar.update(1)
                    try:
                        reply, parsed = future.result()
                    except EndpointRejected as e:
                        if e.fatal:
                            summary.stopped = str(e)
                            raise
                        consecutive_failures = 0
                        reason = f"http_{e.status}"
                        summary.rejected[reason] += 1
                        summary.finished += 1
                        record({"request": job.id, "examples": [], "rejected": {reason: 1}, "error": str(e)}, [])
                    except EndpointUnavailable as e:
                        summary.failed += 1
                        consecutive_failures += 1
                        _log.warning("request %s failed: %s", job.id, e)
                        if consecutive_failures >= max_consecutive_failures and summary.stopped is None:
                            summary.stopped = (f"{consecutive_failures} requests in a row failed (last: {e.last}); "
                                               "the endpoint seems down: rerun to resume")
                    else:
                        consecutive_failures = 0
                        examples, invalid = _validated(parsed.examples, taken)
                        rejected = collections.Counter(parsed.rejected) + invalid
                        rec: dict[str, Any] = {"request": job.id, "examples": [ex["id"] for ex in examples],
                                               "rejected": dict(rejected)}
                        if rejected:
                            rec["reply"] = reply
                        record(rec, examples)
                        summary.finished += 1
                        summary.examples_written += len(examples)
                        summary.rejected.update(rejected)
                        examples_total += len(examples)
                    if summary.stopped is None:
                        submit_next()
                    bar.set_postfix(examples=summary.examples_written, rejected=sum(summary.rejected.values()),
                                    failed=summary.failed, refresh=False)
        finally:
            for future in in_flight:
                future.cancel()
            summary.not_started += sum(1 for _ in queue) + sum(f.cancelled() for f in in_flight)
            bar.close()
            summary.calls = endpoint.calls - calls_before
            summary.examples_total = examples_total
    return summary


# --------------------------------------------------------------------------------------------------------------------
# Command-line pieces shared by the builders
# --------------------------------------------------------------------------------------------------------------------


def add_endpoint_args(parser: argparse.ArgumentParser, *, temperature: float = 0.7) -> None:
    """The endpoint and run options every builder CLI takes (the API key comes from ``$OPENAI_API_KEY`` only, so
    it never shows in a process list or a shell history)."""
    g = parser.add_argument_group("endpoint and run")
    g.add_argument("--url", required=True, help="OpenAI-compatible server: base URL, .../v1, or .../chat/completions")
    g.add_argument("--model", required=True, help="model name sent to the endpoint (e.g. gpt-4)")
    g.add_argument("--out", required=True, help="output manifest (.jsonl); progress goes to OUT.progress.jsonl")
    g.add_argument("--temperature", type=float, default=temperature)
    g.add_argument("--workers", type=int, default=4, help="concurrent requests")
    g.add_argument("--requests-per-minute", type=float, default=None, help="rate limit (default: none)")
    g.add_argument("--limit", type=int, default=None, help="make at most this many new requests in this run")
    g.add_argument("--max-retries", type=int, default=5)
    g.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry, doubled each time")
    g.add_argument("--timeout", type=float, default=120, help="seconds per HTTP request")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def endpoint_from_args(args: argparse.Namespace) -> ChatEndpoint:
    return ChatEndpoint(args.url, args.model, max_retries=args.max_retries, backoff=args.backoff,
                        timeout=args.timeout, requests_per_minute=args.requests_per_minute)


def run_and_report(jobs: Sequence[Job], args: argparse.Namespace, title: str, preamble: str = "") -> int:
    """Run the jobs as the CLI options say, print the Markdown summary (after ``preamble``; both also written to
    ``OUT.report.md``) and return the exit status: 0 when every planned request is finished, 1 when some are left
    (limit, failures), 2 when the endpoint rejected the key or URL."""
    endpoint = endpoint_from_args(args)
    try:
        summary = run_requests(jobs, endpoint, args.out, temperature=args.temperature, workers=args.workers,
                               limit=args.limit, progress=not args.no_progress)
    except EndpointRejected as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = summary.markdown(title, preamble)
    print(report, end="")
    Path(args.out).with_name(Path(args.out).name + ".report.md").write_text(report, encoding="utf-8")
    return 0 if summary.finished_before + summary.finished == summary.planned else 1
