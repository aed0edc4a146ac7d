"""The resumable request loop every dataset builder runs through an OpenAI-compatible endpoint
(``g4v_jax.endpoint.ChatEndpoint``): a thread pool, a rate limit, a progress bar, and progress appended to disk as it
goes so that a rerun resumes without repeating a call.

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
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from g4v_jax.data.manifest import example_from_dict
from g4v_jax.endpoint import ChatEndpoint, EndpointRejected, EndpointUnavailable

_log = logging.getLogger(__name__)

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
