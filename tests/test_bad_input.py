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
TRAIN_CASES: list[Case] = [
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
