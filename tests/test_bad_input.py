"""The bad-input table: each row runs a real command's ``main`` on a bad input and checks what the user sees.

Every row must end in exit status 2 with exactly one line on stderr, ``<prog>: error: <message>``, where the message
matches the row's pattern (it names the field, file or tensor), and no traceback. Rows are grouped by area; each
area's builder makes its inputs under ``tmp_path`` and returns ``(main, argv)``.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Callable

import pytest


def _main(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name or "main")


# (id, builder(tmp_path) -> (main "module:function", argv), message pattern)
Case = tuple[str, Callable[[Path], tuple[str, list[str]]], str]

# ---- training configs (train.py / config.py / sharding.py) ----------------------------------------------------------
def _train(*overrides: str) -> Callable[[Path], tuple[str, list[str]]]:
    return lambda tmp: ("g4v_jax.train:main", ["--config", "tiny", f"train.output_dir={tmp / 'run'}", *overrides])


TRAIN_CASES: list[Case] = [
    ("train-batch-0", _train("train.global_batch_size=0"), r"train\.global_batch_size must be an integer >= 1, got 0"),
    ("train-save-every-0", _train("train.save_every=0"), r"train\.save_every must be an integer >= 1, got 0"),
    ("train-lr-negative", _train("train.learning_rate=-1"), r"train\.learning_rate must be a finite number > 0"),
    ("train-lr-nan", _train("train.learning_rate=.nan"), r"train\.learning_rate must be a finite number > 0, got nan"),
    ("train-seq-len-0", _train("data.seq_len=0"), r"data\.seq_len must be an integer >= 2"),
    ("train-mesh-0", _train("mesh.tensor=0"), r"mesh\.tensor must be >= 1 \(or -1"),
    ("train-mesh-uneven", _train("mesh.fsdp=3"), r"mesh\.fsdp=3 .*(do not divide the \d+ devices|needs 3 devices)"),
    ("train-unknown-key", _train("train.lerning_rate=1"), r"lerning_rate.*learning_rate"),
    ("train-stage", _train("train.stage=stage3"), r"train\.stage must be stage1, stage2 or full"),
    ("train-no-manifest", _train("train.tokenizer=/nonexistent/tok"), r"/nonexistent/tok"),
    ("train-init-from-missing", _train("train.init_from=/nonexistent/ckpt"), r"/nonexistent/ckpt"),
]

# ---- converters (convert/) -----------------------------------------------------------------------------------------
CONVERT_CASES: list[Case] = [
]

# ---- untrusted input: chat requests, manifests, endpoints (chat.py, data/) -----------------------------------------
INPUT_CASES: list[Case] = [
]

# ---- videos and preprocessing (data/video.py) ----------------------------------------------------------------------
VIDEO_CASES: list[Case] = [
]

CASES = TRAIN_CASES + CONVERT_CASES + INPUT_CASES + VIDEO_CASES


@pytest.mark.parametrize("build,pattern", [pytest.param(b, p, id=i) for i, b, p in CASES])
def test_bad_input(build, pattern, tmp_path, capsys):
    spec, argv = build(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        _main(spec)(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), f"{lines[0]!r} does not match {pattern!r}"
