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


def answer_targets(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """labels (B, L) -> the token each position predicts (B, L) and whether it is an answer token (B, L) bool."""
    targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    return targets, targets != IGNORE_INDEX


def answer_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token negative log-likelihoods over labelled positions, and their count.

    logits (B, L, V) predict token t+1 at position t; labels (B, L) are -100 outside AI answers.
    """
    # the labels move left, not the logits: slicing (B, L, V) logits would copy them, and log-softmax would keep a
    # second (B, L, V) array alive for the backward pass; logsumexp minus the target's logit needs neither
    targets, valid = answer_targets(labels)
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return (nll * valid).sum(), valid.sum()


def distill_kl(logits: jax.Array, base_logits: jax.Array, distill: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum over ``distill`` positions of KL(base || tuned) between next-token distributions, and their count.

    logits, base_logits (B, L, V): the tuned model's and the untuned LLM's (adapters off) on the same tokens;
    distill (B, L) bool. The direction is the one that keeps the tuned model covering what the LLM would say
    (forward KL, as in distillation); it is zero exactly where the adapters change nothing."""
    log_p = jax.nn.log_softmax(base_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return (kl * distill).sum(), distill.sum()


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
                "frame_mask", "video_features", "distill")


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


def _forward(graphdef, params, frozen, rest, mb: Mapping[str, jax.Array], adapter_mask) -> jax.Array:
    """The training-mode logits (B, L, V) of micro-batch ``mb``, adapters acting where ``adapter_mask`` (None: as the
    model's config says)."""
    model = nnx.merge(graphdef, params, frozen, rest)
    model.train()
    inputs = dict(attention_mask=mb["attention_mask"], positions=mb.get("positions"),
                  segment_ids=mb.get("segment_ids"), adapter_mask=adapter_mask)
    if model_kind(model) == "gpt4video":  # a plain LLM (LoRA-tuning LLaMA alone) takes no video inputs
        inputs.update(videos=mb.get("videos"), frame_mask=mb.get("frame_mask"),
                      video_features=mb.get("video_features"))
    logits, _ = model(mb["input_ids"], **inputs)
    return logits


def distilling_rows_first(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch's rows (every array's axis 0) with those that distil first, in order otherwise: split into micro-
    batches, the distilling rows then share as few as possible, and only those pay for the teacher's forward pass.
    The step's objective is a sum over rows, so the order changes no figure."""
    if "distill" not in batch:
        return dict(batch)
    order = np.argsort(~batch["distill"].reshape(len(batch["distill"]), -1).any(axis=1), kind="stable")
    return {k: v[order] for k, v in batch.items()}


def make_train_step(graphdef, tx: optax.GradientTransformation, seed: int, max_update_ratio: float = 0.0,
                    distill_weight: float = 0.0) -> Callable:
    """``step(state, frozen, rest, batch) -> (state, metrics)``; batch arrays are (accum, micro_B, ...).

    ``distill_weight`` > 0 (stage 2 on a pretrained LLM; ``train.distill_weight``): tokens the batch's ``distill``
    (B, L) marks train toward the untuned LLM's own predictions, ``distill_kl`` with the adapters off, in place of
    their labels. The objective is then mean answer NLL + weight x mean KL, each a mean over its own tokens in the
    whole batch, so the rows that distil do not dilute what the others teach; ``metrics["loss"]`` is the answer NLL
    and ``metrics["distill_kl"]`` the KL.

    An update is applied only when the loss and gradients are finite and (``max_update_ratio`` > 0) the update's
    global norm is at most ``max_update_ratio`` times the trainable weights' norm; ``metrics["applied"]`` says which.
    """
    base_key = jax.random.key(seed)
    distills = distill_weight > 0

    def micro_loss(params, frozen, rest, mb, key, scales):
        """The micro-batch's objective to differentiate, and its sums (nll, answer tokens, kl, distilled tokens).
        Without distillation the objective is the NLL sum (the step divides by the batch's count); with it, each
        sum times ``scales``' (1 / answer tokens, weight / distilled tokens) of the whole batch."""
        rest = with_dropout_key(rest, key)
        logits = _forward(graphdef, params, frozen, rest, mb, mb.get("adapter_mask"))
        if not distills:
            nll, count = answer_nll(logits, mb["labels"])
            return nll, (nll, count, jnp.zeros(()), jnp.zeros((), jnp.int32))
        distill = mb["distill"]
        # the untuned LLM is this model with every adapter off; it is a fixed target, so nothing flows back into it.
        # Only a micro-batch with a distilling row pays for that second forward pass (the host puts those rows first)
        no_adapters = jnp.zeros_like(distill)
        base_logits = jax.lax.cond(
            distill.any(), lambda ops: jax.lax.stop_gradient(_forward(graphdef, *ops, mb, no_adapters)),
            lambda ops: jnp.zeros_like(logits), (params, frozen, rest))
        nll, count = answer_nll(logits, jnp.where(distill, IGNORE_INDEX, mb["labels"]))
        kl, kl_count = distill_kl(logits, jax.lax.stop_gradient(base_logits), distill)
        return nll * scales[0] + kl * scales[1], (nll, count, kl, kl_count)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, frozen, rest, batch):
        step_key = jax.random.fold_in(base_key, state.step)
        scales = (1.0, 0.0)
        if distills:  # each term's token count over the whole batch, before its micro-batches
            flat = lambda x: x.reshape(-1, x.shape[-1])
            _, answers = answer_targets(flat(jnp.where(batch["distill"], IGNORE_INDEX, batch["labels"])))
            scales = (1.0 / jnp.maximum(answers.sum(), 1), distill_weight / jnp.maximum(batch["distill"].sum(), 1))

        def accumulate(carry, xs):
            grads, sums = carry
            i, mb = xs
            (_, mb_sums), mb_grads = grad_fn(state.params, frozen, rest, mb, jax.random.fold_in(step_key, i), scales)
            return (jax.tree.map(jnp.add, grads, mb_grads), jax.tree.map(jnp.add, sums, mb_sums)), None

        accum = batch["input_ids"].shape[0]
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        sums0 = (jnp.zeros(()), jnp.zeros((), jnp.int32), jnp.zeros(()), jnp.zeros((), jnp.int32))
        (grads, (nll, count, kl, kl_count)), _ = jax.lax.scan(accumulate, (zeros, sums0), (jnp.arange(accum), batch))
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        if not distills:
            grads = jax.tree.map(lambda g: g / denom, grads)
        loss = nll / denom
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        grads_finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        finite = jnp.isfinite(loss) & jnp.isfinite(kl) & grads_finite
        weights_norm = optax.global_norm(state.params)
        update_ratio = jnp.where(weights_norm > 0, optax.global_norm(updates) / weights_norm, 0.0)
        applied = finite & ((max_update_ratio <= 0) | (update_ratio <= max_update_ratio))
        # a rejected step changes nothing, so the state the host stops with is the last good one
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(applied, a, b), new, old)
        new_state = TrainState(state.step + jnp.where(applied, 1, 0), keep(new_params, state.params),
                               keep(opt_state, state.opt_state))
        metrics = {"loss": loss, "tokens": count, "grad_norm": optax.global_norm(grads), "update_ratio": update_ratio,
                   "finite": finite, "applied": applied}
        if distills:
            metrics["distill_kl"] = kl / jnp.maximum(kl_count, 1).astype(jnp.float32)
            metrics["distill_tokens"] = kl_count
        return new_state, metrics

    return step
