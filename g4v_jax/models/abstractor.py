"""Video abstractor (paper §3.1): video features (B, T, 1 + N, Dv) -> a few video tokens (B, Nv, D_llm).

Two variants share one block, mPLUG-Owl's ``MplugOwlVisualAbstractorLayer``: for queries x and visual features v,

    q  = LN1(x);   kv = [q ; LNk(v)]
    x' = q + W_o · MHA(q, kv, kv)          (the residual is the *normed* q, as in the reference)
    x' = x' + W_2 · LN_ffn(silu(W_1 x') * W_3 x')   applied to LN2(x')

so a query attends to the video features of all T frames and to the tokens of its own stream.

* ``mplug_owl_video`` (the checkpoint GPT4Video starts from): queries = [64 query tokens ; 64 temporal query tokens]
  (only the 64 query tokens when T == 1) run through 6 blocks together; output
  ``visual_fc(out[:64]) + temporal_visual_fc(out[64:])`` followed by a learned ``vit_eos`` token: 65 tokens.
  With ``num_temporal_tokens: 0`` (the paper's Table 5 #1) it runs as mPLUG-Owl's code does without temporal
  queries, the single-image path: ``visual_fc(out)`` + ``vit_eos``, no ``temporal_visual_fc``.
* ``paper``: eqs. (1)-(3). Qs and Qt each run through the 6 blocks separately — a stream's keys/values are
  [F_v ; its own tokens] — then ``F_video = W · LN(F_s + F_t) + b``: 64 tokens.
  The paper does not say whether the two streams share layer weights. We share them by default
  (``share_stream_weights``): the streams are told apart by their own learned tokens, stage 1 trains on only ~11k
  videos so half the parameters is the safer choice, and shared layers can be initialised from mPLUG-Owl's single
  pretrained abstractor, as the release does. ``share_stream_weights: false`` gives each stream its own 6 layers.
  With ``num_temporal_tokens: 0`` (Table 5 #1) there is no Ft: ``F_video = W · LN(F_s) + b``.

The other variants of Table 5 live beside this one: ``qformer.py`` (BLIP-2's Q-Former) and ``st_pool.py``
(Video-ChatGPT's pooling); ``gpt4video.build_abstractor`` picks one from the config.

Attention over [F_v ; tokens] has no notion of frame order: order reaches the abstractor through the vision tower's
temporal adapter (mPLUG-Owl-video) or, for a plain CLIP tower, through optional learned ``frame_embeddings``.
Padded frames (``frame_mask`` False) are excluded from the keys, so masking a trailing frame equals dropping it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from g4v_jax.config import AbstractorConfig
from g4v_jax.models.layers import Dense, LayerNorm, attention_implementation, multihead_attention, normal_init, param


class AbstractorAttention(nnx.Module):
    """Cross-attention with separate query/key/value linears (with bias)."""

    def __init__(self, cfg: AbstractorConfig, *, param_dtype, dtype, attention_impl: str, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.query = Dense(d, d, ("embed", "heads"), **kw)
        self.key = Dense(d, d, ("embed", "heads"), **kw)
        self.value = Dense(d, d, ("embed", "heads"), **kw)
        self.num_heads = cfg.num_heads
        self.implementation = attention_implementation(attention_impl)

    def __call__(self, q_in: jax.Array, kv_in: jax.Array, kv_mask: jax.Array | None) -> jax.Array:
        """(B, Q, D), (B, K, D), (B, K) -> (B, Q, D) (before the output projection)."""
        b, nq, d = q_in.shape
        nk = kv_in.shape[1]
        h, dh = self.num_heads, d // self.num_heads
        out = multihead_attention(
            self.query(q_in).reshape(b, nq, h, dh),
            self.key(kv_in).reshape(b, nk, h, dh),
            self.value(kv_in).reshape(b, nk, h, dh),
            key_mask=kv_mask,
            implementation=self.implementation,
        )
        return out.reshape(b, nq, d)


class AbstractorMLP(nnx.Module):
    """SwiGLU with an inner LayerNorm: ``w2(ffn_ln(silu(w1 x) * w3 x))``."""

    def __init__(self, cfg: AbstractorConfig, *, param_dtype, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.w1 = Dense(d, f, ("embed", "mlp"), **kw)
        self.w3 = Dense(d, f, ("embed", "mlp"), **kw)
        self.ffn_ln = LayerNorm(f, eps=cfg.ffn_norm_eps, axis_name="mlp", param_dtype=param_dtype)
        self.w2 = Dense(f, d, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(self.ffn_ln(jax.nn.silu(self.w1(x)) * self.w3(x)))


class AbstractorLayer(nnx.Module):
    """One block (see the module docstring)."""

    def __init__(self, cfg: AbstractorConfig, *, param_dtype, dtype, attention_impl: str, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.norm1 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.normk = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.attention = AbstractorAttention(cfg, attention_impl=attention_impl, **kw)
        self.out_proj = Dense(cfg.hidden_size, cfg.hidden_size, ("heads", "embed"), **kw)
        self.norm2 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, param_dtype=param_dtype)
        self.mlp = AbstractorMLP(cfg, **kw)

    def __call__(self, x: jax.Array, visual: jax.Array, visual_mask: jax.Array | None) -> jax.Array:
        """x (B, Q, D) queries, visual (B, K, D), visual_mask (B, K) -> (B, Q, D)."""
        q = self.norm1(x)
        kv = jnp.concatenate([q, self.normk(visual).astype(q.dtype)], axis=1)
        mask = None
        if visual_mask is not None:
            mask = jnp.concatenate([jnp.ones(q.shape[:2], bool), visual_mask.astype(bool)], axis=1)
        x = q + self.out_proj(self.attention(q, kv, mask))
        return x + self.mlp(self.norm2(x))


def frame_embedding(cfg: AbstractorConfig, width: int, param_dtype, rngs: nnx.Rngs) -> nnx.Param | None:
    """Learned per-frame embeddings (``cfg.frame_embeddings``, width of the video features), or None."""
    if not cfg.frame_embeddings:
        return None
    return param(rngs, normal_init(0.02), (cfg.frame_embeddings, width), ("positions", "embed"), param_dtype)


def add_frame_embeddings(features: jax.Array, embedding: nnx.Param | None) -> jax.Array:
    """(B, T, 1 + N, Dv) + each frame's embedding (none when ``embedding`` is None)."""
    if embedding is None:
        return features
    t, have = features.shape[1], embedding.shape[0]
    if t > have:
        raise ValueError(f"{t} frames but the abstractor has only {have} frame embeddings")
    return features + embedding[:t].astype(features.dtype)[None, :, None, :]


