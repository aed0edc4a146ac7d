"""The training step as pure functions: what trains in each stage, the optimizer, the answer-token loss, and the
jitted step (micro-batches, dropout keys, the guard against non-finite or runaway updates). ``train.build_trainer``
jits ``make_train_step`` over the mesh; ``train.fit`` drives it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from g4v_jax.config import TrainConfig
from g4v_jax.data.template import IGNORE_INDEX
from g4v_jax.models.gpt4video import model_kind
from g4v_jax.models.lora import LoRAParam


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
    # the labels move left, not the logits: slicing (B, L, V) logits would copy them, and log-softmax would keep a
    # second (B, L, V) array alive for the backward pass; logsumexp minus the target's logit needs neither
    targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    valid = targets != IGNORE_INDEX
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return (nll * valid).sum(), valid.sum()


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


MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "positions", "segment_ids", "adapter_mask", "videos",
                "frame_mask", "video_features")


def with_dropout_key(rest: nnx.State, key: jax.Array) -> nnx.State:
    """``rest`` with every dropout stream keyed by ``key`` (folded with the stream's index) and its counter at 0.

    A pure replacement of values: ``nnx.reseed`` would mutate Variables that belong to an outer trace.
    """
    leaves = []
    for i, (path, var) in enumerate(nnx.to_flat_state(rest)):
        if isinstance(var, nnx.RngKey):  # a layer-stacked stream (scan_layers) gets one key per layer
            k = jax.random.fold_in(key, i)
            shape = var.get_value().shape
            var = var.replace(jax.random.split(k, shape) if shape else k)
        elif isinstance(var, nnx.RngCount):
            var = var.replace(jnp.zeros_like(var.get_value()))
        leaves.append((path, var))
    return nnx.from_flat_state(leaves)


def make_train_step(graphdef, tx: optax.GradientTransformation, seed: int, max_update_ratio: float = 0.0) -> Callable:
    """``step(state, frozen, rest, batch) -> (state, metrics)``; batch arrays are (accum, micro_B, ...).

    An update is applied only when the loss and gradients are finite and (``max_update_ratio`` > 0) the update's
    global norm is at most ``max_update_ratio`` times the trainable weights' norm; ``metrics["applied"]`` says which.
    """
    base_key = jax.random.key(seed)

    def micro_loss(params, frozen, rest, mb, key):
        model = nnx.merge(graphdef, params, frozen, with_dropout_key(rest, key))
        model.train()
        inputs = dict(attention_mask=mb["attention_mask"], positions=mb.get("positions"),
                      segment_ids=mb.get("segment_ids"), adapter_mask=mb.get("adapter_mask"))
        if model_kind(model) == "gpt4video":  # a plain LLM (LoRA-tuning LLaMA alone) takes no video inputs
            inputs.update(videos=mb.get("videos"), frame_mask=mb.get("frame_mask"),
                          video_features=mb.get("video_features"))
        logits, _ = model(mb["input_ids"], **inputs)
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
        weights_norm = optax.global_norm(state.params)
        update_ratio = jnp.where(weights_norm > 0, optax.global_norm(updates) / weights_norm, 0.0)
        applied = finite & ((max_update_ratio <= 0) | (update_ratio <= max_update_ratio))
        # a rejected step changes nothing, so the state the host stops with is the last good one
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(applied, a, b), new, old)
        new_state = TrainState(state.step + jnp.where(applied, 1, 0), keep(new_params, state.params),
                               keep(opt_state, state.opt_state))
        metrics = {"loss": loss, "tokens": count, "grad_norm": optax.global_norm(grads), "update_ratio": update_ratio,
                   "finite": finite, "applied": applied}
        return new_state, metrics

    return step
