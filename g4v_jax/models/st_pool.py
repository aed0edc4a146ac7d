"""Video-ChatGPT's spatio-temporal pooling as a video abstractor (the paper's Table 5 #4).

For one video's patch features F (T, P, Dv), CLS dropped:

    temporal tokens  t_i = mean_p F[i, p]        one per frame, P patches averaged      (T, Dv)
    spatial tokens   s_p = mean_i F[i, p]        one per patch, frames averaged         (P, Dv)
    out = W · [t ; s] + b                                                               (T_max + P, D_llm)

Video-ChatGPT pads the temporal tokens with zeros up to its 100 frame slots before the projection; here the slots
are ``model.abstractor.pool_frames`` (default ``model.num_frames``), and a frame past the video's end (frame mask
False) counts as padding: its temporal token is zero and it is left out of the spatial mean. No parameters besides
W and b (and optional frame embeddings, added before pooling): no attention, so it costs almost nothing to train.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from g4v_jax.config import AbstractorConfig
from g4v_jax.models.abstractor import add_frame_embeddings, frame_embedding
from g4v_jax.models.layers import Dense


def spatio_temporal_tokens(patches: jax.Array, frame_mask: jax.Array | None, slots: int) -> jax.Array:
    """(B, T, P, D) patch features, (B, T) frame mask -> (B, slots + P, D): zero-padded temporal then spatial
    tokens, the means taken in fp32."""
    b, t, p, d = patches.shape
    if t > slots:
        raise ValueError(f"{t} frames but st_pool has {slots} temporal token slots (model.abstractor.pool_frames)")
    mask = jnp.ones((b, t), bool) if frame_mask is None else frame_mask.astype(bool)
    x = jnp.where(mask[:, :, None, None], patches.astype(jnp.float32), 0.0)
    temporal = x.mean(axis=2)  # (B, T, D); zero for a masked frame
    frames = jnp.maximum(mask.sum(axis=1), 1).astype(jnp.float32)
    spatial = x.sum(axis=1) / frames[:, None, None]  # (B, P, D)
    temporal = jnp.pad(temporal, ((0, 0), (0, slots - t), (0, 0)))
    return jnp.concatenate([temporal, spatial], axis=1).astype(patches.dtype)


class SpatioTemporalPool(nnx.Module):
    """(B, T, 1 + P, Dv) video features + (B, T) frame mask -> (B, pool_frames + P, D_llm) video tokens."""

    def __init__(self, cfg: AbstractorConfig, vision_width: int, llm_hidden_size: int, pool_frames: int,
                 num_patches: int, *,
                 param_dtype=jnp.float32, dtype=jnp.float32, attention_impl="auto", rngs: nnx.Rngs):
        del attention_impl  # no attention here; the argument keeps one constructor signature for every variant
        self.dtype = dtype
        self.pool_frames = pool_frames
        self.frame_embedding = frame_embedding(cfg, vision_width, param_dtype, rngs)
        self.proj = Dense(vision_width, llm_hidden_size, ("embed", "llm_embed"), param_dtype=param_dtype, dtype=dtype,
                          rngs=rngs)
        self.num_patches = num_patches

    @property
    def num_output_tokens(self) -> int:
        return self.pool_frames + self.num_patches

    def __call__(self, features: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        features = add_frame_embeddings(features.astype(self.dtype), self.frame_embedding)
        return self.proj(spatio_temporal_tokens(features[:, :, 1:], frame_mask, self.pool_frames))