def flatten_frames(features: jax.Array, frame_mask: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """(B, T, 1 + N, Dv), (B, T) -> every token of every frame as one sequence (B, T·(1 + N), Dv) and its key mask."""
    b, t, n, d = features.shape
    mask = None if frame_mask is None else jnp.repeat(frame_mask.astype(bool), n, axis=1)
    return features.reshape(b, t * n, d), mask


def _stack(cfg: AbstractorConfig, kw) -> nnx.List:
    return nnx.List([AbstractorLayer(cfg, **kw) for _ in range(cfg.num_layers)])


def _run(layers, x: jax.Array, visual: jax.Array, visual_mask: jax.Array | None) -> jax.Array:
    for layer in layers:
        x = layer(x, visual, visual_mask)
    return x


class VideoAbstractor(nnx.Module):
    """(B, T, 1 + N, Dv) video features + (B, T) frame mask -> (B, Nv, D_llm) video tokens for the LLM."""

    def __init__(self, cfg: AbstractorConfig, llm_hidden_size: int, *, param_dtype=jnp.float32, dtype=jnp.float32,
                 attention_impl="auto", rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(param_dtype=param_dtype, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
        dense_kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.cfg = cfg
        self.dtype = dtype
        self.query_tokens = param(rngs, normal_init(0.02), (cfg.num_query_tokens, d), ("queries", "embed"), param_dtype)
        temporal = cfg.num_temporal_tokens > 0
        # the paper's enhance tokens Qt; named after mPLUG-Owl's temporal_query_tokens, which they are
        self.temporal_query_tokens = param(
            rngs, normal_init(0.02), (cfg.num_temporal_tokens, d), ("queries", "embed"), param_dtype
        ) if temporal else None
        self.layers = _stack(cfg, kw)
        self.frame_embedding = frame_embedding(cfg, d, param_dtype, rngs)
        if cfg.variant == "mplug_owl_video":
            self.visual_fc = Dense(d, llm_hidden_size, ("embed", "llm_embed"), **dense_kw)
            self.temporal_visual_fc = (Dense(d, llm_hidden_size, ("embed", "llm_embed"), **dense_kw) if temporal
                                       else None)
            self.vit_eos = param(rngs, normal_init(0.02), (llm_hidden_size,), ("llm_embed",), param_dtype)
        else:
            self.temporal_layers = None if cfg.share_stream_weights or not temporal else _stack(cfg, kw)
            self.out_norm = LayerNorm(d, eps=cfg.norm_eps, param_dtype=param_dtype)
            self.proj = Dense(d, llm_hidden_size, ("embed", "llm_embed"), **dense_kw)

    @property
    def num_output_tokens(self) -> int:
        return self.cfg.num_query_tokens + (1 if self.cfg.variant == "mplug_owl_video" else 0)

    def __call__(self, features: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        """(B, T, 1 + N, Dv) features, (B, T) frame mask -> (B, Nv, D_llm)."""
        b = features.shape[0]
        visual, visual_mask = flatten_frames(add_frame_embeddings(features.astype(self.dtype), self.frame_embedding),
                                             frame_mask)
        tokens = lambda p: jnp.broadcast_to(p[...].astype(self.dtype), (b, *p.shape))
        qs = tokens(self.query_tokens)
        qt = None if self.temporal_query_tokens is None else tokens(self.temporal_query_tokens)
        if self.cfg.variant == "mplug_owl_video":
            ns = qs.shape[1]
            if features.shape[1] == 1 or qt is None:  # the reference drops the temporal queries for single images
                return self._mplug_output(_run(self.layers, qs, visual, visual_mask), None)
            out = _run(self.layers, jnp.concatenate([qs, qt], axis=1), visual, visual_mask)
            return self._mplug_output(out[:, :ns], out[:, ns:])
        f = _run(self.layers, qs, visual, visual_mask)  # eq. (1)
        if qt is not None:
            f = f + _run(self.temporal_layers or self.layers, qt, visual, visual_mask)  # eq. (2)
        return self.proj(self.out_norm(f))  # eq. (3) + linear map to the LLM width

    def _mplug_output(self, spatial: jax.Array, temporal: jax.Array | None) -> jax.Array:
        out = self.visual_fc(spatial)
        if temporal is not None:
            out = out + self.temporal_visual_fc(temporal)
        eos = jnp.broadcast_to(self.vit_eos[...].astype(out.dtype), (out.shape[0], 1, out.shape[-1]))
        return jnp.concatenate([out, eos], axis=1)
