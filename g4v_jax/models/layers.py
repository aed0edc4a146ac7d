"""Small building blocks shared by the vision tower, the abstractor and (later) the LLM.

Every parameter is an ``nnx.Param`` with ``logical_axes`` metadata, read by ``g4v_jax.sharding``. Parameters are
stored in ``param_dtype``; matmuls run in ``dtype`` (the compute dtype); LayerNorm statistics are always fp32, as in
mPLUG-Owl's ``LayerNormFp32`` and HF CLIP under autocast.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> jnp.dtype:
    return DTYPES[name]


def _host_rng(rngs: nnx.Rngs | None) -> np.random.Generator | None:
    """A NumPy generator seeded from the next ``params`` key; None while tracing (``nnx.eval_shape``)."""
    if rngs is None:
        return np.random.default_rng(0)
    key = rngs.params()
    if isinstance(key, jax.core.Tracer):
        return None
    return np.random.default_rng(np.asarray(jax.random.key_data(key)))


def param(rngs: nnx.Rngs | None, init, shape: Sequence[int], axes: Sequence[str | None], dtype,
          kind: type[nnx.Param] = nnx.Param) -> nnx.Param:
    """A parameter with logical axis names, initialised on the host.

    Initial values are drawn with NumPy from a seed taken off ``rngs``: on CPU, jax.random compiles one program per
    new shape (about a second each with jax 0.10), which made building even a tiny model take seconds. Under
    ``nnx.eval_shape`` no values are drawn at all.
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    rng = _host_rng(rngs)
    value = jnp.zeros(tuple(shape), dtype) if rng is None else jnp.asarray(init(rng, tuple(shape)), dtype)
    return kind(value, logical_axes=tuple(axes))


STACKED = "layers"  # the logical axis of a parameter stacked over layers (``scan_layers``)


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """One module whose every variable stacks the given identical modules' along a new leading axis, named
    ``"layers"`` in the parameters' logical axes: the form ``jax.lax.scan`` runs over."""
    graphdef, _ = nnx.split(modules[0])
    flats = [nnx.to_flat_state(nnx.split(m)[1]) for m in modules]
    leaves = []
    for items in zip(*flats):
        path, var = items[0]
        value = jnp.stack([v.get_value() for _, v in items])
        axes = var.get_metadata().get("logical_axes")
        leaves.append((path, var.replace(value) if axes is None else var.replace(value, logical_axes=(STACKED, *axes))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def is_stacked(var: nnx.Variable) -> bool:
    axes = var.get_metadata().get("logical_axes")
    return bool(axes) and axes[0] == STACKED


def variable_names(path: tuple, var: nnx.Variable) -> list[str]:
    """The dotted name of a variable, or of each layer of a stacked one: the name the unrolled model gives it
    (``...layers.{i}...``). Checkpoints, converters and exports use these names, so a model writes the same files
    with ``scan_layers`` on or off."""
    if not is_stacked(var):
        return [".".join(map(str, path))]
    k = path.index(STACKED) + 1
    return [".".join(map(str, (*path[:k], i, *path[k:]))) for i in range(var.get_value().shape[0])]


def named_variables(state: nnx.State) -> list[tuple[str, nnx.Variable, int | None]]:
    """(name, variable, layer) for every variable: a stacked one once per layer (layer = i), others once (None)."""
    return [(name, var, i if is_stacked(var) else None)
            for path, var in nnx.to_flat_state(state) for i, name in enumerate(variable_names(path, var))]


def normal_init(std: float):
    return lambda rng, shape: rng.normal(0.0, std, shape).astype(np.float32)


def zeros_init(rng, shape):
    return np.zeros(shape, np.float32)


def ones_init(rng, shape):
    return np.ones(shape, np.float32)


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
