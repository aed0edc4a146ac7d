"""LLaMA (paper §3.3: LLaMA-7B, frozen, with LoRA), matching HF ``transformers.LlamaForCausalLM``.

Pre-RMSNorm decoder blocks, rotary position embeddings in HF's rotate-half layout (HF checkpoints are already
permuted for it; Meta ``.pth`` weights are interleaved and would need the inverse permutation), SwiGLU MLP,
grouped-query attention (``num_kv_heads`` < ``num_heads``), tied or untied output embeddings.

Shapes: token ids (B, L) -> logits (B, L, V). Decoding uses a preallocated ``KVCache`` (per layer, keys
(B, H_kv, S, Dh) and values transposed (B, H_kv, Dh, S), so that both of a query's products with the cache are
batched matmuls over (B, H_kv) that read it in place) written at slot ``index``: one slot for the whole batch (), or
one per row (B,) when rows are at different points of their sequences (the continuous-batching engine). ``valid``
marks the slots that hold real tokens, so left- or right-padded prompts share one cache. A query at slot q attends to
valid slots s <= q. Positions for RoPE default to the number of real tokens before each token, so padding never
shifts a sequence's positions. Each layer writes its new keys/values into its cache in place (a scatter of L tokens),
so a decode step moves O(B·L) cache bytes, not the whole cache.

Attention without a cache (training, scoring) goes through ``jax.nn.dot_product_attention`` (cuDNN on GPU when
``attention_impl`` allows); with a cache, through ``cached_attention`` on the head-major layout.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g4v_jax.config import LlamaConfig, LoraConfig
from g4v_jax.models.layers import attention_implementation, normal_init, ones_init, param, stack_modules
from g4v_jax.models.lora import LoRALinear


class KVCache(NamedTuple):
    """Keys and values of every layer, head-major: keys (B, H_kv, S, Dh) and values (B, H_kv, Dh, S), one array per
    layer (a tuple), or, for a model with ``scan_layers``, one stacked array (layers, ...) each that the scan carries.
    Separate arrays let each unrolled layer's attention read its cache in place (a slice of a stacked array is copied
    out first), and the values' transposed layout makes probabilities @ values a matmul the CPU's fast kernels take
    (the other layout fell back to a naive loop): bench/NOTES.md has the measurements."""

    k: tuple[jax.Array, ...] | jax.Array  # per layer (B, H_kv, S, Dh), or stacked (layers, B, H_kv, S, Dh)
    v: tuple[jax.Array, ...] | jax.Array  # per layer (B, H_kv, Dh, S), or stacked (layers, B, H_kv, Dh, S)
    valid: jax.Array  # (B, S) bool: slot holds a real token
    index: jax.Array  # () or (B,) int32: next slot to write (for all rows, or per row)

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k, (tuple, list))

    @property
    def max_length(self) -> int:
        return (self.k if self.stacked else self.k[0]).shape[-2]  # keys: (..., S, Dh)

    def rows(self, start, size: int) -> "KVCache":
        """Rows ``start`` .. ``start + size`` of the batch (``start`` may be traced)."""
        axis = 1 if self.stacked else 0
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=axis)  # noqa: E731
        index = self.index if self.index.ndim == 0 else jax.lax.dynamic_slice_in_dim(self.index, start, size)
        return KVCache(*jax.tree.map(take, (self.k, self.v)), jax.lax.dynamic_slice_in_dim(self.valid, start, size),
                       index)

    def put_rows(self, rows: "KVCache", start) -> "KVCache":
        """This cache with ``rows`` (a ``rows(start, n)`` of it, changed) written back at ``start``; per-row
        ``index`` only."""
        axis = 1 if self.stacked else 0
        put = lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r, start, axis=axis)  # noqa: E731
        k, v = jax.tree.map(put, (self.k, self.v), (rows.k, rows.v))
        return KVCache(k, v, jax.lax.dynamic_update_slice_in_dim(self.valid, rows.valid, start, axis=0),
                       jax.lax.dynamic_update_slice_in_dim(self.index, rows.index, start, axis=0))


def init_cache(cfg: LlamaConfig, batch: int, max_length: int, dtype=jnp.float32, *, stacked: bool = False
               ) -> KVCache:
    """An empty cache; ``stacked`` for a model built with ``scan_layers`` (``LlamaForCausalLM.init_cache``)."""
    k_shape = (batch, cfg.num_kv_heads, max_length, cfg.head_size)
    v_shape = (batch, cfg.num_kv_heads, cfg.head_size, max_length)
    if stacked:
        k = jnp.zeros((cfg.num_layers, *k_shape), dtype)
        v = jnp.zeros((cfg.num_layers, *v_shape), dtype)
    else:
        k = tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.num_layers))
        v = tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.num_layers))
    return KVCache(k, v, jnp.zeros((batch, max_length), bool), jnp.zeros((), jnp.int32))


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Rotary inverse frequencies (Dh/2,) in float32, with HF's ``linear`` and ``llama3`` scaling."""
    dim = cfg.head_size
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv_freq = inv_freq / rs.factor
    elif rs.rope_type == "llama3":
        old_ctx = rs.original_max_position_embeddings
        low_wavelen = old_ctx / rs.low_freq_factor
        high_wavelen = old_ctx / rs.high_freq_factor
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        smooth = (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE. x (B, L, H, Dh), positions (B, L) -> (B, L, H, Dh)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, L, Dh/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, features: int, *, eps: float, param_dtype=jnp.float32):
        self.scale = param(None, ones_init, (features,), ("norm",), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)  # HF casts back before the weight


