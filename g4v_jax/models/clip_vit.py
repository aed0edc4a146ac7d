"""CLIP ViT vision tower (paper §3.1): ViT-L/14 on each of T frames -> (B, T, 257, 1024).

Reference: HF ``transformers.CLIPVisionModel`` (pre-LN blocks, quick-GELU, ``pre_layrnorm`` after the embeddings,
``post_layernorm`` on the pooled CLS only) and mPLUG-Owl-video's ``MplugOwlVisionModel``, which differs in three ways,
each a config flag so that one module follows each checkpoint's own convention:

* ``temporal_adapter``: before attention in every layer, and only when T > 1, a residual local temporal adapter
  LN -> 1x1x1 conv D->D/2 -> depthwise (3,1,1) conv over time -> quick-GELU -> 1x1x1 conv D/2->D on the patch tokens.
  The reference adapter hands the CLS token back unchanged, so ``x + adapter(x)`` doubles CLS in every layer; the
  released weights were trained that way and we reproduce it.
* ``post_layernorm_all_tokens``: mPLUG-Owl normalises every token of the last hidden state before the abstractor.
* LayerNorm eps 1e-6 (HF CLIP: 1e-5).

Module attribute names mirror the HF keys so that conversion (``convert/``) is a table of renames.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g4v_jax.config import VisionConfig
from g4v_jax.models.layers import (
    Dense,
    LayerNorm,
    attention_implementation,
    multihead_attention,
    normal_init,
    param,
    quick_gelu,
    zeros_init,
)

# OpenAI CLIP's pixel statistics (RGB); HF CLIPImageProcessor uses the same values. The only copy in the project.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def normalize_frames(frames: jax.Array) -> jax.Array:
    """uint8 [0, 255] or float [0, 1] RGB frames (..., H, W, 3) -> CLIP-normalised float32."""
    x = frames.astype(jnp.float32)
    if frames.dtype == jnp.uint8:
        x = x / 255.0
    return (x - CLIP_MEAN) / CLIP_STD


class VisionOutput(NamedTuple):
    last_hidden_state: jax.Array  # (B, T, 1 + N, D)
    pooled: jax.Array  # (B, T, D): post_layernorm(CLS), HF's pooler_output per frame


class VisionEmbeddings(nnx.Module):
    """Patchify (a stride-P conv without bias, done as a matmul) + CLS + learned positions."""

    def __init__(self, cfg: VisionConfig, *, param_dtype, dtype, rngs: nnx.Rngs):
        d, p = cfg.hidden_size, cfg.patch_size
        self.cfg = cfg
        self.dtype = dtype
        self.class_embedding = param(rngs, normal_init(d**-0.5), (d,), ("embed",), param_dtype)
        # kernel rows ordered (channel, row, col) like torch's Conv2d weight (D, 3, P, P) flattened
        self.patch_embedding = param(rngs, normal_init(0.02), (3 * p * p, d), ("patch", "embed"), param_dtype)
        self.position_embedding = param(rngs, normal_init(0.02), (cfg.num_positions, d), ("positions", "embed"),
                                        param_dtype)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """(F, H, W, 3) normalised pixels -> (F, 1 + N, D)."""
        f, h, w, c = pixels.shape
        p = self.cfg.patch_size
        patches = pixels.reshape(f, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
        patches = patches.reshape(f, (h // p) * (w // p), c * p * p)
        x = jnp.dot(patches.astype(self.dtype), self.patch_embedding[...].astype(self.dtype))
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (f, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding[...].astype(self.dtype)


def _in_proj_std(cfg: VisionConfig) -> float:
    """CLIP's own initialisation (transformers' ``CLIPPreTrainedModel._init_weights``), which scales with width and
    depth; a flat 0.02 left a tower trained from scratch at chance on shape for hundreds of steps (docs/world.md)."""
    return cfg.hidden_size**-0.5 * (2 * cfg.num_layers) ** -0.5


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, param_dtype, dtype, attention_impl: str, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        in_std, out_std = _in_proj_std(cfg), d**-0.5
        self.q_proj = Dense(d, d, ("embed", "heads"), init_std=in_std, **kw)
        self.k_proj = Dense(d, d, ("embed", "heads"), init_std=in_std, **kw)
        self.v_proj = Dense(d, d, ("embed", "heads"), init_std=in_std, **kw)
        self.out_proj = Dense(d, d, ("heads", "embed"), init_std=out_std, **kw)
        self.num_heads = cfg.num_heads
        self.implementation = attention_implementation(attention_impl)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(F, L, D) -> (F, L, D), full (non-causal) self-attention."""
        f, l, d = x.shape
        split = lambda t: t.reshape(f, l, self.num_heads, d // self.num_heads)
        out = multihead_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), implementation=self.implementation
        )
        return self.out_proj(out.reshape(f, l, d))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, param_dtype, dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"),
                         init_std=(2 * cfg.hidden_size) ** -0.5, **kw)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), init_std=_in_proj_std(cfg), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(quick_gelu(self.fc1(x)))


