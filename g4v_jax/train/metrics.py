"""Training metrics a person can plot: ``metrics.jsonl`` (one row per step) and TensorBoard events as a run goes,
``read_metrics`` and ``plot_loss_curve`` afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping


class MetricsWriter:
    """Per-step metrics as JSONL (``metrics.jsonl``, one object per step) and TensorBoard event files.

    ``resume_step``: a resumed run first drops the rows after the step it resumes from (steps it will train again),
    so the file keeps one row per step and a plot of it does not zigzag.
    """

    def __init__(self, directory: Path, tensorboard: bool, resume_step: int | None = None):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            _write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard drops the earlier files' events from the steps this run will train again
            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(str(directory / "tensorboard"), purge_step=purge)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl; if steps repeat (files written before resumes dropped them), the last row wins."""
    rows = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


def plot_loss_curve(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)
