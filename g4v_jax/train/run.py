"""The training run: ``python -m g4v_jax.train --config configs/<name> [key=value ...]`` (paper §4, §5.1).

One run trains one stage, chosen by ``train.stage``:

* ``stage1`` — the video abstractor (query/enhance tokens, layers, projection) on video–text data; vision tower and
  LLM frozen (paper: lr 1e-4, 2 epochs). ``train.train_vision_tower=true`` trains the vision tower too (for a model
  without a pretrained one, such as the synthetic world's).
* ``stage2`` — only the LoRA adapters, text only: every video is replaced by its caption in ``<video>…</video>``
  (paper: lr 2e-5, 3 epochs); no vision work is done.
* ``full`` — the LLM's own weights (full fine-tuning, or pre-training a small LLM from scratch).

Loss (paper eq. 4): next-token cross-entropy on AI-answer tokens only, averaged per token over the global batch
(micro-batches of gradient accumulation are summed first, then divided by the global token count).

The step is one ``jax.jit`` with explicit shardings (params, optimizer state and batch on the mesh of
``configs/mesh/*``), the train state donated. Only the trainable subset has gradients and optimizer state; the
frozen weights are a separate, non-donated argument. Dropout keys are a pure function of (seed, step, micro-batch),
so a resumed run draws the same masks as an uninterrupted one.

Checkpoints (orbax ``CheckpointManager``, async, keep-last-K, atomic) hold the trainable parameters, the optimizer
state, the step and the data iterator's state; frozen weights come back from ``train.init_from`` (or the same seeded
random init). At the end the whole model is written as a g4v_jax model directory (``output_dir/final``) that
``g4v_jax.load`` and ``convert.export_hf`` read.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm
from jax.sharding import NamedSharding, PartitionSpec

from g4v_jax.train.checkpoint import Checkpointer, CheckpointSaveError, reason, save_final
from g4v_jax.cli import fail, setup_logging
from g4v_jax.config import Config, ConfigError, DataConfig, dump_config, load_config
from g4v_jax.data import pipeline
from g4v_jax.data.feature_cache import check_cache
from g4v_jax.data.manifest import read_manifest
from g4v_jax.data.packing import packed_row_count
from g4v_jax.data.tokenizer import load_tokenizer
from g4v_jax.train.metrics import MetricsWriter, plot_loss_curve
from g4v_jax.train.guards import CompileTimer, LossSpikeGuard, StopOnSignal
from g4v_jax.models.gpt4video import build_model, model_kind
from g4v_jax.train.step import (MODEL_INPUTS, TrainState, distilling_rows_first, learning_rate_schedule, make_optimizer,
                          make_train_step, split_micro_batches, trainable_filter)
from g4v_jax.sharding import axis_rules, batch_sharding, check_batch_fits_mesh, make_mesh, state_shardings
from g4v_jax.weights import load as load_model_dir
from g4v_jax.weights import assign_params, load_model_config, named_params

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, divergence, no data, a failed save); the message says where and
    what was kept."""


class Interrupted(Exception):
    """The run stopped on SIGINT/SIGTERM after checkpointing its last finished step; the message says how to resume."""


