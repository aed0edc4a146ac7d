"""Training checkpoints: the train state and the data iterator's position, with orbax, so that a signal or a full
disk never costs finished work; and the final model directory, written whole or not at all.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

import jax
from flax import nnx

from g4v_jax.config import Config, TrainConfig
from g4v_jax.data.tokenizer import copy_tokenizer_files
from g4v_jax.weights import save_pretrained

log = logging.getLogger(__name__)


def _flat(tree) -> dict[str, jax.Array]:
    # orbax stores a plain dict of arrays; the tree structure comes back from the live template on restore
    return {f"{i:06d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def _unflat(template, flat: Mapping[str, jax.Array]):
    leaves = [flat[f"{i:06d}"] for i in range(len(flat))]
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (full disk, lost permissions); earlier checkpoints are intact."""


class Checkpointer:
    """Orbax ``CheckpointManager``: async saves, keep-last-K, atomic (written to a temporary directory and renamed, so
    a crash mid-save leaves the previous checkpoint intact). Holds the train state and the data iterator's state.

    A failed save (asynchronous or not) is raised as ``CheckpointSaveError`` by ``save``, ``poll`` or ``close``:
    one message naming the directory and the last complete checkpoint. Half-written temporary directories are
    removed when the manager opens, so a rerun starts from the last complete checkpoint.
    """

    def __init__(self, directory: str | Path, cfg: TrainConfig):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=cfg.async_checkpointing)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise CheckpointSaveError(f"cannot open the checkpoint directory {self.directory}: {reason(e)}") from None
        self._pending: int | None = None  # a save started and not yet known to be complete
        self.last_good = self.manager.latest_step()
        self._failed_once = False
        self._unraisablehook = sys.unraisablehook
        sys.unraisablehook = self._quiet_aborted_writes

    def _quiet_aborted_writes(self, unraisable) -> None:
        # After a failed asynchronous save, tensorstore still completes the aborted writes and calls back into the
        # asyncio loop that orbax has already closed; each RuntimeError lands here and would print a traceback. The
        # failure itself reaches the user once, as CheckpointSaveError.
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            log.debug("late callback of an aborted checkpoint write: %s", unraisable.exc_value)
            return
        self._unraisablehook(unraisable)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _failed(self, step: int, error: BaseException) -> CheckpointSaveError:
        self._pending, self._failed_once = None, True
        if jax.process_index() == 0:  # nothing half-written stays behind (orbax writes into <step>.orbax-...-tmp*)
            for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
        kept = (f"the last complete checkpoint is step {self.last_good} in {self.directory}" if self.last_good
                is not None else f"no complete checkpoint exists in {self.directory}")
        return CheckpointSaveError(f"saving the checkpoint of step {step} to {self.directory} failed "
                                   f"({reason(error)}); training stopped, {kept}. Free space (or fix the "
                                   f"directory) and run the same command again to resume.")

    def _complete(self, step: int) -> None:
        if not (self.directory / str(step)).is_dir() or step not in self.manager.all_steps():
            raise self._failed(step, RuntimeError("the checkpoint was not finalized"))
        self._pending, self.last_good = None, step

    def poll(self) -> None:
        """Raise if the pending asynchronous save has failed; note its step as complete when it has finished."""
        if self._pending is None or self.manager.is_saving_in_progress():
            return
        self.wait()

    def wait(self) -> None:
        step = self._pending
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # orbax raises whatever the storage layer raised (ValueError, OSError, ...)
            if step is None:
                raise
            raise self._failed(step, e) from None
        if step is not None:
            self._complete(step)

    def save(self, step: int, state: Any, data_state: Mapping | None) -> None:
        ocp = self._ocp
        self.poll()
        if self._pending is not None:
            self.wait()  # one save in flight at a time, so a failure is always attributed to its own step
        args = {"state": ocp.args.StandardSave(_flat(state)), "data": ocp.args.JsonSave(dict(data_state or {}))}
        self._pending = step
        try:
            self.manager.save(step, args=ocp.args.Composite(**args), force=True)
        except Exception as e:
            raise self._failed(step, e) from None
        if not self.manager.is_saving_in_progress():
            self.wait()

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict | None]:
        """The checkpoint at ``step`` (default: latest) placed like ``template`` (same shardings)."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in _flat(template).items()}
        args = {"state": ocp.args.StandardRestore(target), "data": ocp.args.JsonRestore()}
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return _unflat(template, restored["state"]), (restored["data"] or None)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # closing after a failed save may fail again; the failure was already raised
                log.debug("closing the checkpoint manager failed", exc_info=True)
            if not self._failed_once:  # after a failure, aborted writes may still call back until the process ends
                sys.unraisablehook = self._unraisablehook


def reason(error: BaseException) -> str:
    """The storage error in a few words: ``No space left on device``, not a 400-character tensorstore message."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error)
    for marker in ("No space left on device", "File too large", "Permission denied", "Read-only file system",
                   "Disk quota exceeded"):
        if marker.lower() in text.lower():
            return marker
    return text.splitlines()[0][:200] if text else type(error).__name__


def save_final(model: nnx.Module, cfg: Config, out: Path, tokenizer_dir: str) -> Path:
    """Write ``out/final`` whole or not at all: into a temporary sibling first, then renamed into place."""
    final = out / "final"
    tmp = out / f".final.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, cfg, tmp)
        copy_tokenizer_files(tokenizer_dir, tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(f"writing the final model to {final} failed ({reason(e)}); the last checkpoint "
                                  f"in {out / 'checkpoints'} is intact: free space and run the same command again "
                                  "to write it") from None
    return final
