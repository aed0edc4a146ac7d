"""Sequence packing for the text stages (``data.pack_sequences``): several examples share a row of ``seq_len``
tokens, first-fit within each batch, and each attends only to itself (``segment_ids``; the model's attention mask is
block-diagonal over them). ``packed_row_count`` tells the trainer, before any batch is read, how many rows an epoch
makes, so that every host agrees on the step count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from g4v_jax.config import DataConfig
from g4v_jax.data.template import IGNORE_INDEX

__all__ = ["collate_packed", "first_row_with_room", "packed_row_count", "token_arrays"]


def token_arrays(cfg: DataConfig) -> tuple[str, ...]:
    """The per-token (L,) arrays each example row brings to a batch (an attribute of that name on the row)."""
    return (("input_ids", "labels", "attention_mask", "positions") + (("adapter_mask",) if cfg.adapter_mask else ())
            + (("distill",) if cfg.distill else ()))


def collate_packed(bins: Sequence[Sequence[Any]], cfg: DataConfig, pad_id: int) -> dict[str, np.ndarray]:
    """One row per bin, its examples side by side: ``segment_ids`` 1, 2, ... (0 at pads), ``positions`` restarting
    at 0 in each segment, and no label on a segment's first token (so no position learns to predict across a
    border; an unpacked row's first label is never a target either)."""
    b, l = len(bins), cfg.seq_len
    batch = {"input_ids": np.full((b, l), pad_id, np.int32), "labels": np.full((b, l), IGNORE_INDEX, np.int32),
             "attention_mask": np.zeros((b, l), np.bool_), "positions": np.zeros((b, l), np.int32),
             "segment_ids": np.zeros((b, l), np.int32)}
    for name in ("adapter_mask", "distill"):
        if name in token_arrays(cfg):
            batch[name] = np.zeros((b, l), np.bool_)
    for i, rows in enumerate(bins):
        start = 0
        for k, r in enumerate(rows):
            n = int(r.attention_mask.sum())
            span = slice(start, start + n)
            for name in token_arrays(cfg):
                batch[name][i, span] = getattr(r, name)[:n]
            batch["labels"][i, start] = IGNORE_INDEX
            batch["segment_ids"][i, span] = k + 1
            start += n
    return batch


def first_row_with_room(used: Sequence[int], n: int, seq_len: int) -> int | None:
    """Index of the first row (``used``: tokens in each) that an ``n``-token example still fits, else None."""
    return next((k for k, u in enumerate(used) if u + n <= seq_len), None)


def packed_row_count(lengths: Sequence[int], seq_len: int, rows_per_batch: int) -> int:
    """Rows that the iterator's packing (first-fit within batches of ``rows_per_batch`` rows, module docstring)
    makes of examples of these token ``lengths``, taken in order."""
    rows, used = 0, []
    for n in lengths:
        room = first_row_with_room(used, n, seq_len)
        if room is not None:
            used[room] += n
            continue
        if len(used) == rows_per_batch:
            rows, used = rows + len(used), []
        used.append(n)
    return rows + len(used)
