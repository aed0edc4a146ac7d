"""Training, one room: ``python -m g4v_jax.train`` (``run``: the run, ``fit``, the trainer), ``step`` (what trains,
the optimizer, the loss, the pure jitted step), ``checkpoint`` (orbax, the final model), ``metrics`` (metrics.jsonl,
TensorBoard, plots) and ``guards`` (signals, loss spikes, compile time).

    from g4v_jax.train import fit
    summary = fit(cfg)         # one stage of the recipe, as the command line runs it
"""

from g4v_jax.train.run import (Interrupted, TrainingError, build_trainer, check_run_fits, fit, main,
                               maybe_initialize_distributed)

__all__ = ["Interrupted", "TrainingError", "build_trainer", "check_run_fits", "fit", "main",
           "maybe_initialize_distributed"]
