"""A stand-in for the engine's device programs, for tests of what surrounds the model (chat, batch, server): every
request "generates" a given token sequence, while the host loop, stop rules and streaming are the real engine's."""

from __future__ import annotations

import time

import numpy as np

from g4v_jax.inference import engine as engine_module


class ScriptedPrograms:
    """Stands in for the engine's device programs: every request "generates" ``ids`` (the host loop, stop rules and
    streaming are the real engine's)."""

    def __init__(self, ids: list[int], step_seconds: float = 0.0) -> None:
        self.ids, self.pos, self.traces, self.step_seconds = ids, {}, {}, step_seconds

    def encode(self, state, frames, mask):
        return np.zeros((frames.shape[0], 1, 1), np.float32)

    def extend(self, state, ds, ids, video_rows, video_flat, start, n, src, slot, *sampling):
        self.pos[int(slot)] = 0
        tokens = np.array(ds.tokens)
        tokens[int(slot)] = self.ids[0]
        return ds._replace(tokens=tokens)

    def step(self, state, ds, active):
        time.sleep(self.step_seconds)  # a model that takes its time: lets a test act mid-answer
        tokens = np.array(ds.tokens)
        for s in np.flatnonzero(np.asarray(active)):
            self.pos[s] = min(self.pos[s] + 1, len(self.ids) - 1)
            tokens[s] = self.ids[self.pos[s]]
        return ds._replace(tokens=tokens)


def script_engine(monkeypatch, ids: list[int], step_seconds: float = 0.0) -> None:
    """Every engine built while ``monkeypatch`` is active generates ``ids`` for every request (the last one
    repeated until the budget ends it), ``step_seconds`` per decode step."""
    monkeypatch.setattr(engine_module, "programs_for",
                        lambda graphdef, treedef: ScriptedPrograms(ids, step_seconds))
    monkeypatch.setattr(engine_module.Engine, "_prepare_videos", lambda self, admitted: None)
