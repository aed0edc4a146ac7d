"""Training: ``python -m g4v_jax.train --config configs/<name> [key=value ...]`` (paper §4, §5.1).

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
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from g4v_jax.config import Config, TrainConfig, dump_config, load_config
from g4v_jax.data.template import IGNORE_INDEX
from g4v_jax.models.gpt4video import build_model
from g4v_jax.models.lora import LoRAParam
from g4v_jax.sharding import batch_sharding, make_mesh, state_shardings
from g4v_jax.weights import load as load_model_dir
from g4v_jax.weights import load_model_config
from g4v_jax.weights import save_pretrained

log = logging.getLogger("g4v_jax.train")


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, no data); the message says where and what was kept."""


# ----------------------------------------------------------------------------------------------------------------------
# what trains
# ----------------------------------------------------------------------------------------------------------------------


def trainable_filter(stage: str, kind: str, train_vision_tower: bool = False) -> Callable[[tuple, Any], bool]:
    """NNX filter (path, variable) -> bool selecting the parameters a stage trains."""
    if stage == "stage2":
        return lambda path, x: isinstance(x, LoRAParam)
    if stage == "stage1":
        if kind != "gpt4video":
            raise ValueError(f"stage1 trains the abstractor of a gpt4video model, not a {kind!r} model")
        modules = ("abstractor", "vision_model") if train_vision_tower else ("abstractor",)
        return lambda path, x: isinstance(x, nnx.Param) and path[0] in modules
    prefix = "language_model" if kind == "gpt4video" else None  # full: the LLM's own weights
    return lambda path, x: (isinstance(x, nnx.Param) and not isinstance(x, LoRAParam)
                            and (prefix is None or path[0] == prefix))


def _is_decayed(path: tuple) -> bool:
    # weight decay on matrices that mix features only; never norms, biases, embeddings or learned tokens
    return str(path[-1]) in ("kernel", "lora_a", "lora_b")


def decay_mask(params: nnx.State) -> Any:
    return nnx.from_flat_state([(p, v.replace(_is_decayed(p))) for p, v in nnx.to_flat_state(params)])


# ----------------------------------------------------------------------------------------------------------------------
# optimizer and loss
# ----------------------------------------------------------------------------------------------------------------------


def learning_rate_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup then cosine decay to ``learning_rate * min_learning_rate_ratio``."""
    warmup = int(round(cfg.warmup_ratio * total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.min_learning_rate_ratio)


def make_optimizer(cfg: TrainConfig, total_steps: int, params: nnx.State) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.adam_b1, b2=cfg.adam_b2,
                        eps=cfg.adam_eps, weight_decay=cfg.weight_decay, mask=decay_mask(params))
    if cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
    return adamw


def answer_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token negative log-likelihoods over labelled positions, and their count.

    logits (B, L, V) predict token t+1 at position t; labels (B, L) are -100 outside AI answers.
    """
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    picked = jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return -(picked * valid).sum(), valid.sum()


# ----------------------------------------------------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------------------------------------------------


class TrainState(NamedTuple):
    step: jax.Array  # () int32
    params: nnx.State  # the trainable subset
    opt_state: Any


def split_micro_batches(batch: Mapping[str, np.ndarray], accum: int) -> dict[str, np.ndarray]:
    """(B, ...) -> (accum, B / accum, ...) for every array (videos travel with their rows)."""
    return {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in batch.items()}


MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "positions", "segment_ids", "videos", "frame_mask",
                "video_features")


def with_dropout_key(rest: nnx.State, key: jax.Array) -> nnx.State:
    """``rest`` with every dropout stream keyed by ``key`` (folded with the stream's index) and its counter at 0.

    A pure replacement of values: ``nnx.reseed`` would mutate Variables that belong to an outer trace.
    """
    leaves = []
    for i, (path, var) in enumerate(nnx.to_flat_state(rest)):
        if isinstance(var, nnx.RngKey):
            var = var.replace(jax.random.fold_in(key, i))
        elif isinstance(var, nnx.RngCount):
            var = var.replace(jnp.zeros_like(var.get_value()))
        leaves.append((path, var))
    return nnx.from_flat_state(leaves)


