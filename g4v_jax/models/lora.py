"""LoRA (Hu et al. 2021), as GPT4Video tunes its LLM (paper §3.3, §4.1) and as HF PEFT computes it:

    y = x W + dropout(x) A B · (alpha / r)        W (in, out) frozen; A (in, r), B (r, out) trainable; B = 0 at init

so a fresh adapter changes nothing. W may be bf16 while A and B stay fp32 (``LoraConfig.param_dtype``); the product
runs in the compute dtype. Adapter parameters are ``LoRAParam`` (an ``nnx.Param`` subclass), so the trainable subset
is ``nnx.split(model, LoRAParam, ...)`` and optimizer state exists only for them.

``merge`` folds the adapter into W (W + A B · alpha/r, computed in fp32 and rounded once to W's dtype) and makes the
layer skip the adapter path; ``unmerge`` subtracts the same fp32 product. With fp32 weights both are exact up to one
fp32 rounding; with bf16 weights a merge is as exact as bf16 allows (what PEFT's merge does too).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g4v_jax.config import LoraConfig
from g4v_jax.models.layers import dtype_of, named_variables, normal_init, param, variable_names, zeros_init


class LoRAParam(nnx.Param):
    """A trainable low-rank adapter matrix."""


def _kaiming_uniform_a(fan_in: int):
    # PEFT initialises A like torch's nn.Linear (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fan_in)
    return lambda rng, shape: rng.uniform(-bound, bound, shape).astype(np.float32)


class LoRALinear(nnx.Module):
    """A bias-free linear layer (LLaMA's projections) with an optional LoRA adapter."""

    def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], *, lora: LoraConfig | None,
                 param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = param(rngs, normal_init(0.02), (in_features, out_features), axes, param_dtype)
        self.dtype = dtype
        self.merged = False
        if lora is None:
            self.lora_a = self.lora_b = self.dropout = None
            return
        lora_dtype = dtype_of(lora.param_dtype)
        self.lora_a = param(rngs, _kaiming_uniform_a(in_features), (in_features, lora.rank), (axes[0], None),
                            lora_dtype, kind=LoRAParam)
        self.lora_b = param(rngs, zeros_init, (lora.rank, out_features), (None, axes[1]), lora_dtype, kind=LoRAParam)
        self.scaling = lora.scaling
        self.dropout = nnx.Dropout(lora.dropout, rngs=rngs) if lora.dropout > 0 else None

    def __call__(self, x: jax.Array, adapter_mask: jax.Array | None = None) -> jax.Array:
        """x (B, L, in) -> (B, L, out). ``adapter_mask`` (B, L) bool: the adapter applies only where True (the
        tokens after a video span under ``lora.skip_video_span``); None: everywhere."""
        x = x.astype(self.dtype)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype))
        if self.lora_a is None:
            return y
        if self.merged:
            if adapter_mask is not None:
                raise ValueError("a merged adapter applies to every token; unmerge it to mask tokens (adapter_mask)")
            return y
        h = self.dropout(x) if self.dropout is not None else x
        h = jnp.dot(jnp.dot(h, self.lora_a[...].astype(self.dtype)), self.lora_b[...].astype(self.dtype))
        h = h * self.scaling
        if adapter_mask is not None:
            h = jnp.where(adapter_mask[..., None], h, 0)
        return y + h.astype(y.dtype)

    def delta(self) -> jax.Array:
        """The adapter as a full matrix, A B · alpha/r, in fp32 (in, out), or (layers, in, out) when stacked."""
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * self.scaling


def named_lora_layers(model: nnx.Module) -> dict[str, LoRALinear]:
    """Every adapted layer by its dotted path."""
    return {".".join(map(str, p)): m for p, m in nnx.iter_graph(model)
            if isinstance(m, LoRALinear) and m.lora_a is not None}


def lora_layers(model: nnx.Module) -> list[LoRALinear]:
    return list(named_lora_layers(model).values())


def unmerged_kernels(model: nnx.Module) -> dict[str, jax.Array]:
    """``{"<path>.kernel": W}`` of the layers currently merged, with the adapter taken back out (what ``unmerge``
    would leave), without touching the model: checkpoints always store base weights and adapters apart."""
    out = {}
    for name, layer in named_lora_layers(model).items():
        if layer.merged:
            w = layer.kernel[...]
            w = (w.astype(jnp.float32) - layer.delta()).astype(w.dtype)
            names = variable_names((*name.split("."), "kernel"), layer.kernel)
            out.update(zip(names, [w] if len(names) == 1 else list(w)))
    return out


def merge(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its base kernel, in place; the adapter path is skipped until ``unmerge``."""
    for layer in lora_layers(model):
        if not layer.merged:
            w = layer.kernel[...]
            layer.kernel[...] = (w.astype(jnp.float32) + layer.delta()).astype(w.dtype)
            layer.merged = True
    return model


def unmerge(model: nnx.Module) -> nnx.Module:
    """Undo ``merge``, in place."""
    for layer in lora_layers(model):
        if layer.merged:
            w = layer.kernel[...]
            layer.kernel[...] = (w.astype(jnp.float32) - layer.delta()).astype(w.dtype)
            layer.merged = False
    return model


def fresh_lora_arrays(model: nnx.Module, seed: int = 0) -> dict[str, np.ndarray]:
    """Initial values of every adapter of ``model`` (abstract or concrete) by parameter name: A as PEFT draws it,
    B = 0. Converters use it to add adapters to base weights that never had any."""
    rng = np.random.default_rng(seed)
    _, state = nnx.split(model)
    adapters = [(name, var, layer) for name, var, layer in named_variables(state) if isinstance(var, LoRAParam)]
    out = {}
    # drawn in the unrolled model's layer order, so that scan_layers on or off gives the same adapters
    for name, var, layer in sorted(adapters, key=lambda a: _natural(a[0])):
        shape = tuple(var.get_value().shape)[0 if layer is None else 1:]
        out[name] = (np.zeros(shape, np.float32) if name.endswith("lora_b")
                     else _kaiming_uniform_a(shape[0])(rng, shape))
    return out


def _natural(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