# ----------------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trainer:
    """Everything a run holds; ``fit`` drives it. Tests build one and call ``train_steps`` directly."""

    cfg: Config
    mesh: jax.sharding.Mesh
    graphdef: Any
    state: TrainState
    frozen: nnx.State
    rest: nnx.State
    tx: optax.GradientTransformation
    total_steps: int
    step_fn: Callable  # jitted (state, frozen, rest, batch) -> (state, metrics); the state is donated

    @property
    def step(self) -> int:
        return int(self.state.step)

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state.params, self.frozen, self.rest)

    def global_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host-local batch (B_host, ...) -> global arrays (accum, B_global / accum, ...) sharded over the data axes."""
        accum = self.cfg.train.grad_accum_steps
        rows = {k: v for k, v in host_batch.items() if k in MODEL_INPUTS}
        if self.cfg.train.distill_weight > 0:
            rows = distilling_rows_first(rows)
        out = {}
        for k, v in split_micro_batches(rows, accum).items():
            spec = PartitionSpec(None, *batch_sharding(self.mesh, v.ndim - 1, axis_rules(self.cfg.mesh)).spec)
            sharding = NamedSharding(self.mesh, spec)
            global_shape = (v.shape[0], v.shape[1] * jax.process_count(), *v.shape[2:])
            out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
        return out

    def train_steps(self, batches: Iterator[Mapping[str, np.ndarray]], n: int) -> list[dict]:
        """Run ``n`` optimizer steps; returns host-side metrics per step. Raises TrainingError on a rejected step
        (non-finite loss or gradients, an update far larger than the weights)."""
        out = []
        for _ in range(n):
            host_batch = next(batches)
            batch = self.global_batch(host_batch)
            with jax.set_mesh(self.mesh):
                self.state, metrics = self.step_fn(self.state, self.frozen, self.rest, batch)
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not m["applied"]:
                examples = batch_examples(batches, host_batch)
                if not m["finite"]:
                    what = f"non-finite loss/gradients at step {self.step + 1} (loss {m['loss']})"
                else:
                    what = (f"the update at step {self.step + 1} is {m['update_ratio']:.3g} times the norm of the "
                            f"trained weights (train.max_update_ratio={self.cfg.train.max_update_ratio}): the run is "
                            f"diverging; lower train.learning_rate (now {self.cfg.train.learning_rate})")
                raise TrainingError(f"{what}; batch examples: {examples}. The update was not applied.")
            m["step"] = self.step
            out.append(m)
        return out


def batch_examples(batches: Any, host_batch: Mapping[str, Any]) -> list[str] | str:
    """The example ids of the batch just taken from ``batches`` (the data iterator records them)."""
    ids = getattr(batches, "last_example_ids", None) or host_batch.get("example_ids")
    return list(ids) if ids is not None and len(ids) else "unknown (the batch iterator does not record ids)"


def _config_fields(tree: Any, prefix: str) -> dict[str, Any]:
    """{"model.vision.image_size": 224, ...}: the leaves of a config dataclass by dotted name."""
    if dataclasses.is_dataclass(tree):
        tree = dataclasses.asdict(tree)
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for name, sub in tree.items() for k, v in _config_fields(sub, f"{prefix}.{name}").items()}


def _initial_model(cfg: Config) -> nnx.Module:
    if cfg.train.init_from:
        # the run's compute settings apply on top of the loaded directory's own config, and so does where the
        # adapters act (stage 2 may skip the video span over a stage-1 directory; its checkpoint then records it)
        m = cfg.model
        compute = [f"model.compute_dtype={m.compute_dtype}", f"model.attention_impl={m.attention_impl}",
                   f"model.remat={m.remat}", f"model.scan_layers={str(m.scan_layers).lower()}",
                   f"model.lora.skip_video_span={str(m.lora.skip_video_span).lower()}"]
        # the final checkpoint is saved with the run's model section, so it must describe the loaded weights
        # (param_dtype may differ: weights are cast on load)
        loaded = _config_fields(load_model_config(cfg.train.init_from, compute).model, "model")
        differ = {k: f"{k}: {loaded[k]!r} in {cfg.train.init_from}, {v!r} in this run" for k, v in
                  _config_fields(m, "model").items() if k in loaded and loaded[k] != v and k != "model.param_dtype"}
        if set(differ) - set(ADAPTER_LAYOUT):
            raise TrainingError("train.init_from's model config differs from this run's model section, so the "
                                "saved checkpoint would not load; make them agree (to train a directory made by a "
                                f"converter, pass its own config: --config {cfg.train.init_from}/config.yaml "
                                "train=train/stage1.yaml ...):\n  " + "\n  ".join(differ.values()))
        model = load_model_dir(cfg.train.init_from, compute)
        return _with_fresh_adapters(model, cfg, list(differ.values())) if differ else model
    return build_model(cfg.model, seed=cfg.train.seed)


# The adapters' shape and place: a run may set them anew over a directory whose adapters were never trained (a
# converted or assembled model, a stage-1 checkpoint), as stage 2's LoRA is a choice of stage 2 alone.
ADAPTER_LAYOUT = ("model.lora.rank", "model.lora.alpha", "model.lora.dropout", "model.lora.targets")


def _with_fresh_adapters(loaded: nnx.Module, cfg: Config, differ: list[str]) -> nnx.Module:
    """The run's model (``cfg.model``'s adapter layout, adapters initialised from ``cfg.train.seed``) with every other
    weight taken from ``loaded``. Refused when ``loaded``'s adapters are trained (any ``lora_b`` non-zero): a new
    layout would silently drop them."""
    weights = named_params(loaded)
    trained = [name for name, w in weights.items() if name.endswith(".lora_b") and np.any(np.asarray(w))]
    if trained:
        raise TrainingError(f"train.init_from {cfg.train.init_from} has trained LoRA adapters ({len(trained)} "
                            f"non-zero, e.g. {trained[0]}), and this run's adapters are laid out differently, so "
                            "they would be dropped; keep the directory's layout:\n  " + "\n  ".join(differ))
    fresh = build_model(cfg.model, seed=cfg.train.seed)
    arrays = {name: w for name, w in named_params(fresh).items() if _is_adapter(name)}
    arrays.update((name, w) for name, w in weights.items() if not _is_adapter(name))
    log.info("train.init_from %s: adapters laid out anew (%s)", cfg.train.init_from, "; ".join(differ))
    return assign_params(fresh, arrays, str(cfg.train.init_from))


def _is_adapter(name: str) -> bool:
    return name.endswith((".lora_a", ".lora_b"))


def build_trainer(cfg: Config, total_steps: int, model: nnx.Module | None = None) -> Trainer:
    """Model, trainable split, optimizer and the jitted, sharded step for ``cfg``."""
    mesh, rules = make_mesh(cfg.mesh), axis_rules(cfg.mesh)
    model = model if model is not None else _initial_model(cfg)
    kind = model_kind(model)
    trains = trainable_filter(cfg.train.stage, kind, cfg.train.train_vision_tower)
    graphdef, params, frozen, rest = nnx.split(model, trains, nnx.Param, ...)
    if not jax.tree.leaves(params):
        raise TrainingError(f"stage {cfg.train.stage!r} found nothing to train in this {kind} model "
                            "(stage2 needs LoRA adapters: model.lora.enabled=true)")
    tx = make_optimizer(cfg.train, total_steps, params)
    with jax.set_mesh(mesh):
        params = jax.device_put(params, state_shardings(params, mesh, rules))
        frozen = jax.device_put(frozen, state_shardings(frozen, mesh, rules))
        opt_state = jax.jit(tx.init)(params)
        opt_state = jax.device_put(opt_state, _opt_shardings(opt_state, mesh, rules))
        rest = jax.device_put(rest, NamedSharding(mesh, PartitionSpec()))
    replicated = NamedSharding(mesh, PartitionSpec())
    # the counter starts on the mesh like the step's output, so the first call and every later one share one
    # compiled step (an unplaced counter compiled the step twice: ~7 s a stage on CPU)
    state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), replicated), params, opt_state)
    shardings = TrainState(replicated, state_shardings(params, mesh, rules), _opt_shardings(opt_state, mesh, rules))
    step_fn = jax.jit(make_train_step(graphdef, tx, cfg.train.seed, cfg.train.max_update_ratio,
                                      cfg.train.distill_weight),
                      donate_argnums=(0,), out_shardings=(shardings, None))
    return Trainer(cfg, mesh, graphdef, state, frozen, rest, tx, total_steps, step_fn)


def _opt_shardings(opt_state, mesh, rules):
    """Optimizer moments mirror the params (same logical axes); scalars (counts) are replicated."""
    def one(x):
        if isinstance(x, nnx.Variable):
            return state_shardings(nnx.State({"v": x}), mesh, rules)["v"]
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(one, opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ----------------------------------------------------------------------------------------------------------------------
# storage
# ----------------------------------------------------------------------------------------------------------------------


def check_output_dir(out: Path) -> None:
    """Fail before any work when ``train.output_dir`` cannot be written (read-only, no permission, a file)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise TrainingError(f"train.output_dir {out} is not writable ({reason(e)}); choose another directory or "
                            "fix its permissions") from None


