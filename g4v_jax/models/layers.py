"""Small building blocks shared by the vision tower, the abstractor and (later) the LLM.

Every parameter is an ``nnx.Param`` with ``logical_axes`` metadata, read by ``g4v_jax.sharding``. Parameters are
stored in ``param_dtype``; matmuls run in ``dtype`` (the compute dtype); LayerNorm statistics are always fp32, as in
mPLUG-Owl's ``LayerNormFp32`` and HF CLIP under autocast.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> jnp.dtype:
    return DTYPES[name]


def param(rngs: nnx.Rngs | None, init, shape: Sequence[int], axes: Sequence[str | None], dtype) -> nnx.Param:
    """A parameter with logical axis names. ``rngs=None`` uses a fixed key (shape-only builds, zeros/ones inits)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), dtype), logical_axes=tuple(axes))


normal_init = jax.nn.initializers.normal
zeros_init = jax.nn.initializers.zeros
ones_init = jax.nn.initializers.ones


class Dense(nnx.Module):
    """``y = x @ kernel + bias``; kernel (in, out) — the transpose of torch's ``nn.Linear.weight``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        axes: tuple[str, str],
        *,
        use_bias: bool = True,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.kernel = param(rngs, normal_init(init_std), (in_features, out_features), axes, param_dtype)
        self.bias = param(rngs, zeros_init, (out_features,), (axes[1],), param_dtype) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, computed in fp32 and cast back to the input dtype."""

    def __init__(self, features: int, *, eps: float, axis_name: str = "norm", param_dtype=jnp.float32):
        self.scale = param(None, ones_init, (features,), (axis_name,), param_dtype)
        self.bias = param(None, zeros_init, (features,), (axis_name,), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's activation: ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


def attention_implementation(name: str) -> str | None:
    """Map the config's ``attention_impl`` to ``jax.nn.dot_product_attention``'s ``implementation``.

    ``auto`` lets JAX pick (cuDNN on GPU where the dtype/shape allow, XLA elsewhere).
    """
    return None if name == "auto" else name


def multihead_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    key_mask: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Scaled dot-product attention, (B, Lq, H, Dh) x (B, Lk, H, Dh) -> (B, Lq, H, Dh).

    ``key_mask`` (B, Lk) bool: False keys are ignored. cuDNN needs fp16/bf16, so an fp32 call falls back to XLA.
    """
    if implementation == "cudnn" and q.dtype == jnp.float32:
        implementation = "xla"
    if implementation is None and q.dtype == jnp.float32:
        implementation = "xla"
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
