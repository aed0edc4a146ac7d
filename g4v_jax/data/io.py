"""Files the data, eval and world code all read and write: JSONL rows, video paths relative to their list, checksums.

One place for them, so that a JSONL reader everywhere skips blank lines, tolerates a byte-order mark and names
``file:line`` on a bad line, and every JSONL writer is atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["iter_jsonl", "resolve_video_path", "sha256_of", "write_jsonl"]


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