# ----------------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------------


def maybe_initialize_distributed() -> None:
    """Join JAX's multi-controller runtime when this is one process of several.

    Under SLURM (``SLURM_NTASKS`` > 1) ``jax.distributed.initialize()`` finds everything itself; elsewhere set
    ``G4V_COORDINATOR`` (host:port), ``G4V_NUM_PROCESSES`` and ``G4V_PROCESS_ID`` on every host.
    """
    if os.environ.get("G4V_COORDINATOR"):
        jax.distributed.initialize(coordinator_address=os.environ["G4V_COORDINATOR"],
                                   num_processes=int(os.environ["G4V_NUM_PROCESSES"]),
                                   process_id=int(os.environ["G4V_PROCESS_ID"]))
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


def check_run_fits(cfg: Config, mesh: jax.sharding.Mesh, hosts: int | None = None) -> None:
    """Config checks that need the process count and the mesh, made before anything is loaded."""
    t = cfg.train
    hosts = jax.process_count() if hosts is None else hosts
    micro = t.global_batch_size // t.grad_accum_steps
    if micro % hosts:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} over train.grad_accum_steps="
                          f"{t.grad_accum_steps} gives {micro} rows per micro-batch, which {hosts} processes cannot "
                          f"share evenly; make it a multiple of {hosts}")
    check_batch_fits_mesh(mesh, micro, f"train.global_batch_size / train.grad_accum_steps = {t.global_batch_size} / "
                                       f"{t.grad_accum_steps}")


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a run reads before it builds anything: the tokenizer, the examples, the pipeline's settings, and the
    step count (the same on every host)."""

    tokenizer: Any
    tokenizer_dir: str
    examples: list
    data: DataConfig
    manifest_dir: Path
    per_host_batch: int
    total_steps: int


def plan_run(cfg: Config) -> RunPlan:
    """The tokenizer and data of ``cfg``, checked, and how many steps the run takes; ``TrainingError`` names what is
    missing or too small."""
    t = cfg.train
    if t.init_from and not Path(t.init_from).is_dir():
        raise TrainingError(f"train.init_from {t.init_from}: no such directory")
    tok_dir = t.tokenizer or t.init_from
    if not tok_dir:
        raise TrainingError("no tokenizer: set train.tokenizer (or train.init_from to a directory that has one)")
    try:
        tokenizer = load_tokenizer(tok_dir)
    except (OSError, ValueError) as e:
        raise TrainingError(f"{'train.tokenizer' if t.tokenizer else 'train.init_from'} (the tokenizer): {e}") from None
    if not cfg.data.train_manifest:
        raise TrainingError("no training data: set data.train_manifest to a JSONL manifest (see README)")
    examples = read_manifest(cfg.data.train_manifest)
    data_cfg = pipeline.pipeline_config(cfg)
    manifest_dir = Path(cfg.data.train_manifest).parent
    # every host needs the same step count; decoding every video on every host would not scale, so several hosts
    # count text problems only (unreadable videos are still skipped and counted during training)
    problems = pipeline.count_problems(examples, tokenizer, data_cfg, manifest_dir=manifest_dir,
                                       check_videos=jax.process_count() == 1)
    usable = problems["ok"]
    if jax.process_index() == 0:
        print(f"{cfg.data.train_manifest}: {pipeline.describe_problems(problems)}")
    # a packed row holds several examples, so an epoch is as many rows as the iterator's packing makes of them
    per_host = t.global_batch_size // jax.process_count()
    rows = (packed_row_count(problems["lengths"], data_cfg.seq_len, per_host)
            if data_cfg.pack_sequences else usable)
    steps_per_epoch = rows // t.global_batch_size
    if steps_per_epoch == 0:
        raise TrainingError(f"{usable} usable examples are fewer than one global batch of {t.global_batch_size}")
    total = t.epochs * steps_per_epoch if t.max_steps <= 0 else min(t.max_steps, t.epochs * steps_per_epoch)
    return RunPlan(tokenizer, tok_dir, examples, data_cfg, manifest_dir, per_host, total)


def fit(cfg: Config, *, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train per ``cfg``; resumes from ``output_dir/checkpoints`` when a checkpoint is there. Returns a summary.

    ``stop_after`` ends this invocation after that many steps (with a checkpoint), as a preempted job would: running
    ``fit`` again continues the same run, schedule and data order included. A SIGINT/SIGTERM does the same after the
    current step and raises ``Interrupted``. A failed save raises ``CheckpointSaveError``; a non-finite or diverging
    step raises ``TrainingError`` without saving it.
    """
    maybe_initialize_distributed()
    t = cfg.train
    out = Path(t.output_dir)
    check_output_dir(out)
    check_run_fits(cfg, make_mesh(cfg.mesh))
    plan = plan_run(cfg)
    data_cfg, total, tok_dir = plan.data, plan.total_steps, plan.tokenizer_dir

    trainer = build_trainer(cfg, total)
    if cfg.data.vision_cache and cfg.train.train_vision_tower:
        raise TrainingError("data.vision_cache holds features of a frozen vision tower; it cannot be used with "
                            "train.train_vision_tower=true")
    if cfg.data.vision_cache and data_cfg.use_videos:
        meta = check_cache(cfg.data.vision_cache, trainer.model().vision_model, num_frames=cfg.model.num_frames,
                           image_size=cfg.model.vision.image_size)
        data_cfg = dataclasses.replace(data_cfg, feature_shape=tuple(meta["feature_shape"]),
                                       feature_dtype=meta["dtype"])
    # epochs=None: the step count decides the end, so a host with more skipped examples never runs dry first
    dataset = pipeline.make_dataset(plan.examples, plan.tokenizer, data_cfg, per_host_batch=plan.per_host_batch,
                                    epochs=None, process_index=jax.process_index(),
                                    process_count=jax.process_count(), manifest_dir=plan.manifest_dir)
    batches = pipeline.batch_iterator(dataset)
    ckpt = Checkpointer(out / "checkpoints", t)
    resumed = ckpt.latest_step() is not None
    if resumed:
        trainer.state, data_state = ckpt.restore(trainer.state)
        if data_state is not None:
            batches.set_state(data_state)
        print(f"resumed from {out / 'checkpoints'} at step {trainer.step}")
    if jax.process_index() == 0:
        dump_config(cfg, out / "config.yaml")
    # rows after the resumed step (or any, on a fresh start) are from steps that will be trained again
    writer = MetricsWriter(out, t.tensorboard, resume_step=trainer.step) if jax.process_index() == 0 else None
    bar = tqdm(total=total, initial=trainer.step, desc=f"{t.stage}", unit="step",
               disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
    spike = LossSpikeGuard(t.loss_spike_factor, t.loss_spike_window)
    tokens_seen, t0, compile_s, first = 0, time.perf_counter(), 0.0, True
    end = total if stop_after is None else min(total, trainer.step + stop_after)
    interrupted = None
    try:
        with StopOnSignal() as stop:
            while trainer.step < end:
                step_start = time.perf_counter()
                with CompileTimer() as compiling:
                    (m,) = trainer.train_steps(batches, 1)
                elapsed = time.perf_counter() - step_start
                if first and compiling.seconds > 0:
                    compile_s, first = compiling.seconds, False
                    bar.write(f"compiled the train step in {compile_s:.1f} s")
                m["step_seconds"] = max(elapsed - compiling.seconds, 1e-9)
                m["tokens_per_s"] = m["tokens"] / m["step_seconds"]
                tokens_seen += m["tokens"]
                m["learning_rate"] = float(learning_rate_schedule(t, total)(m["step"] - 1))
                problem = spike.check(m["loss"])
                if problem:
                    raise TrainingError(
                        f"the run is diverging at step {m['step']}: {problem}; batch examples: "
                        f"{batch_examples(batches, {})}. Stopped without saving this step; the last checkpoint "
                        f"is step {ckpt.last_good} in {out / 'checkpoints'}. Lower train.learning_rate (now "
                        f"{t.learning_rate}) or set train.loss_spike_factor=0 to train on.")
                if writer is not None and (m["step"] % t.log_every == 0 or m["step"] == total):
                    writer.write(m["step"], {k: v for k, v in m.items() if k not in ("step", "finite", "applied")})
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
                stopping = stop.requested()
                if m["step"] % t.save_every == 0 or m["step"] == end or stopping:
                    ckpt.save(m["step"], trainer.state, batches.get_state())
                else:
                    ckpt.poll()
                if stopping:
                    ckpt.wait()
                    interrupted = stop.received or "a signal on another process"
                    break
    finally:
        bar.close()
        try:
            ckpt.close()
        finally:
            if writer is not None:
                writer.close()
    summary = {"steps": trainer.step, "seconds": time.perf_counter() - t0, "compile_seconds": compile_s,
               "tokens": tokens_seen, "skipped_in_training": dict(getattr(batches, "skipped", {}) or {})}
    if interrupted:
        raise Interrupted(f"{interrupted}: stopped at step {trainer.step} of {total} with a checkpoint in "
                          f"{out / 'checkpoints'}; run the same command again to resume")
    if trainer.step < total:
        print(f"stopped at step {trainer.step} of {total}; run the same command again to continue")
        return summary
    if jax.process_index() == 0:
        summary["final"] = str(save_final(trainer.model(), cfg, out, tok_dir))
        if t.plot and (out / "metrics.jsonl").is_file():
            summary["loss_curve"] = str(plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png",
                                                        f"{t.stage}: {cfg.data.train_manifest}"))
        print(f"done: {summary}")
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m g4v_jax.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a config file or a name under configs/")
    ap.add_argument("--verbose", "-v", action="store_true", help="also show the libraries' logs (orbax, jax, absl)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.learning_rate=2e-5 mesh.fsdp=8")
    args = ap.parse_intermixed_args(argv)
    setup_logging(args.verbose)
    try:
        fit(load_config(args.config, args.overrides))
    except Interrupted as e:
        print(e, file=sys.stderr, flush=True)  # a clean stop: exit status 0
    except KeyboardInterrupt:
        print("interrupted before the first step; nothing to save", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except (TrainingError, CheckpointSaveError, ValueError, OSError) as e:
        # user-facing problems (bad config, missing manifest, diverging loss, a failed save): a message, no traceback
        fail("g4v_jax.train", str(e))
