"""BLIP-2's Q-Former as a video abstractor (the paper's Table 5 #2 and #3): learned queries read the video.

    x = LN(Q)                                                     (Q: num_query_tokens learned queries)
    every layer l:  x = LN_a(x + W_o · MHA(x, x, x))              (BERT's post-norm residual blocks)
                    x = LN_c(x + W_c · MHA(x, F, F))              when l % cross_attention_frequency == 0
                    x = LN_f(x + W_2 · gelu(W_1 x))
    out = W · x + b                                               (BLIP-2's language_projection)

F is every token of every frame, (B, T·(1 + N), Dv), CLS included as BLIP-2 reads its ViT's whole output, frames
past a video's end masked out of the keys. Names follow ``transformers.Blip2QFormerModel`` (``convert.hf_blip2``
maps one onto the other); the text branch of BLIP-2's first stage (``use_qformer_text_input``) is not part of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from g4v_jax.config import AbstractorConfig
from g4v_jax.models.abstractor import add_frame_embeddings, flatten_frames, frame_embedding
from g4v_jax.models.layers import Dense, LayerNorm, attention_implementation, multihead_attention, normal_init, param


class QFormerAttention(nnx.Module):
    """``LN(x + W_o · MHA(x, kv, kv))``: self-attention (kv = x) or cross-attention to the video (kv = F)."""

    def __init__(self, cfg: AbstractorConfig, kv_width: int, *, param_dtype, dtype, attention_impl: str,
                 rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.query = Dense(d, d, ("embed", "heads"), **kw)
        self.key = Dense(kv_width, d, ("embed", "heads"), **kw)
        self.value = Dense(kv_width, d, ("embed", "heads"), **kw)
        self.dense = Dense(d, d, ("heads", "embed"), **kw)
        self.norm = LayerNorm(d, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.num_heads = cfg.num_heads
        self.implementation = attention_implementation(attention_impl)

    def __call__(self, x: jax.Array, kv: jax.Array, kv_mask: jax.Array | None) -> jax.Array:
        """x (B, Q, D), kv (B, K, Dkv), kv_mask (B, K) -> (B, Q, D)."""
        b, nq, d = x.shape
        h = self.num_heads
        split = lambda y: y.reshape(*y.shape[:2], h, d // h)
        out = multihead_attention(split(self.query(x)), split(self.key(kv)), split(self.value(kv)), key_mask=kv_mask,
                                  implementation=self.implementation)
        return self.norm(x + self.dense(out.reshape(b, nq, d)))


class QFormerLayer(nnx.Module):
    """Self-attention among the queries, cross-attention to the video in every ``cross_attention_frequency``-th
    layer, then the queries' feed-forward block (HF's ``intermediate_query`` / ``output_query``)."""

    def __init__(self, cfg: AbstractorConfig, index: int, vision_width: int, *, param_dtype, dtype,
                 attention_impl: str, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.attention = QFormerAttention(cfg, d, attention_impl=attention_impl, **kw)
        self.crossattention = (QFormerAttention(cfg, vision_width, attention_impl=attention_impl, **kw)
                               if index % cfg.cross_attention_frequency == 0 else None)
        self.intermediate = Dense(d, f, ("embed", "mlp"), **kw)
        self.output = Dense(f, d, ("mlp", "embed"), **kw)
        self.output_norm = LayerNorm(d, eps=cfg.norm_eps, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, visual: jax.Array, visual_mask: jax.Array | None) -> jax.Array:
        x = self.attention(x, x, None)
        if self.crossattention is not None:
            x = self.crossattention(x, visual, visual_mask)
        # BLIP-2's "gelu" is the exact (erf) one
        return self.output_norm(x + self.output(jax.nn.gelu(self.intermediate(x), approximate=False)))


class QFormerAbstractor(nnx.Module):
    """(B, T, 1 + N, Dv) video features + (B, T) frame mask -> (B, num_query_tokens, D_llm) video tokens."""

    def __init__(self, cfg: AbstractorConfig, vision_width: int, llm_hidden_size: int, *, param_dtype=jnp.float32,
                 dtype=jnp.float32, attention_impl="auto", rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.cfg = cfg
        self.dtype = dtype
        self.query_tokens = param(rngs, normal_init(0.02), (cfg.num_query_tokens, d), ("queries", "embed"), param_dtype)
        self.frame_embedding = frame_embedding(cfg, vision_width, param_dtype, rngs)
        self.layernorm = LayerNorm(d, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.layers = nnx.List([QFormerLayer(cfg, i, vision_width, attention_impl=attention_impl, **kw)
                                for i in range(cfg.num_layers)])
        self.proj = Dense(d, llm_hidden_size, ("embed", "llm_embed"), **kw)

    @property
    def num_output_tokens(self) -> int:
        return self.cfg.num_query_tokens

    def qformer(self, features: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        """The Q-Former's last hidden state (B, num_query_tokens, D): ``Blip2QFormerModel``'s ``last_hidden_state``
        for ``query_embeds`` = the query tokens and ``encoder_hidden_states`` = the frames' tokens."""
        visual, visual_mask = flatten_frames(add_frame_embeddings(features.astype(self.dtype), self.frame_embedding),
                                             frame_mask)
        q = self.query_tokens[...].astype(self.dtype)
        x = self.layernorm(jnp.broadcast_to(q, (features.shape[0], *q.shape)))
        for layer in self.layers:
            x = layer(x, visual, visual_mask)
        return x

    def __call__(self, features: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        return self.proj(self.qformer(features, frame_mask))