def make_train_step(graphdef, tx: optax.GradientTransformation, seed: int) -> Callable:
    """``step(state, frozen, rest, batch) -> (state, metrics)``; batch arrays are (accum, micro_B, ...)."""
    base_key = jax.random.key(seed)

    def micro_loss(params, frozen, rest, mb, key):
        model = nnx.merge(graphdef, params, frozen, with_dropout_key(rest, key))
        model.train()
        logits, _ = model(mb["input_ids"], videos=mb.get("videos"), frame_mask=mb.get("frame_mask"),
                          video_features=mb.get("video_features"), attention_mask=mb["attention_mask"],
                          positions=mb.get("positions"), segment_ids=mb.get("segment_ids"))
        return answer_nll(logits, mb["labels"])

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, frozen, rest, batch):
        step_key = jax.random.fold_in(base_key, state.step)

        def accumulate(carry, xs):
            grads, nll, count = carry
            i, mb = xs
            (mb_nll, mb_count), mb_grads = grad_fn(state.params, frozen, rest, mb, jax.random.fold_in(step_key, i))
            return (jax.tree.map(jnp.add, grads, mb_grads), nll + mb_nll, count + mb_count), None

        accum = batch["input_ids"].shape[0]
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, nll, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0), (jnp.arange(accum), batch))
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = nll / denom
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        # a non-finite step changes nothing, so the state the host stops with is the last good one
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = TrainState(state.step + jnp.where(finite, 1, 0), keep(new_params, state.params),
                               keep(opt_state, state.opt_state))
        metrics = {"loss": loss, "tokens": count, "grad_norm": optax.global_norm(grads), "finite": finite}
        return new_state, metrics

    return step


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
    step_fn: Callable = None

    @property
    def step(self) -> int:
        return int(self.state.step)

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state.params, self.frozen, self.rest)

    def global_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host-local batch (B_host, ...) -> global arrays (accum, B_global / accum, ...) sharded over the data axes."""
        accum = self.cfg.train.grad_accum_steps
        out = {}
        for k, v in split_micro_batches({k: v for k, v in host_batch.items() if k in MODEL_INPUTS}, accum).items():
            spec = PartitionSpec(None, *batch_sharding(self.mesh, v.ndim - 1).spec)
            sharding = NamedSharding(self.mesh, spec)
            global_shape = (v.shape[0], v.shape[1] * jax.process_count(), *v.shape[2:])
            out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
        return out

    def train_steps(self, batches: Iterator[Mapping[str, np.ndarray]], n: int) -> list[dict]:
        """Run ``n`` optimizer steps; returns host-side metrics per step. Raises TrainingError on a bad loss."""
        out = []
        for _ in range(n):
            host_batch = next(batches)
            batch = self.global_batch(host_batch)
            with jax.set_mesh(self.mesh):
                self.state, metrics = self.step_fn(self.state, self.frozen, self.rest, batch)
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not m["finite"]:
                ids = host_batch.get("example_ids")
                raise TrainingError(
                    f"non-finite loss/gradients at step {self.step + 1} (loss {m['loss']}); batch examples: "
                    f"{list(ids) if ids is not None else 'n/a'}. The update was not applied; the last good "
                    f"checkpoint is kept.")
            m["step"] = self.step
            out.append(m)
        return out


def _config_fields(tree: Any, prefix: str) -> dict[str, Any]:
    """{"model.vision.image_size": 224, ...}: the leaves of a config dataclass by dotted name."""
    if dataclasses.is_dataclass(tree):
        tree = dataclasses.asdict(tree)
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for name, sub in tree.items() for k, v in _config_fields(sub, f"{prefix}.{name}").items()}


def _initial_model(cfg: Config) -> nnx.Module:
    if cfg.train.init_from:
        # the run's compute settings apply on top of the loaded directory's own config
        m = cfg.model
        compute = [f"model.compute_dtype={m.compute_dtype}", f"model.attention_impl={m.attention_impl}",
                   f"model.remat={m.remat}"]
        # the final checkpoint is saved with the run's model section, so it must describe the loaded weights
        # (param_dtype may differ: weights are cast on load)
        loaded = _config_fields(load_model_config(cfg.train.init_from, compute).model, "model")
        differ = [f"{k}: {loaded[k]!r} in {cfg.train.init_from}, {v!r} in this run" for k, v in
                  _config_fields(m, "model").items() if k in loaded and loaded[k] != v and k != "model.param_dtype"]
        if differ:
            raise TrainingError("train.init_from's model config differs from this run's model section, so the "
                                "saved checkpoint would not load; make them agree:\n  " + "\n  ".join(differ))
        return load_model_dir(cfg.train.init_from, compute)
    return build_model(cfg.model, seed=cfg.train.seed)


def build_trainer(cfg: Config, total_steps: int, model: nnx.Module | None = None) -> Trainer:
    """Model, trainable split, optimizer and the jitted, sharded step for ``cfg``."""
    mesh = make_mesh(cfg.mesh)
    model = model if model is not None else _initial_model(cfg)
    kind = type(model).__name__
    kind = {"GPT4Video": "gpt4video", "VideoEncoder": "video_encoder", "LlamaForCausalLM": "llm"}[kind]
    trains = trainable_filter(cfg.train.stage, kind, cfg.train.train_vision_tower)
    graphdef, params, frozen, rest = nnx.split(model, trains, nnx.Param, ...)
    if not jax.tree.leaves(params):
        raise TrainingError(f"stage {cfg.train.stage!r} found nothing to train in this {kind} model "
                            "(stage2 needs LoRA adapters: model.lora.enabled=true)")
    tx = make_optimizer(cfg.train, total_steps, params)
    with jax.set_mesh(mesh):
        params = jax.device_put(params, state_shardings(params, mesh))
        frozen = jax.device_put(frozen, state_shardings(frozen, mesh))
        opt_state = jax.jit(tx.init)(params)
        opt_state = jax.device_put(opt_state, _opt_shardings(opt_state, mesh))
        rest = jax.device_put(rest, NamedSharding(mesh, PartitionSpec()))
    replicated = NamedSharding(mesh, PartitionSpec())
    # the counter starts on the mesh like the step's output, so the first call and every later one share one
    # compiled step (an unplaced counter compiled the step twice: ~7 s a stage on CPU)
    state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), replicated), params, opt_state)
    trainer = Trainer(cfg, mesh, graphdef, state, frozen, rest, tx, total_steps)
    shardings = TrainState(replicated, state_shardings(params, mesh), _opt_shardings(opt_state, mesh))
    trainer.step_fn = jax.jit(make_train_step(graphdef, tx, cfg.train.seed), donate_argnums=(0,),
                              out_shardings=(shardings, None))
    return trainer


def _opt_shardings(opt_state, mesh):
    """Optimizer moments mirror the params (same logical axes); scalars (counts) are replicated."""
    def one(x):
        if isinstance(x, nnx.Variable):
            return state_shardings(nnx.State({"v": x}), mesh)["v"]
        return NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(one, opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints, metrics
# ----------------------------------------------------------------------------------------------------------------------


def _flat(tree) -> dict[str, jax.Array]:
    # orbax stores a plain dict of arrays; the tree structure comes back from the live template on restore
    return {f"{i:06d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def _unflat(template, flat: Mapping[str, jax.Array]):
    leaves = [flat[f"{i:06d}"] for i in range(len(flat))]
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


class Checkpointer:
    """Orbax ``CheckpointManager``: async saves, keep-last-K, atomic (written to a temporary directory and renamed, so
    a crash mid-save leaves the previous checkpoint intact). Holds the train state and the data iterator's state."""

    def __init__(self, directory: str | Path, cfg: TrainConfig):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints,
                                               enable_async_checkpointing=cfg.async_checkpointing)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: Mapping | None) -> None:
        ocp = self._ocp
        args = {"state": ocp.args.StandardSave(_flat(state)), "data": ocp.args.JsonSave(dict(data_state or {}))}
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict | None]:
        """The checkpoint at ``step`` (default: latest) placed like ``template`` (same shardings)."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in _flat(template).items()}
        args = {"state": ocp.args.StandardRestore(target), "data": ocp.args.JsonRestore()}
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return _unflat(template, restored["state"]), (restored["data"] or None)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class MetricsWriter:
    """Per-step metrics as JSONL (``metrics.jsonl``, one object per step) and TensorBoard event files."""

    def __init__(self, directory: Path, tensorboard: bool):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "metrics.jsonl"
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(directory / "tensorboard"))

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


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl; a resumed run appends, so the last row of each step wins."""
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