def _lora_for(name: str, lora: LoraConfig | None) -> LoraConfig | None:
    return lora if lora is not None and lora.enabled and name in lora.targets else None


class LayerCache(NamedTuple):
    """What one layer reads and writes: its own keys (B, H_kv, S, Dh) and values (B, H_kv, Dh, S) (``layer`` None),
    or the stacked ones and its number in the stack (``scan_layers``); new entries go at ``index``."""

    k: jax.Array
    v: jax.Array
    layer: int | jax.Array | None
    index: jax.Array  # () or (B,)

    def read(self) -> tuple[jax.Array, jax.Array]:
        """This layer's keys (B, H_kv, S, Dh) and values (B, H_kv, Dh, S)."""
        return (self.k, self.v) if self.layer is None else (self.k[self.layer], self.v[self.layer])

    def write(self, k: jax.Array, v: jax.Array) -> "LayerCache":
        """Write this layer's new k, v (B, L, H_kv, Dh) at ``index`` (in place under jit)."""
        b, l = k.shape[:2]
        lead = () if self.layer is None else (self.layer,)
        if self.index.ndim == 0:
            def put(cache, new, order, at):
                new = new.transpose(order).astype(cache.dtype)
                return jax.lax.dynamic_update_slice(cache, new if self.layer is None else new[None], (*lead, *at))

            return self._replace(k=put(self.k, k, (0, 2, 1, 3), (0, 0, self.index, 0)),
                                 v=put(self.v, v, (0, 2, 3, 1), (0, 0, 0, self.index)))
        # advanced indices for row and position around slices: the indexed view is (B, L, H_kv, Dh) in both
        # layouts, the new entries' own
        rows, cols = jnp.arange(b)[:, None], self.index[:, None] + jnp.arange(l)[None, :]
        whole = slice(None)
        return self._replace(k=self.k.at[(*lead, rows, whole, cols)].set(k.astype(self.k.dtype), mode="drop"),
                             v=self.v.at[(*lead, rows, whole, whole, cols)].set(v.astype(self.v.dtype), mode="drop"))


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention against a head-major cache: q (B, L, H, Dh), k (B, H_kv, S, Dh), v (B, H_kv, Dh, S),
    mask (B, 1, L, S) bool -> (B, L, H, Dh). Scores and softmax in float32; query head h reads kv head h // (H / H_kv),
    as ``jax.nn.dot_product_attention`` (and HF's ``repeat_kv``) group them."""
    b, l, h, dh = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, l, hkv, h // hkv, dh)
    scores = jnp.einsum("blkgd,bksd->bkgls", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, :, None], scores * (1.0 / np.sqrt(dh)), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgls,bkds->blkgd", probs, v.astype(q.dtype), preferred_element_type=jnp.float32)
    return out.reshape(b, l, h, dh).astype(q.dtype)


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, lora: LoraConfig | None, *, param_dtype, dtype, attention_impl: str,
                 rngs: nnx.Rngs):
        d, h, hkv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size

        def proj(name, i, o, axes):
            return LoRALinear(i, o, axes, lora=_lora_for(name, lora), param_dtype=param_dtype, dtype=dtype, rngs=rngs)

        self.q_proj = proj("q_proj", d, h * dh, ("embed", "heads"))
        self.k_proj = proj("k_proj", d, hkv * dh, ("embed", "kv_heads"))
        self.v_proj = proj("v_proj", d, hkv * dh, ("embed", "kv_heads"))
        self.o_proj = proj("o_proj", h * dh, d, ("heads", "embed"))
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, dh
        self.rope_cfg = cfg  # static: the frequencies are a trace-time constant, not state
        self.implementation = attention_implementation(attention_impl)

    def __call__(self, x, positions, mask, kv: "LayerCache | None", adapter_mask=None):
        """x (B, L, D); mask (B, 1, L, S) bool; kv: the stacked cache and this layer's number, or None;
        adapter_mask (B, L) bool or None (``LoRALinear``). Returns the output (B, L, D) and the stacked cache with
        this layer's new keys/values written."""
        b, l, _ = x.shape
        inv_freq = rope_inv_freq(self.rope_cfg)
        q = apply_rope(self.q_proj(x, adapter_mask).reshape(b, l, self.num_heads, self.head_dim), positions, inv_freq)
        k = apply_rope(self.k_proj(x, adapter_mask).reshape(b, l, self.num_kv_heads, self.head_dim), positions,
                       inv_freq)
        v = self.v_proj(x, adapter_mask).reshape(b, l, self.num_kv_heads, self.head_dim)
        if kv is not None:
            kv = kv.write(k, v)
            out = cached_attention(q, *kv.read(), mask)
        else:
            impl = self.implementation if q.dtype != jnp.float32 else "xla"  # cuDNN needs fp16/bf16
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
        return self.o_proj(out.reshape(b, l, -1), adapter_mask), kv


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, lora: LoraConfig | None, *, param_dtype, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size

        def proj(name, i, o, axes):
            return LoRALinear(i, o, axes, lora=_lora_for(name, lora), param_dtype=param_dtype, dtype=dtype, rngs=rngs)

        self.gate_proj = proj("gate_proj", d, f, ("embed", "mlp"))
        self.up_proj = proj("up_proj", d, f, ("embed", "mlp"))
        self.down_proj = proj("down_proj", f, d, ("mlp", "embed"))

    def __call__(self, x, adapter_mask=None):
        m = adapter_mask
        return self.down_proj(jax.nn.silu(self.gate_proj(x, m)) * self.up_proj(x, m), m)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, lora: LoraConfig | None, *, param_dtype, dtype, attention_impl: str,
                 rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = LlamaAttention(cfg, lora, attention_impl=attention_impl, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = LlamaMLP(cfg, lora, **kw)

    def __call__(self, x, positions, mask, kv: LayerCache | None, adapter_mask=None):
        h, kv = self.self_attn(self.input_layernorm(x), positions, mask, kv, adapter_mask)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x), adapter_mask), kv


