"""Batched generation fully inside ``jax.jit``: one prefill, then a ``lax.while_loop`` of one-token steps.

    result = generate(model, batch, SamplingConfig(max_new_tokens=64), key=jax.random.key(0))

``batch`` holds left-padded prompts (``template.pad_batch(..., side="left")``): ``input_ids`` (B, L) with video slots,
``attention_mask`` (B, L), and for video prompts ``videos`` (B, V, T, H, W, 3) + ``frame_mask`` (B, V, T). The
prefill runs vision tower, abstractor and LLM over the prompt once and fills a preallocated KV cache of
L + max_new_tokens slots; each decode step feeds one token per row. A row stops at EOS or when its last tokens spell
one of the stop sequences (the template's ``###`` that opens the next turn); the loop ends when every row has stopped
or after ``max_new_tokens``. Rows that stopped keep stepping with their output masked, so one program serves the batch.

Sampling: greedy (``temperature == 0``), or temperature with optional top-k and top-p (nucleus), with an explicit
PRNG key, so a fixed key reproduces the same tokens. Returned: tokens (B, max_new_tokens) padded with ``pad_id``
after the stop, lengths (B,), and the log-probability of each chosen token under the sampling distribution.

Compilation: the jitted function is cached per (batch, prompt length, max_new_tokens, sampling mode).
``bucket_length`` rounds prompt lengths up (powers of two from 64) so a stream of requests reuses a few programs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g4v_jax.models.gpt4video import language_model
from g4v_jax.models.llama import KVCache

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token-id sequences that end a row (besides EOS)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"bad sampling settings: temperature={self.temperature}, top_k={self.top_k}, "
                             f"top_p={self.top_p}")


class GenerationResult(NamedTuple):
    tokens: np.ndarray  # (B, max_new_tokens) int32, pad_id after each row's end
    lengths: np.ndarray  # (B,) generated tokens per row (the stop token included)
    logprobs: np.ndarray  # (B, max_new_tokens) float32, 0 after the end


def pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1): the shapes that keep compiled programs few."""
    return 1 << (max(n, 1) - 1).bit_length()


def bucket_length(n: int, minimum: int = 64) -> int:
    """Prompt length rounded up to a power of two (>= ``minimum``): few shapes, few compiles."""
    return max(minimum, pow2(n))


def stop_sequences_for(tokenizer, strings: Sequence[str] = ("###",)) -> tuple[tuple[int, ...], ...]:
    """Token sequences a tokenizer may produce for each stop string, with and without a leading space."""
    seqs = set()
    for s in strings:
        for variant in (s, " " + s):
            ids = tuple(tokenizer.encode(variant, add_special_tokens=False))
            if ids:
                seqs.add(ids)
    return tuple(sorted(seqs))


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Mask (to -inf) every token outside the top-k and outside the smallest set with probability >= top_p."""
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep a token while the mass before it is < top_p (the most likely token is always kept)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, NEG_INF, logits)
    return logits


def choose(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Next token (B,) and its log-probability under the (filtered, tempered) distribution."""
    logits = logits.astype(jnp.float32)
    if cfg.temperature == 0:
        token = jnp.argmax(logits, axis=-1)
        return token.astype(jnp.int32), jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], -1)[:, 0]
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    token = jax.random.categorical(key, logits, axis=-1)
    return token.astype(jnp.int32), jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], -1)[:, 0]


def _ends_with(history: jax.Array, n: jax.Array, seq: tuple[int, ...]) -> jax.Array:
    """Rows whose first ``n`` tokens of ``history`` (B, M) end with ``seq``."""
    k = len(seq)
    idx = n[:, None] - k + jnp.arange(k)[None, :]
    window = jnp.take_along_axis(history, jnp.clip(idx, 0, history.shape[1] - 1), axis=1)
    return (n >= k) & jnp.all(window == jnp.asarray(seq)[None, :], axis=1)


class _Loop(NamedTuple):
    step: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    done: jax.Array
    last: jax.Array
    cache: KVCache
    key: jax.Array


def _prefill(model, batch: Mapping[str, jax.Array], key, cfg: SamplingConfig, eos_id: int, pad_id: int,
             cache_dtype) -> _Loop:
    """Run the prompt (videos included) into a fresh cache and choose each row's first token."""
    lm = language_model(model)
    ids, mask = batch["input_ids"], batch["attention_mask"].astype(bool)
    b, l = ids.shape
    cache = lm.init_cache(b, l + cfg.max_new_tokens, cache_dtype)
    last = jnp.full((b,), l - 1, jnp.int32)  # left padding: the last column is every row's last token
    adapter_mask = None
    if lm.skip_video_span:  # pad_batch's mask; without one (a text prompt) the adapters act everywhere
        adapter_mask = batch.get("adapter_mask", mask).astype(bool)
    if lm is not model:
        logits, cache = model(ids, videos=batch.get("videos"), frame_mask=batch.get("frame_mask"),
                              video_features=batch.get("video_features"), attention_mask=mask, cache=cache,
                              logits_at=last, adapter_mask=adapter_mask)
    else:
        logits, cache = model(ids, attention_mask=mask, cache=cache, logits_at=last, adapter_mask=adapter_mask)
    key, sub = jax.random.split(key)
    first, first_lp = choose(logits[:, 0], sub, cfg)
    m = cfg.max_new_tokens
    tokens = jnp.full((b, m), pad_id, jnp.int32).at[:, 0].set(first)
    logprobs = jnp.zeros((b, m), jnp.float32).at[:, 0].set(first_lp)
    lengths = jnp.ones((b,), jnp.int32)
    done = _stopped(first, tokens, lengths, cfg, eos_id)
    return _Loop(jnp.ones((), jnp.int32), tokens, logprobs, lengths, done, first, cache, key)


