"""CLIP text tower and the two-tower ``CLIPModel`` (projections + logit scale), for text-to-video metrics (CLIPSIM).

Reference: HF ``transformers.CLIPTextModel`` / ``CLIPModel`` (transformers 5): token + learned position embeddings,
pre-LN causal transformer with quick-GELU, ``final_layer_norm`` on every token, and the pooled output is the hidden
state at the end-of-text token, picked the way the installed transformers does:

* ``eos_token_id == 2`` (configs written before transformers PR #24773, e.g. ``openai/clip-vit-*``): the position of
  the largest token id in each row (OpenAI's EOT id 49407 is the largest in the vocabulary);
* otherwise: the first position whose id equals ``eos_token_id`` (position 0 when the row has none, as torch's
  ``argmax`` of an all-zero row).

``CLIPModel`` pairs it with our ``CLIPVisionTower`` (HF conventions: post-LN on the pooled CLS only) and the
bias-free ``text_projection`` / ``visual_projection``. Attribute names mirror HF's keys so that conversion
(``convert/hf_clip_text.py``) is a table of renames.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from g4v_jax.config import VisionConfig
from g4v_jax.models.clip_vit import CLIPVisionTower, VisionMLP
from g4v_jax.models.layers import Dense, LayerNorm, normal_init, param

LEGACY_EOS_TOKEN_ID = 2  # HF: with this value in the config, pool at argmax(input_ids)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """HF ``CLIPTextConfig``'s fields that shape the model; defaults are ViT-L/14's text tower."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407


class TextOutput(NamedTuple):
    last_hidden_state: jax.Array  # (B, L, D), after final_layer_norm
    pooled: jax.Array  # (B, D): HF's pooler_output (hidden state at the EOS position)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """(B, L) ids -> (B,) pooling positions, HF ``CLIPTextModel``'s rule (see the module docstring)."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)  # first maximum, as torch.argmax
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class TextEmbeddings(nnx.Module):
    def __init__(self, cfg: TextConfig, *, param_dtype, dtype, rngs: nnx.Rngs):
        self.token_embedding = param(rngs, normal_init(0.02), (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                     param_dtype)
        self.position_embedding = param(rngs, normal_init(0.01), (cfg.max_position_embeddings, cfg.hidden_size),
                                        ("positions", "embed"), param_dtype)
        self.max_positions = cfg.max_position_embeddings
        self.dtype = dtype

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        l = input_ids.shape[-1]
        if l > self.max_positions:
            raise ValueError(f"text of {l} tokens is longer than the CLIP text tower's {self.max_positions} "
                             "positions; truncate it when tokenizing")
        x = jnp.take(self.token_embedding[...], input_ids, axis=0).astype(self.dtype)
        return x + self.position_embedding[...][:l].astype(self.dtype)


class TextAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, param_dtype, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.q_proj = Dense(d, d, ("embed", "heads"), **kw)
        self.k_proj = Dense(d, d, ("embed", "heads"), **kw)
        self.v_proj = Dense(d, d, ("embed", "heads"), **kw)
        self.out_proj = Dense(d, d, ("heads", "embed"), **kw)
        self.num_heads = cfg.num_heads

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """(B, L, D), mask (B, 1, L, L) bool -> (B, L, D)."""
        b, l, d = x.shape
        split = lambda t: t.reshape(b, l, self.num_heads, d // self.num_heads)
        out = jax.nn.dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                           mask=mask, implementation="xla")
        return self.out_proj(out.reshape(b, l, d))


# CLIP's two towers share the MLP (fc1 -> quick-GELU -> fc2); it reads only hidden/intermediate sizes
TextMLP = VisionMLP


class TextEncoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, param_dtype, dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.self_attn = TextAttention(cfg, **kw)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
        self.mlp = TextMLP(cfg, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextTower(nnx.Module):
    """HF ``CLIPTextModel``: token ids (B, L) -> ``TextOutput``."""

    def __init__(self, cfg: TextConfig, *, param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg, **kw)
        self.layers = nnx.List([TextEncoderLayer(cfg, **kw) for _ in range(cfg.num_layers)])
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> TextOutput:
        """``attention_mask`` (B, L), 1/True for real tokens, is combined with the causal mask as HF does; with right
        padding it changes nothing at or before the EOS token, so the pooled output does not depend on it."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        l = input_ids.shape[1]
        mask = jnp.tril(jnp.ones((l, l), bool))[None, None]
        if attention_mask is not None:
            mask = mask & jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        x = self.final_layer_norm(x)
        pos = eos_positions(input_ids, self.cfg.eos_token_id)
        pooled = jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]
        return TextOutput(last_hidden_state=x, pooled=pooled)


class CLIPOutput(NamedTuple):
    logits_per_text: jax.Array  # (Nt, Ni) = exp(logit_scale) * cosine
    logits_per_image: jax.Array  # (Ni, Nt)
    text_embeds: jax.Array  # (Nt, P), L2-normalised
    image_embeds: jax.Array  # (Ni, P), L2-normalised


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / ||x|| (HF CLIPModel's ``_get_vector_norm``: no epsilon)."""
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nnx.Module):
    """HF ``CLIPModel``: text tower + vision tower + bias-free projections + ``logit_scale`` (a log temperature)."""

    def __init__(self, text_cfg: TextConfig, vision_cfg: VisionConfig, projection_dim: int, *,
                 logit_scale_init: float = 2.6592, param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
        if vision_cfg.temporal_adapter or vision_cfg.post_layernorm_all_tokens:
            raise ValueError("CLIPModel's vision tower is a plain HF CLIP ViT: temporal_adapter and "
                             "post_layernorm_all_tokens must be off")
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.text_cfg, self.vision_cfg, self.projection_dim = text_cfg, vision_cfg, projection_dim
        self.text_model = CLIPTextTower(text_cfg, **kw)
        self.vision_model = CLIPVisionTower(vision_cfg, **kw)
        self.text_projection = Dense(text_cfg.hidden_size, projection_dim, ("embed", None), use_bias=False, **kw)
        self.visual_projection = Dense(vision_cfg.hidden_size, projection_dim, ("embed", None), use_bias=False, **kw)
        self.logit_scale = param(None, lambda rng, shape: jnp.full(shape, logit_scale_init, jnp.float32), (), (),
                                 jnp.float32)

    @property
    def image_size(self) -> int:
        return self.vision_cfg.image_size

    def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """(B, L) ids -> (B, P) projected, unnormalised (HF ``get_text_features``)."""
        return self.text_projection(self.text_model(input_ids, attention_mask).pooled)

    def get_image_features(self, images: jax.Array) -> jax.Array:
        """(N, S, S, 3) uint8 or float [0, 1] RGB -> (N, P) projected, unnormalised (HF ``get_image_features``)."""
        return self.visual_projection(self.vision_model(images[:, None]).pooled[:, 0])

    def __call__(self, input_ids: jax.Array, images: jax.Array,
                 attention_mask: jax.Array | None = None) -> CLIPOutput:
        text = l2_normalize(self.get_text_features(input_ids, attention_mask).astype(jnp.float32))
        image = l2_normalize(self.get_image_features(images).astype(jnp.float32))
        logits_per_text = jnp.dot(text, image.T) * jnp.exp(self.logit_scale[...])
        return CLIPOutput(logits_per_text, logits_per_text.T, text, image)