class LocalTemporalAdapter(nnx.Module):
    """mPLUG-Owl-video's ``MplugOwlVisionLocalTemporal``: (B, T, 1 + N, D) -> same, CLS passed through unchanged."""

    def __init__(self, cfg: VisionConfig, *, param_dtype, dtype, rngs: nnx.Rngs):
        d, b = cfg.hidden_size, cfg.hidden_size // 2
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.ln = LayerNorm(d, eps=cfg.temporal_adapter_eps, param_dtype=param_dtype)
        self.down_proj = Dense(d, b, ("embed", "mlp"), **kw)
        # depthwise temporal kernel: conv_kernel[k, c] weighs frame t + k - 1 for channel c (zero padding in time)
        self.conv_kernel = param(rngs, normal_init(0.02), (3, b), ("time_kernel", "mlp"), param_dtype)
        self.conv_bias = param(rngs, zeros_init, (b,), ("mlp",), param_dtype)
        self.up_proj = Dense(b, d, ("mlp", "embed"), **kw)
        self.up_proj.kernel[...] = jnp.zeros_like(self.up_proj.kernel[...])  # zero-init: a new adapter is identity
        self.dtype = dtype

    def __call__(self, x: jax.Array, frame_mask: jax.Array | None) -> jax.Array:
        cls, patches = x[:, :, :1], x[:, :, 1:]
        h = self.down_proj(self.ln(patches))  # (B, T, N, D/2)
        if frame_mask is not None:
            # padded frames act like the conv's zero padding, so masking a trailing frame equals dropping it
            h = jnp.where(frame_mask[:, :, None, None], h, 0)
        w = self.conv_kernel[...].astype(self.dtype)
        padded = jnp.pad(h, ((0, 0), (1, 1), (0, 0), (0, 0)))
        h = padded[:, :-2] * w[0] + padded[:, 1:-1] * w[1] + padded[:, 2:] * w[2]
        h = h + self.conv_bias[...].astype(self.dtype)
        h = self.up_proj(quick_gelu(h))
        return jnp.concatenate([cls, h.astype(x.dtype)], axis=2)


class VisionEncoderLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, param_dtype, dtype, attention_impl: str, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.temporal = LocalTemporalAdapter(cfg, **kw) if cfg.temporal_adapter else None
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.self_attn = VisionAttention(cfg, attention_impl=attention_impl, **kw)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.mlp = VisionMLP(cfg, **kw)

    def __call__(self, x: jax.Array, frame_mask: jax.Array | None) -> jax.Array:
        """(B, T, L, D) -> (B, T, L, D)."""
        b, t, l, d = x.shape
        if self.temporal is not None and t > 1:
            x = x + self.temporal(x, frame_mask)
        x = x.reshape(b * t, l, d)
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return x.reshape(b, t, l, d)


class CLIPVisionTower(nnx.Module):
    """Frames (B, T, H, W, 3) uint8 or float in [0, 1] -> ``VisionOutput`` with (B, T, 1 + N, D) features."""

    def __init__(self, cfg: VisionConfig, *, param_dtype=jnp.float32, dtype=jnp.float32, attention_impl="auto",
                 rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.cfg = cfg
        self.dtype = dtype
        self.embeddings = VisionEmbeddings(cfg, **kw)
        self.pre_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.layers = nnx.List(
            [VisionEncoderLayer(cfg, attention_impl=attention_impl, **kw) for _ in range(cfg.num_layers)]
        )
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)

    def __call__(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> VisionOutput:
        if frames.ndim != 5 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be (batch, T, H, W, 3), got shape {frames.shape}")
        b, t, h, w, _ = frames.shape
        size = self.cfg.image_size
        if (h, w) != (size, size):
            raise ValueError(
                f"frames are {h}x{w} but the vision tower expects {size}x{size}; resize and center-crop them with "
                "g4v_jax.data.video (load_video / clip_from_array) first"
            )
        x = self.embeddings(normalize_frames(frames).reshape(b * t, h, w, 3))
        x = self.pre_layernorm(x).reshape(b, t, *x.shape[1:])
        for layer in self.layers:
            x = layer(x, frame_mask)
        pooled = self.post_layernorm(x[:, :, 0])
        if self.cfg.post_layernorm_all_tokens:
            x = self.post_layernorm(x)
        return VisionOutput(last_hidden_state=x, pooled=pooled)