def _decode_step(lm, s: _Loop, cfg: SamplingConfig, eos_id: int, pad_id: int) -> _Loop:
    """One token for every row; rows already done get ``pad_id`` and stay done."""
    b = s.last.shape[0]
    logits, cache = lm(s.last[:, None], attention_mask=jnp.ones((b, 1), bool), cache=s.cache)
    key, sub = jax.random.split(s.key)
    tok, lp = choose(logits[:, 0], sub, cfg)
    tok = jnp.where(s.done, pad_id, tok)
    tokens = s.tokens.at[:, s.step].set(tok)
    logprobs = s.logprobs.at[:, s.step].set(jnp.where(s.done, 0.0, lp))
    lengths = s.lengths + (~s.done).astype(jnp.int32)
    done = s.done | _stopped(tok, tokens, lengths, cfg, eos_id)
    return _Loop(s.step + 1, tokens, logprobs, lengths, done, tok, cache, key)


def _generate(graphdef, state, batch: Mapping[str, jax.Array], key, *, cfg: SamplingConfig, eos_id: int,
              pad_id: int, cache_dtype):
    model = nnx.merge(graphdef, state)
    lm = language_model(model)
    start = _prefill(model, batch, key, cfg, eos_id, pad_id, cache_dtype)
    out = jax.lax.while_loop(lambda s: (s.step < cfg.max_new_tokens) & ~jnp.all(s.done),
                             lambda s: _decode_step(lm, s, cfg, eos_id, pad_id), start)
    return out.tokens, out.lengths, out.logprobs


def _stopped(tok, tokens, lengths, cfg: SamplingConfig, eos_id: int) -> jax.Array:
    stop = tok == eos_id
    for seq in cfg.stop_sequences:
        stop = stop | _ends_with(tokens, lengths, seq)
    return stop


@functools.lru_cache(maxsize=64)
def _compiled(graphdef, cfg: SamplingConfig, eos_id: int, pad_id: int, cache_dtype):
    return jax.jit(functools.partial(_generate, graphdef, cfg=cfg, eos_id=eos_id, pad_id=pad_id,
                                     cache_dtype=cache_dtype))


def _check_batch(model, batch: Mapping[str, Any], cfg: SamplingConfig) -> None:
    lm = language_model(model)
    ids = np.asarray(batch["input_ids"])
    if ids.shape[1] + cfg.max_new_tokens > lm.cfg.max_position_embeddings:
        raise ValueError(f"prompt of {ids.shape[1]} tokens + {cfg.max_new_tokens} new tokens exceeds the model's "
                         f"context of {lm.cfg.max_position_embeddings}")
    mask = np.asarray(batch["attention_mask"]).astype(bool)
    if not mask[:, -1].all():
        raise ValueError("prompts must be left-padded (template.pad_batch(..., side='left')): the last column holds "
                         "padding in some rows")


def _inputs(batch: Mapping[str, Any]) -> dict:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "adapter_mask", "videos",
                                                     "frame_mask", "video_features")}


def generate(model: nnx.Module, batch: Mapping[str, Any], cfg: SamplingConfig, *, key: jax.Array | None = None,
             eos_id: int, pad_id: int = 0) -> GenerationResult:
    """Generate for a left-padded batch (see the module docstring); ``model`` is a GPT4Video or a LLaMA."""
    _check_batch(model, batch, cfg)
    graphdef, state = nnx.split(model)
    fn = _compiled(graphdef, cfg, int(eos_id), int(pad_id), jnp.dtype(language_model(model).dtype))
    tokens, lengths, logprobs = fn(state, _inputs(batch), key if key is not None else jax.random.key(0))
    return GenerationResult(np.asarray(tokens), np.asarray(lengths), np.asarray(logprobs))


@functools.lru_cache(maxsize=64)
def _compiled_stream(graphdef, cfg: SamplingConfig, eos_id: int, pad_id: int, cache_dtype):
    def prefill(state, batch, key):
        return _prefill(nnx.merge(graphdef, state), batch, key, cfg, eos_id, pad_id, cache_dtype)

    def step(state, s):
        return _decode_step(language_model(nnx.merge(graphdef, state)), s, cfg, eos_id, pad_id)

    return jax.jit(prefill), jax.jit(step, donate_argnums=(1,))


def stream(model: nnx.Module, batch: Mapping[str, Any], cfg: SamplingConfig, *, key: jax.Array | None = None,
           eos_id: int, pad_id: int = 0) -> Iterator[np.ndarray]:
    """Like ``generate`` but yields each step's tokens (B,) as soon as they exist (interactive chat). The same
    prefill and step functions as ``generate``, driven from Python one token at a time; stops when every row is
    done. Rows already done yield ``pad_id``."""
    _check_batch(model, batch, cfg)
    graphdef, state = nnx.split(model)
    prefill, step = _compiled_stream(graphdef, cfg, int(eos_id), int(pad_id), jnp.dtype(language_model(model).dtype))
    s = prefill(state, _inputs(batch), key if key is not None else jax.random.key(0))
    yield np.asarray(s.last)
    while int(s.step) < cfg.max_new_tokens and not bool(np.all(np.asarray(s.done))):
        s = step(state, s)
        yield np.asarray(s.last)