def fit(cfg: Config, *, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train per ``cfg``; resumes from ``output_dir/checkpoints`` when a checkpoint is there. Returns a summary.

    ``stop_after`` ends this invocation after that many steps (with a checkpoint), as a preempted job would: running
    ``fit`` again continues the same run, schedule and data order included.
    """
    from tqdm.auto import tqdm

    from g4v_jax.data import pipeline
    from g4v_jax.data.manifest import read_manifest
    from g4v_jax.data.tokenizer import load_tokenizer

    maybe_initialize_distributed()
    t = cfg.train
    out = Path(t.output_dir)
    tok_dir = t.tokenizer or t.init_from
    if not tok_dir:
        raise TrainingError("no tokenizer: set train.tokenizer (or train.init_from to a directory that has one)")
    tokenizer = load_tokenizer(tok_dir)
    if not cfg.data.train_manifest:
        raise TrainingError("no training data: set data.train_manifest to a JSONL manifest (see README)")
    examples = read_manifest(cfg.data.train_manifest)
    data_cfg = pipeline_config(cfg)
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
    rows = (pipeline.packed_row_count(problems["lengths"], data_cfg.seq_len, per_host)
            if data_cfg.pack_sequences else usable)
    steps_per_epoch = rows // t.global_batch_size
    if steps_per_epoch == 0:
        raise TrainingError(f"{usable} usable examples are fewer than one global batch of {t.global_batch_size}")
    total = t.epochs * steps_per_epoch if t.max_steps <= 0 else min(t.max_steps, t.epochs * steps_per_epoch)

    trainer = build_trainer(cfg, total)
    if cfg.data.vision_cache and cfg.train.train_vision_tower:
        raise TrainingError("data.vision_cache holds features of a frozen vision tower; it cannot be used with "
                            "train.train_vision_tower=true")
    if cfg.data.vision_cache and data_cfg.use_videos:
        from g4v_jax.data.feature_cache import check_cache

        meta = check_cache(cfg.data.vision_cache, trainer.model().vision_model, num_frames=cfg.model.num_frames,
                           image_size=cfg.model.vision.image_size)
        data_cfg = dataclasses.replace(data_cfg, feature_shape=tuple(meta["feature_shape"]),
                                       feature_dtype=meta["dtype"])
    # epochs=None: the step count decides the end, so a host with more skipped examples never runs dry first
    dataset = pipeline.make_dataset(examples, tokenizer, data_cfg, per_host_batch=per_host, epochs=None,
                                    process_index=jax.process_index(), process_count=jax.process_count(),
                                    manifest_dir=manifest_dir)
    batches = pipeline.batch_iterator(dataset)
    ckpt = Checkpointer(out / "checkpoints", t)
    if ckpt.latest_step() is not None:
        trainer.state, data_state = ckpt.restore(trainer.state)
        if data_state is not None:
            batches.set_state(data_state)
        print(f"resumed from {out / 'checkpoints'} at step {trainer.step}")
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    writer = MetricsWriter(out, t.tensorboard) if jax.process_index() == 0 else None
    bar = tqdm(total=total, initial=trainer.step, desc=f"{t.stage}", unit="step",
               disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
    tokens_seen, t0 = 0, time.perf_counter()
    end = total if stop_after is None else min(total, trainer.step + stop_after)
    try:
        while trainer.step < end:
            step_start = time.perf_counter()
            (m,) = trainer.train_steps(batches, 1)
            tokens_seen += m["tokens"]
            m["tokens_per_s"] = m["tokens"] / max(time.perf_counter() - step_start, 1e-9)
            m["learning_rate"] = float(learning_rate_schedule(t, total)(m["step"] - 1))
            if writer is not None and (m["step"] % t.log_every == 0 or m["step"] == total):
                writer.write(m["step"], {k: v for k, v in m.items() if k not in ("step", "finite")})
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
            if m["step"] % t.save_every == 0 or m["step"] == end:
                ckpt.save(m["step"], trainer.state, batches.get_state())
    finally:
        bar.close()
        ckpt.close()
        if writer is not None:
            writer.close()
    summary = {"steps": trainer.step, "seconds": time.perf_counter() - t0, "tokens": tokens_seen,
               "skipped_in_training": dict(getattr(batches, "skipped", {}) or {})}
    if trainer.step < total:
        print(f"stopped at step {trainer.step} of {total}; run the same command again to continue")
        return summary
    if jax.process_index() == 0:
        final = save_pretrained(trainer.model(), cfg, out / "final")
        from convert.common import copy_tokenizer_files

        copy_tokenizer_files(tok_dir, final)
        summary["final"] = str(final)
        if t.plot and (out / "metrics.jsonl").is_file():
            summary["loss_curve"] = str(plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png",
                                                        f"{t.stage}: {cfg.data.train_manifest}"))
        print(f"done: {summary}")
    return summary


def pipeline_config(cfg: Config):
    """The data pipeline's settings, derived from the run's config (stage 2 replaces videos by captions)."""
    from g4v_jax.data.pipeline import DataConfig as PipelineConfig

    return PipelineConfig(
        train_manifest=cfg.data.train_manifest, seq_len=cfg.data.seq_len, num_frames=cfg.model.num_frames,
        image_size=cfg.model.vision.image_size, max_videos_per_example=cfg.data.max_videos_per_example,
        use_videos=cfg.train.stage == "stage1", num_video_tokens=cfg.model.num_video_tokens,
        system_prompt=cfg.data.system_prompt, worker_count=cfg.data.worker_count, shuffle=cfg.data.shuffle,
        seed=cfg.train.seed, on_bad_video=cfg.data.on_bad_video, on_too_long=cfg.data.on_too_long,
        vision_cache=cfg.data.vision_cache, pack_sequences=cfg.data.pack_sequences)


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a config file or a name under configs/")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.learning_rate=2e-5 mesh.fsdp=8")
    args = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        fit(load_config(args.config, args.overrides))
    except (TrainingError, FileNotFoundError, ValueError) as e:
        # user-facing problems (bad config, missing manifest, non-finite loss): a message, not a traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