def _attention_mask(attention_mask: jax.Array, cache: KVCache | None, segment_ids: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array | None]:
    """(B, 1, L, S) mask: valid keys at or before the query's slot (and, for packed rows, in the query's segment);
    and the cache's new ``valid``."""
    b, l = attention_mask.shape
    if cache is None:
        key_valid, q_slot, k_slot = attention_mask, jnp.arange(l)[None], jnp.arange(l)
        new_valid = None
    elif cache.index.ndim == 0:
        key_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attention_mask, cache.index, axis=1)
        q_slot, k_slot = cache.index + jnp.arange(l)[None], jnp.arange(cache.max_length)
        new_valid = key_valid
    else:  # per-row write slots
        q_slot, k_slot = cache.index[:, None] + jnp.arange(l)[None], jnp.arange(cache.max_length)
        key_valid = cache.valid.at[jnp.arange(b)[:, None], q_slot].set(attention_mask, mode="drop")
        new_valid = key_valid
    causal = k_slot[None, None, :] <= q_slot[:, :, None]  # (1 or B, L, S)
    # a padded query keeps its own slot so that its (unused) row never attends to nothing
    own = k_slot[None, None, :] == q_slot[:, :, None]
    mask = causal & key_valid[:, None, :]
    if segment_ids is not None:
        if cache is not None:
            raise ValueError("segment_ids (packed rows) are for training and scoring, not for decoding with a cache")
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    mask = mask | own
    return mask[:, None], new_valid


def default_positions(attention_mask: jax.Array, cache: KVCache | None) -> jax.Array:
    """Position of each token = number of real tokens before it in its sequence (cache included)."""
    before = 0 if cache is None else cache.valid.sum(-1, keepdims=True)
    return (before + jnp.cumsum(attention_mask, axis=-1) - 1).clip(min=0).astype(jnp.int32)


REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _layer_fn(graphdef, remat: str):
    """``f(layer_state, x, positions, mask, adapter_mask) -> x`` for a layer without a cache, under ``jax.checkpoint`` with the
    configured policy (``model.remat``) unless "none". A pure function of the layer's state: ``nnx.remat`` on the
    module itself writes state back across traces and failed inside the trainer's grad + scan. (Dropout's RNG
    counter is not written back; training reseeds dropout every step.)"""

    def f(layer_state, x, positions, mask, adapter_mask):
        return nnx.merge(graphdef, layer_state, copy=True)(x, positions, mask, None, adapter_mask)[0]

    return f if remat == "none" else jax.checkpoint(f, policy=REMAT_POLICIES[remat], prevent_cse=False)


