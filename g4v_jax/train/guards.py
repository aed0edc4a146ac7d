"""What watches a training run from outside the step: a signal asks it to stop after the step (and checkpoint), a
loss spike stops it before it trains on nonsense, and compile time is told apart from step time.
"""

from __future__ import annotations

import collections
import signal
import sys
import threading

import jax
import numpy as np


class StopOnSignal:
    """The first SIGINT or SIGTERM (Ctrl-C, a cluster's preemption) asks the loop to stop after the current step,
    which then checkpoints and exits cleanly; the second gets the signal's default action and ends the process at
    once. Installed only in the main thread (Python delivers signals there)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._first) for s in self.SIGNALS}
        return self

    def _first(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        print(f"\n{self.received}: finishing this step, then saving a checkpoint (send it again to abort at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def requested(self) -> bool:
        """Whether any process got a signal: every host stops at the same step."""
        flag = self.received is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
        return flag


class LossSpikeGuard:
    """A loss far above its recent mean without being NaN: more than ``factor`` x the mean of the last ``window``
    steps and at least 1 nat above it (so that noise around a small loss is not a spike). Needs 3 steps of history."""

    def __init__(self, factor: float, window: int) -> None:
        self.factor = factor
        self.recent: collections.deque[float] = collections.deque(maxlen=window)

    def check(self, loss: float) -> str | None:
        """None when ``loss`` is in range (it joins the history), else a description of the spike."""
        if self.factor > 0 and len(self.recent) >= 3:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.factor * mean and loss > mean + 1.0:
                return (f"loss {loss:.4g} is {loss / mean:.1f} times its mean {mean:.4g} over the last "
                        f"{len(self.recent)} steps (train.loss_spike_factor={self.factor})")
        self.recent.append(loss)
        return None


class CompileTimer:
    """Seconds XLA spent tracing, lowering and compiling while open (JAX's monitoring events), so the first step's
    throughput can be reported without its compilation."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self) -> None:
        self.seconds = 0.0

    def _listen(self, event: str, duration: float, **_) -> None:
        if event in self.EVENTS:
            self.seconds += duration

    def __enter__(self) -> "CompileTimer":
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)
