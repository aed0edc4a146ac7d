"""Files the data, eval and world code all read and write: JSONL rows, video paths relative to their list, checksums.

One place for them, so that a JSONL reader everywhere skips blank lines, tolerates a byte-order mark and names
``file:line`` on a bad line, and every JSONL writer is atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["VIDEO_EXTENSIONS", "find_video", "iter_jsonl", "read_records", "record_id", "resolve_video_path",
           "sha256_of", "write_jsonl"]


def iter_jsonl(path: str | os.PathLike, error: type[Exception] = ValueError) -> Iterable[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line of a JSONL file; a line that is not JSON raises
    ``error`` naming ``file:line``. Shared by manifests and the chat CLI's request files."""
    # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first line's JSON
    with Path(path).open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def sha256_of(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes: reports record it so a figure can be traced to the exact data."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write ``rows`` as JSONL (UTF-8, one object per line), creating the parent directory; the file appears
    complete or not at all."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, p)  # atomic: a crash mid-write never leaves a truncated file behind


def resolve_video_path(video: str, manifest_dir: str | os.PathLike) -> str:
    """A manifest's video path on disk: absolute paths as they are, relative ones under ``manifest_dir``."""
    return video if os.path.isabs(video) else os.path.join(os.fspath(manifest_dir), video)


def read_records(path: str | os.PathLike, parse: Callable[[Mapping[str, Any], str, int], T], *,
                 error: type[Exception], kind: str, noun: str, keys: Collection[str] | None = None,
                 allow_empty: bool = False) -> list[T]:
    """``parse(raw, where, lineno)`` of every object of a JSONL file, in order: the loop every reader of ours shares.

    Checked here, each failure an ``error`` naming ``file:line``: the file exists (``"{kind} file ... not found"``);
    every non-blank line is a JSON object; no key outside ``keys`` (None: any); the records' ``id``s are unique
    (records without an ``id`` attribute are not compared); at least one record unless ``allow_empty``
    (``"{path}: no {noun}"``). ``parse`` checks the fields and raises ``error`` with ``where`` itself.
    """
    p = Path(path)
    if not p.is_file():
        raise error(f"{kind} file {str(p)!r} not found (or not a file)")
    allowed = None if keys is None else set(keys)
    records: list[T] = []
    first_line: dict[str, int] = {}
    for lineno, raw in iter_jsonl(p, error):
        where = f"{p}:{lineno}"
        if not isinstance(raw, Mapping):
            raise error(f"{where}: expected a JSON object, got {type(raw).__name__}")
        if allowed is not None:
            unknown = sorted(set(raw) - allowed)
            if unknown:
                raise error(f"{where}: unknown key(s) {unknown} (allowed: {', '.join(sorted(allowed))})")
        record = parse(raw, where, lineno)
        record_id = getattr(record, "id", None)
        if record_id is not None:
            if record_id in first_line:
                raise error(f"{where}: duplicate id {record_id!r} (first on line {first_line[record_id]})")
            first_line[record_id] = lineno
        records.append(record)
    if not records and not allow_empty:
        raise error(f"{p}: no {noun}")
    return records


def record_id(raw: Mapping[str, Any], lineno: int, where: str, error: type[Exception]) -> str:
    """A record's ``"id"`` (a non-empty string or an integer) as a str; the line number when there is none."""
    value = raw.get("id", lineno)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise error(f"{where}: \"id\" must be a non-empty string or an integer, got {value!r}")
    return str(value).strip()


VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")


def find_video(video_dir: Path, name: str) -> Path | None:
    """``video_dir/name``, or ``name`` with the first of ``VIDEO_EXTENSIONS`` that exists when it has none (the
    benchmarks' JSON files name videos without one); None when no such file exists."""
    candidates = [name] if Path(name).suffix.lower() in VIDEO_EXTENSIONS else [name + e for e in VIDEO_EXTENSIONS]
    for c in candidates:
        if (video_dir / c).is_file():
            return video_dir / c
    return None
