"""What every evaluation writes: ``OUT/report.json`` (everything, per sample included) and ``OUT/report.md`` (a title,
the paper-style table, the notes a reader needs, the metric definitions).

Each evaluation is records -> answers -> scores -> report: ``data.io.read_records`` reads the records, the inference
layer answers them, the module scores them and builds the report dict, and ``write_report`` writes it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["data_line", "markdown_table", "write_report"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table: ``header`` and ``rows`` of cells (already formatted, or anything ``str`` renders)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def data_line(report: Mapping[str, Any], unit: str) -> str:
    """``Data: `path` (sha256 ...), N <unit>.`` from the report's ``data``, ``data_sha256`` and ``samples``."""
    return f"Data: `{report['data']}` (sha256 {report['data_sha256']}), {report['samples']} {unit}."


def write_report(report: Mapping[str, Any], out: str | os.PathLike, *, title: str, table: str,
                 before: Sequence[str] = (), after: Sequence[str] = ()) -> str:
    """Write ``out/report.json`` and ``out/report.md`` (``# title``, the ``before`` paragraphs, ``table``, the
    ``after`` paragraphs, then ``report["metric_definitions"]`` as a list); returns ``table``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    definitions = report.get("metric_definitions") or {}
    parts = [f"# {title}", *before, table, *after]
    if definitions:
        parts.append("\n".join(f"- **{k}**: {v}" for k, v in definitions.items()))
    (out / "report.md").write_text("\n\n".join(parts) + "\n")
    return table