def _scan_layers(layers: nnx.Module, x, positions, mask, kv: LayerCache | None, remat: str, adapter_mask=None):
    """Run layer-stacked ``layers`` (``stack_modules``) with ``jax.lax.scan``: one layer's program, traced and compiled
    once, whatever the depth. The stacked cache travels in the carry, so each layer writes its rows in place.
    Returns x and the cache."""
    graphdef, state = nnx.split(layers)
    train_layer = _layer_fn(graphdef, remat)

    def body(carry, xs):
        x, k, v = carry
        i, layer_state = xs
        if kv is None:
            return (train_layer(layer_state, x, positions, mask, adapter_mask), k, v), None
        x, out = nnx.merge(graphdef, layer_state, copy=True)(x, positions, mask, LayerCache(k, v, i, kv.index),
                                                             adapter_mask)
        return (x, out.k, out.v), None

    n = jax.tree.leaves(state)[0].shape[0]
    k, v = (None, None) if kv is None else (kv.k, kv.v)
    (x, k, v), _ = jax.lax.scan(body, (x, k, v), (jnp.arange(n), state))
    return x, None if kv is None else kv._replace(k=k, v=v)


class LlamaForCausalLM(nnx.Module):
    """Token ids or embeddings (B, L) -> fp32 logits (B, L, V), optionally through a ``KVCache``."""

    def __init__(self, cfg: LlamaConfig, lora: LoraConfig | None = None, *, param_dtype=jnp.float32,
                 dtype=jnp.float32, attention_impl="auto", remat: str = "none", scan_layers: bool = False,
                 rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.scan_layers = scan_layers
        # static: callers (the engine, generate) build an adapter_mask only for a model that asks for one
        self.skip_video_span = bool(lora is not None and lora.enabled and lora.skip_video_span)
        self.embed_tokens = param(rngs, normal_init(0.02), (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                  param_dtype)
        layers = [LlamaDecoderLayer(cfg, lora, attention_impl=attention_impl, **kw) for _ in range(cfg.num_layers)]
        # scan_layers: the same layers (same initial values) stacked along a leading "layers" axis
        self.layers = stack_modules(layers) if scan_layers else nnx.List(layers)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else param(
            rngs, normal_init(0.02), (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype)

    def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
        """An empty cache of the form this model reads (per layer, or stacked under ``scan_layers``), in ``dtype``
        (default: the compute dtype)."""
        return init_cache(self.cfg, batch, max_length, self.dtype if dtype is None else dtype,
                          stacked=self.scan_layers)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """(B, L) ids -> (B, L, D) embeddings in the compute dtype."""
        return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.dot(hidden.astype(self.dtype), w.astype(self.dtype)).astype(jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        logits_at: jax.Array | None = None,
        adapter_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """``segment_ids`` (B, L) int: a packed row holds several sequences (1, 2, ... per token, 0 at pads); a token
        attends only within its own, and ``positions`` must then restart at each (the data pipeline writes both).
        ``logits_at`` (B,) int: compute logits only at that column of each row -> (B, 1, V) (a prefill needs only
        its last token's: L·V fewer multiply-adds). ``adapter_mask`` (B, L) bool: the LoRA adapters apply only at
        these tokens (``lora.skip_video_span``: not up to the end of a video span); None: at every token."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, l, _ = x.shape
        if cache is None and l > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {l} tokens exceeds the model's context of "
                             f"{self.cfg.max_position_embeddings} (llm.max_position_embeddings)")
        if attention_mask is None:
            attention_mask = jnp.ones((b, l), bool)
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = default_positions(attention_mask, cache)
        if cache is not None and cache.stacked != self.scan_layers:
            raise ValueError(f"a {'stacked' if cache.stacked else 'per-layer'} KV cache for a model with "
                             f"scan_layers={self.scan_layers}: build it with init_cache(..., "
                             f"stacked={self.scan_layers})")
        mask, new_valid = _attention_mask(attention_mask, cache, segment_ids)
        if self.scan_layers:
            kv = None if cache is None else LayerCache(cache.k, cache.v, 0, cache.index)
            x, kv = _scan_layers(self.layers, x, positions, mask, kv, self.remat, adapter_mask)
        elif cache is None and self.remat != "none":
            for layer in self.layers:
                graphdef, layer_state = nnx.split(layer)
                x = _layer_fn(graphdef, self.remat)(layer_state, x, positions, mask, adapter_mask)
        elif cache is None:
            for layer in self.layers:
                x = layer(x, positions, mask, None, adapter_mask)[0]
        else:
            ks, vs = list(cache.k), list(cache.v)
            for i, layer in enumerate(self.layers):
                x, out = layer(x, positions, mask, LayerCache(ks[i], vs[i], None, cache.index), adapter_mask)
                ks[i], vs[i] = out.k, out.v
            kv = LayerCache(tuple(ks), tuple(vs), None, cache.index)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at.astype(jnp.int32)[:, None, None], axis=1)
        logits = self.logits(self.norm(x))
        if cache is None:
            return logits, None
        return logits, KVCache(kv.k, kv.v, new_valid, cache.index + l)
