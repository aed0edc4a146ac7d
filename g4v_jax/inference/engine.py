"""Continuous batching: many requests decoded together by one compiled step, each in its own slot of one KV cache.

(~790 lines: the slot table, the prefix cache, the compiled programs and the host loop are one state machine; split,
each part would reach into the others' private state.)

    engine = Engine(model, tokenizer, EngineConfig(num_slots=8, max_length=1024))
    handle = engine.submit(EngineRequest(prompt_ids, clips, SamplingConfig(64, temperature=0.7), seed=1),
                           on_text=print)
    engine.run()            # until every submitted request is finished; a server thread calls serve_forever()
    handle.result()         # EngineResult: tokens, answer text, finish reason, timings

The shape is JetStream's (MaxText's engine): ``prefill`` -> ``insert(prefix, decode_state, slot)`` -> ``generate``,
with a queue of free slots. Three jitted programs, all over the preallocated decode state:

- ``encode`` (N, T, H, W, 3) frames + (N, T) mask -> (N, K, D) video tokens. The videos of every request admitted
  in one scheduling round are encoded together, N padded to a power of two; tokens are kept by the frames' content
  hash (``video_cache_mb``, LRU), so a video sent again is not encoded again.
- ``extend`` one chunk of a prompt (at most ``prefill_chunk`` tokens, padded to a power-of-two bucket: one program
  per bucket) into row ``slot`` of the (num_slots, max_length) cache, after a prefix already in the cache; the
  request's first token is sampled after its last chunk. Chunks of long prompts alternate with decode steps, so
  running requests keep streaming while a long prompt is read.
- ``step`` one token for every slot: each slot writes at its own cache position and samples with its own
  temperature / top-k / top-p and key ``fold_in(key(seed), tokens so far)``, so a seeded request's tokens do not
  depend on its neighbours or its slot. Inactive slots compute but write nothing that is read. One program.

Prefix cache (``prefix_cache``): a finished request's keys and values stay in its slot. A prompt is a sequence of
keys, token ids and, for video slots, the video's content hash with the slot's place in the span, so the same
conversation resent with its videos matches. A new request takes the free slot holding the longest common prefix
and prefills only the rest; or, when a running request holds a longer one, a free slot that first copies that
prefix (concurrent requests share a system prompt or a video); or the least recently used free slot, whose prefix is
then dropped. Slot retention rather than SGLang's radix tree or vLLM's hashed pages: the cache stays one
preallocated array per slot, as the decode step wants it, and a conversation, the workload here, is one growing
prefix per user; the price is that a prefix lives only as long as its slot is not reused.
- ``step`` one token for every slot: each slot writes at its own cache position and samples with its own
  temperature / top-k / top-p and key ``fold_in(key(seed), tokens so far)``, so a seeded request's tokens do not
  depend on its neighbours or its slot. Inactive slots compute but write nothing that is read. One program.

The host loop between steps: tokens come back, each active request's stop rules are checked (EOS, its stop token
sequences, its stop strings in the decoded text, its token budget, a cancel), its text pieces are streamed
(``StreamDecoder``), and a finished slot is refilled from the queue before the next step. A request whose prompt plus
budget does not fit a slot is refused at ``submit`` with ``RequestError`` naming the numbers, never an OOM.

A failure while serving one request (its prefill, its stop rules, its callbacks) finishes that request with
``finish_reason="error"`` and the engine goes on; a failed decode step fails the requests then in their slots, and
the next round starts from a fresh decode state. ``serve_forever`` never ends on a request's account.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g4v_jax.config import ConfigError, EngineConfig
from g4v_jax.inference.generate import NEG_INF, SamplingConfig, pow2
from g4v_jax.inference.text import StreamDecoder
from g4v_jax.models.gpt4video import language_model, model_kind
from g4v_jax.models.llama import KVCache


logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine refuses (too long for a slot, too many videos, bad ids); the others go on."""


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    """One conversation to continue. ``prompt_ids`` (n,) int with negative ids at the video slots (K per video, as
    the template writes them); ``videos`` one (frames (T, H, W, 3) uint8, frame mask (T,)) per video, in order."""

    prompt_ids: np.ndarray
    videos: Sequence[tuple[np.ndarray, np.ndarray]] = ()
    sampling: SamplingConfig = SamplingConfig()
    seed: int = 0
    stop_strings: tuple[str, ...] = ("###",)  # the text ends before the first of these (the next turn's prefix)
    id: Any = None
    # prompt tokens up to the end of its last video span (TokenizedConversation.video_prefix): a model with
    # lora.skip_video_span reads them without its adapters
    video_prefix: int = 0

    @classmethod
    def from_conversation(cls, conv, videos: Sequence[tuple[np.ndarray, np.ndarray]] = (), sampling=SamplingConfig(),
                          **kwargs) -> "EngineRequest":
        """The request continuing a ``template.TokenizedConversation`` (its ids and its video span)."""
        return cls(conv.input_ids, videos, sampling, video_prefix=conv.video_prefix, **kwargs)


@dataclasses.dataclass
class EngineResult:
    id: Any
    tokens: list[int]  # generated ids, the stop token included
    logprobs: list[float]
    text: str  # the answer: decoded, cut before the first stop string, whitespace-stripped ("" without tokenizer)
    finish_reason: str  # eos | stop | length | cancelled | error
    prompt_tokens: int
    submitted: float  # time.perf_counter() stamps
    token_times: list[float]  # when each token reached the host
    error: str | None = None  # finish_reason "error": what failed ("ExceptionType: message"); the engine went on

    @property
    def ttft(self) -> float:
        """Seconds from submit to the first token (nan if none)."""
        return self.token_times[0] - self.submitted if self.token_times else math.nan


class RequestHandle:
    """What ``submit`` returns: wait for the result, or cancel (its slot is freed before the next step)."""

    def __init__(self, request: EngineRequest, on_text, on_done, engine: "Engine") -> None:
        self.request, self.on_text, self.on_done = request, on_text, on_done
        self._engine = engine
        self._done = threading.Event()
        self._result: EngineResult | None = None
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.video_hashes: list[int] = []  # the videos' content hashes and the prompt's prefix-cache keys (submit)
        self.keys: np.ndarray | None = None

    def cancel(self) -> None:
        self.cancelled = True
        self._engine._wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> EngineResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request.id!r} is not finished after {timeout} s")
        return self._result  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------------
# Device programs
# --------------------------------------------------------------------------------------------------------------------


class DecodeState(NamedTuple):
    """Everything ``step`` reads and writes, one row per slot."""

    cache: KVCache  # per layer k (slots, H_kv, S, Dh), v (slots, H_kv, Dh, S); valid (slots, S); index (slots,)
    tokens: jax.Array  # (slots,) int32: each slot's last token (the next step's input)
    logprobs: jax.Array  # (slots,) float32: its log-probability under the slot's sampling distribution
    count: jax.Array  # (slots,) int32: tokens generated so far (folds the sampling key)
    seed: jax.Array  # (slots,) uint32
    temperature: jax.Array  # (slots,) float32, 0: greedy
    top_k: jax.Array  # (slots,) int32, 0: off
    top_p: jax.Array  # (slots,) float32, 1: off


def sample_rows(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, seed: jax.Array,
                count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row sampling: logits (B, V) float32 -> token (B,) int32 and its log-probability (B,).

    Greedy rows (temperature 0) take the argmax; the others sample from logits / temperature, restricted to their
    top-k and then to the smallest set of mass >= top-p (``generate.filter_logits``'s rules), with the key
    ``fold_in(key(seed), count)``. A batch with no sampled row skips the sort."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    vocab = logits.shape[-1]

    def sampled(_):
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
        ordered = jnp.where(jnp.arange(vocab)[None] < k[:, None], ordered, NEG_INF)
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # the most likely token is always kept
        cutoff = jnp.min(jnp.where(before < top_p[:, None], ordered, jnp.inf), axis=-1, keepdims=True)
        filtered = jnp.where((scaled < kth) | (scaled < cutoff), NEG_INF, scaled)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seed, count)
        drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        token = jnp.where(temperature > 0, drawn, greedy)
        logp = jnp.where((temperature > 0)[:, None], jax.nn.log_softmax(filtered), jax.nn.log_softmax(logits))
        return token, logp

    def greedy_only(_):
        return greedy, jax.nn.log_softmax(logits)

    token, logp = jax.lax.cond(jnp.any(temperature > 0), sampled, greedy_only, None)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def _encode(graphdef, state, frames, frame_mask):
    return nnx.merge(graphdef, state).encode_videos(frames, frame_mask)


def _extend(graphdef, state, ds: DecodeState, ids, video_rows, video_flat, start, n, src, slot, seed, temperature,
            top_k, top_p, video_prefix) -> DecodeState:
    """One chunk of a prompt into row ``slot`` of the cache: ids (1, C) with ``n`` real tokens go at positions
    ``start`` .. ``start + n``, attending to the first ``start`` positions of row ``src`` (the same slot's retained
    prefix, another slot's live prefix being shared, or nothing when ``start`` is 0) and to themselves; the next token
    is sampled from the chunk's last real position (the host keeps it only after the prompt's last chunk).

    Video slots (negative ids) take row ``video_rows`` (1, C) of the request's video tokens ``video_flat``
    (max_videos * K, D); under ``lora.skip_video_span`` the adapters skip positions before ``video_prefix``."""
    model = nnx.merge(graphdef, state)
    lm = language_model(model)
    chunk = ids.shape[1]
    embeds = lm.embed(jnp.where(ids < 0, 0, ids))
    if video_flat is not None:
        video = video_flat[jnp.clip(video_rows, 0)].astype(embeds.dtype)
        embeds = jnp.where((video_rows >= 0)[..., None], video, embeds)
    cache = ds.cache
    row = cache.rows(src, 1)._replace(valid=(jnp.arange(cache.max_length) < start)[None], index=start[None])
    adapter_mask = ((start + jnp.arange(chunk)) >= video_prefix)[None] if lm.skip_video_span else None
    logits, row = lm(inputs_embeds=embeds, attention_mask=(jnp.arange(chunk) < n)[None], cache=row,
                     logits_at=(n - 1)[None], adapter_mask=adapter_mask)
    cache = cache.put_rows(row._replace(index=(start + n)[None]), slot)
    token, logp = sample_rows(logits[:, 0], temperature[None], top_k[None], top_p[None], seed[None],
                              jnp.zeros((1,), jnp.int32))
    return DecodeState(cache, ds.tokens.at[slot].set(token[0]), ds.logprobs.at[slot].set(logp[0]),
                       ds.count.at[slot].set(1), ds.seed.at[slot].set(seed), ds.temperature.at[slot].set(temperature),
                       ds.top_k.at[slot].set(top_k), ds.top_p.at[slot].set(top_p))


def _step(graphdef, state, ds: DecodeState, active) -> DecodeState:
    """One token for every slot; inactive slots keep their cache position and their last token."""
    lm = language_model(nnx.merge(graphdef, state))
    logits, cache = lm(ds.tokens[:, None], attention_mask=active[:, None], cache=ds.cache)
    cache = cache._replace(index=jnp.where(active, ds.cache.index + 1, ds.cache.index))
    token, logp = sample_rows(logits[:, 0], ds.temperature, ds.top_k, ds.top_p, ds.seed, ds.count)
    return ds._replace(cache=cache, tokens=jnp.where(active, token, ds.tokens),
                       logprobs=jnp.where(active, logp, ds.logprobs), count=ds.count + active.astype(jnp.int32))


class Programs:
    """The jitted programs of one model structure, shared by every engine on it (compiled once per shape).

    They take the weights as a flat list of arrays (``treedef`` rebuilds the nnx State): flattening a list costs
    nothing at dispatch, flattening the nnx State costs about 0.5 ms per call, a sixth of a tiny model's step."""

    def __init__(self, graphdef, treedef) -> None:
        self.traces: collections.Counter = collections.Counter()  # program name -> times traced (= compiled)

        def counted(name, fn):
            def traced(leaves, *args):
                self.traces[f"{name}{_shape_tag(name, args)}"] += 1
                return fn(graphdef, jax.tree.unflatten(treedef, leaves), *args)
            return traced

        self.encode = jax.jit(counted("encode", _encode))
        self.extend = jax.jit(counted("extend", _extend), donate_argnums=(1,))
        self.step = jax.jit(counted("step", _step), donate_argnums=(1,))


def _shape_tag(name: str, args) -> str:
    if name == "encode":
        return f"[{args[0].shape[0]} videos]"
    if name == "extend":
        return f"[{args[1].shape[1]} tokens]"
    return ""


@functools.lru_cache(maxsize=8)
def programs_for(graphdef, treedef) -> Programs:
    return Programs(graphdef, treedef)


# --------------------------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------------------------


def _ends_with(tokens: list[int], seq: tuple[int, ...]) -> bool:
    return len(tokens) >= len(seq) and tuple(tokens[-len(seq):]) == seq


class _Active:
    """Host-side state of a request in a slot: its prompt's keys, how much of it is in the cache (``filled``), where
    its first chunk reads its prefix from (``src``), and what it generated."""

    def __init__(self, handle: RequestHandle, decoder, keys: np.ndarray | None = None, start: int = 0,
                 src: int = -1) -> None:
        self.handle = handle
        self.decoder = decoder
        self.keys = keys
        self.filled, self.src, self.first = start, src, start
        self.video_flat = None  # device (max_videos * K, D) video tokens for the chunks, when they need any
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.times: list[float] = []

    @property
    def prefilling(self) -> bool:
        return self.keys is not None and self.filled < len(self.keys)

    def cached_keys(self) -> np.ndarray:
        """The keys of what this request's row of the cache holds now (prompt so far, then all but the last token)."""
        if self.prefilling:
            return self.keys[:self.filled]
        return np.concatenate([self.keys, np.asarray(self.tokens[:-1], np.int64)])


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    prefills: int = 0
    prefill_chunks: int = 0
    prefill_tokens: int = 0  # prompt tokens computed
    prefix_hit_tokens: int = 0  # prompt tokens taken from the prefix cache instead
    encoded_videos: int = 0
    video_cache_hits: int = 0  # videos whose tokens came from the video cache
    generated_tokens: int = 0
    finished: int = 0
    slot_steps: int = 0  # sum over steps of occupied slots (occupancy = slot_steps / (steps * num_slots))


def _video_hash(frames: np.ndarray, mask: np.ndarray) -> int:
    digest = hashlib.blake2b(np.ascontiguousarray(frames).tobytes(), digest_size=8)
    digest.update(np.ascontiguousarray(mask, bool).tobytes())
    return int.from_bytes(digest.digest(), "little") & (2**62 - 1)


def prompt_keys(ids: np.ndarray, video_hashes: Sequence[int], tokens_per_video: int) -> np.ndarray:
    """(n,) int64: token ids as they are, and each video slot a negative key made of its video's content hash and
    its place in the span, so that prompts holding the same videos at the same places compare equal."""
    keys = np.asarray(ids, np.int64).copy()
    slots = np.flatnonzero(keys < 0)
    for i, h in enumerate(video_hashes):
        span = slots[i * tokens_per_video:(i + 1) * tokens_per_video]
        keys[span] = [-1 - ((h ^ (j * 0x9E3779B97F4A7C15)) & (2**62 - 1)) for j in range(len(span))]
    return keys


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = a[:n] != b[:n]
    return int(np.argmax(differ)) if differ.any() else n


class Engine:
    """Slots, queue and the host loop (module docstring). ``model`` is a loaded ``gpt4video`` or ``llm`` model;
    ``tokenizer`` (optional) decodes streamed text and stop strings; ``eos_id`` defaults to the tokenizer's.

    Thread-safe ``submit``/``cancel``: a server submits from its handlers while one thread runs ``serve_forever``.
    Callbacks (``on_text(piece)``, ``on_done(result)``) run on the engine's thread and must not block it.
    """

    def __init__(self, model, tokenizer=None, cfg: EngineConfig = EngineConfig(), *, eos_id: int | None = None
                 ) -> None:
        kind = model_kind(model)
        if kind not in ("gpt4video", "llm"):
            raise TypeError(f"the engine needs a gpt4video or llm model, got a {kind} model")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self._lm = language_model(model)
        self.lm_cfg = self._lm.cfg
        self.has_vision = kind == "gpt4video"
        self.num_video_tokens = model.cfg.num_video_tokens if self.has_vision else 0
        if eos_id is None:
            eos_id = getattr(tokenizer, "eos_token_id", None)
        self.eos_id = -1 if eos_id is None else int(eos_id)
        graphdef, state = nnx.split(model)
        self.state, treedef = jax.tree.flatten(state)
        self.programs = programs_for(graphdef, treedef)
        self._dtype = jnp.dtype(language_model(model).dtype)
        self._video_tokens_shape = self._frame_shape = None
        if self.has_vision:
            self._video_tokens_shape = (1, cfg.max_videos, self.num_video_tokens, model.cfg.llm.hidden_size)
            size = model.cfg.vision.image_size
            self._frame_shape = (model.cfg.num_frames, size, size, 3)
        self._check_memory()
        # the video tokens of a chunk that reads none (None for a text-only model)
        self._zeros_flat = (jnp.zeros((cfg.max_videos * self.num_video_tokens, self.lm_cfg.hidden_size), self._dtype)
                            if self.has_vision else None)
        self.ds = self._empty_state()
        self.slots: list[_Active | None] = [None] * cfg.num_slots
        # per slot: the keys of the prefix a free slot still holds, and when it was last used (LRU eviction)
        self.retained: list[np.ndarray | None] = [None] * cfg.num_slots
        self.last_used = [-1] * cfg.num_slots
        self._clock = 0
        self.video_tokens: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self.queue: collections.deque[RequestHandle] = collections.deque()
        self.stats = EngineStats()
        self._lock = threading.Condition()
        self._active: tuple[np.ndarray, jax.Array] | None = None  # the last step's slot mask, host and device

    # ---------------------------------------------------------------------------------------------------- requests

    @property
    def cache_bytes(self) -> int:
        c = self.lm_cfg
        return 2 * c.num_layers * self.cfg.num_slots * self.cfg.max_length * c.num_kv_heads * c.head_size * \
            self._dtype.itemsize

    def _check_memory(self) -> None:
        """Refuse a cache the device cannot hold, naming the settings, before allocating it (GPU/TPU report their
        memory; the CPU does not, and is not checked)."""
        stats = jax.devices()[0].memory_stats() or {}
        free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
        if stats.get("bytes_limit") and self.cache_bytes > free:
            raise ConfigError(f"the KV cache of engine.num_slots={self.cfg.num_slots} x engine.max_length="
                              f"{self.cfg.max_length} needs {self.cache_bytes / 2**30:.2f} GiB but the device has "
                              f"{free / 2**30:.2f} GiB free; lower one of them")

    def _empty_state(self) -> DecodeState:
        s = self.cfg.num_slots
        cache = self._lm.init_cache(s, self.cfg.max_length, self._dtype)
        cache = cache._replace(index=jnp.zeros((s,), jnp.int32))
        return DecodeState(cache, jnp.zeros((s,), jnp.int32), jnp.zeros((s,), jnp.float32),
                           jnp.zeros((s,), jnp.int32), jnp.zeros((s,), jnp.uint32), jnp.zeros((s,), jnp.float32),
                           jnp.zeros((s,), jnp.int32), jnp.ones((s,), jnp.float32))

    def check(self, request: EngineRequest) -> None:
        """Raise ``RequestError`` if the engine cannot serve ``request`` (what ``submit`` refuses)."""
        ids = np.asarray(request.prompt_ids)
        n, budget = int(ids.shape[0]) if ids.ndim == 1 else -1, request.sampling.max_new_tokens
        if ids.ndim != 1 or n < 1 or not np.issubdtype(ids.dtype, np.integer):
            raise RequestError(f"prompt_ids must be a non-empty 1-D integer array, got shape {ids.shape}")
        room = min(self.cfg.max_length, self.lm_cfg.max_position_embeddings)
        if n + budget > room:
            what = ("engine.max_length" if self.cfg.max_length <= self.lm_cfg.max_position_embeddings
                    else "the model's context")
            raise RequestError(f"a prompt of {n} tokens + max_new_tokens={budget} does not fit {what} of {room} "
                               f"tokens; shorten the conversation or lower max_new_tokens")
        if int(ids.max()) >= self.lm_cfg.vocab_size:
            raise RequestError(f"token id {int(ids.max())} is outside the model's vocabulary of "
                               f"{self.lm_cfg.vocab_size}")
        s = request.sampling
        if not (0 <= s.top_k < 2**31 and -2**63 <= request.seed < 2**64 and math.isfinite(s.temperature)
                and math.isfinite(s.top_p)):
            raise RequestError(f"sampling settings out of range: top_k={s.top_k} (0 <= top_k < 2**31), seed="
                               f"{request.seed} (-2**63 <= seed < 2**64), temperature={s.temperature}, top_p={s.top_p}")
        slots = int((ids < 0).sum())
        if request.videos and not self.has_vision:
            raise RequestError("this model is a text-only LLM: it cannot take videos")
        if len(request.videos) > self.cfg.max_videos:
            raise RequestError(f"{len(request.videos)} videos in one request; this engine takes at most "
                               f"{self.cfg.max_videos} (engine.max_videos)")
        if slots != len(request.videos) * self.num_video_tokens:
            raise RequestError(f"the prompt has {slots} video slots but {len(request.videos)} videos of "
                               f"{self.num_video_tokens} tokens were given")
        for i, (frames, mask) in enumerate(request.videos):
            if (np.shape(frames) != self._frame_shape or np.asarray(frames).dtype != np.uint8
                    or np.shape(mask) != self._frame_shape[:1]):
                raise RequestError(f"video {i} has frames {np.asarray(frames).dtype} {np.shape(frames)} and mask "
                                   f"{np.shape(mask)}; this model reads uint8 frames {self._frame_shape} and a mask "
                                   f"({self._frame_shape[0]},)")

    def submit(self, request: EngineRequest, *, on_text: Callable[[str], None] | None = None,
               on_done: Callable[[EngineResult], None] | None = None) -> RequestHandle:
        """Queue ``request``; ``RequestError`` if it can never be served, or if the queue is full."""
        self.check(request)
        handle = RequestHandle(request, on_text, on_done, self)
        # the prompt's prefix-cache keys, hashed here on the caller's thread rather than in the engine's loop
        handle.video_hashes = [_video_hash(f, m) for f, m in request.videos]
        handle.keys = prompt_keys(request.prompt_ids, handle.video_hashes, self.num_video_tokens)
        with self._lock:
            if len(self.queue) >= self.cfg.max_queue + self.free_slots():
                raise RequestError(f"the queue is full ({len(self.queue)} waiting; engine.max_queue)")
            self.queue.append(handle)
            self._lock.notify_all()
        return handle

    def warmup(self, buckets: Sequence[int] | None = None) -> None:
        """Compile every program the engine can need (each chunk bucket up to ``prefill_chunk`` or the ``buckets``
        given, each power-of-two video batch up to ``num_slots * max_videos``, the step) on dummy inputs, so that no
        request ever waits for a compile. The decode state is reset afterwards."""
        if self.busy:
            raise RuntimeError("warmup() needs an idle engine")
        if buckets is None:
            buckets, b = [], self._bucket(1)
            while b not in buckets:
                buckets.append(b)
                b = self._bucket(b + 1)
        if self.has_vision:
            n = 1
            while n <= pow2(self.cfg.num_slots * self.cfg.max_videos):
                frames = np.zeros((n, *self._frame_shape), np.uint8)
                self.programs.encode(self.state, jax.device_put(frames), jnp.zeros((n, self._frame_shape[0]), bool))
                n *= 2
        for bucket in buckets:
            self.ds = self.programs.extend(
                self.state, self.ds, jnp.zeros((1, bucket), jnp.int32), jnp.full((1, bucket), -1, jnp.int32),
                self._zeros_flat, jnp.int32(0), jnp.int32(1), jnp.int32(0), jnp.int32(0), jnp.uint32(0),
                jnp.float32(0), jnp.int32(0), jnp.float32(1), jnp.int32(0))
        self.ds = self.programs.step(self.state, self.ds, jnp.zeros((self.cfg.num_slots,), bool))
        jax.block_until_ready(self.ds)
        self.ds = self._empty_state()
        self.retained = [None] * self.cfg.num_slots

    def free_slots(self) -> int:
        return sum(a is None for a in self.slots)

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(a is not None for a in self.slots)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # ---------------------------------------------------------------------------------------------------- the loop

    def run(self) -> None:
        """Serve until the queue is empty and every slot is free (batch mode, tests)."""
        while self.busy:
            self.run_once()

    def serve_forever(self, stop: threading.Event) -> None:
        """Serve on this thread until ``stop`` is set; sleeps while there is nothing to do."""
        while not stop.is_set():
            with self._lock:
                while not self.busy and not stop.is_set():
                    self._lock.wait(0.5)
            if not stop.is_set():
                try:
                    self.run_once()
                except Exception:  # noqa: BLE001 - a bug of the loop itself: its requests fail, the engine goes on
                    logger.exception("the engine's scheduling round failed")
                    self._reset("the engine's scheduling round failed")

    def close(self, stop: threading.Event) -> None:
        """End ``serve_forever(stop)`` now, even while it waits for work."""
        stop.set()
        self._wake()

    def run_once(self) -> None:
        """One scheduling round: drop cancelled requests, fill free slots from the queue, prefill up to
        ``prefill_chunk`` prompt tokens (all that wait, when nothing is decoding), decode one token."""
        for i, a in enumerate(self.slots):
            if a is not None and a.handle.cancelled:
                self._finish(i, "cancelled")
        admitted = self._admit()
        if admitted:
            self._prepare_videos(admitted)
        self._prefill_round()
        active = np.array([a is not None and not a.prefilling for a in self.slots])
        if not active.any():
            return
        if self._active is None or not np.array_equal(self._active[0], active):
            self._active = (active, jax.device_put(active))
        try:
            self.ds = self.programs.step(self.state, self.ds, self._active[1])
            tokens, logprobs = jax.device_get((self.ds.tokens, self.ds.logprobs))
        except Exception as e:  # noqa: BLE001 - the requests in the slots fail; the engine goes on
            for i in np.flatnonzero(active):
                self._fail(int(i), e)
            self._recover()
            return
        now = time.perf_counter()
        self.stats.steps += 1
        self.stats.slot_steps += int(active.sum())
        for i in np.flatnonzero(active):
            self._take(int(i), int(tokens[i]), float(logprobs[i]), now)

    def _fail(self, slot: int, error: Exception) -> None:
        """Finish the request in ``slot`` with ``finish_reason="error"`` (its row's content is not trusted)."""
        a = self.slots[slot]
        self.slots[slot] = None
        self.retained[slot] = None
        if a is not None:
            self._deliver(a.handle, a, "error", error=f"{type(error).__name__}: {error}")

    def _recover(self) -> None:
        """After a failed program: a decode state whose buffers a donating call consumed is rebuilt (every slot's
        request must then go: their caches are gone)."""
        if any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(self.ds)):
            self._reset("the decode state was lost to another request's failure")

    def _reset(self, why: str) -> None:
        """A fresh decode state: every request in a slot fails with ``why``, and no slot holds a prefix any more."""
        for i, a in enumerate(self.slots):
            if a is not None:
                self._fail(i, RuntimeError(why))
        self.ds = self._empty_state()
        self.retained = [None] * self.cfg.num_slots

    # ------------------------------------------------------------------------------------------- admission, prefill

    def _admit(self) -> list[int]:
        """Slots given to queued requests this round, each placed after its longest cached prefix."""
        admitted = []
        with self._lock:
            while self.queue and any(a is None for a in self.slots):
                handle = self.queue.popleft()
                if handle.cancelled:
                    self._deliver(handle, _Active(handle, None), "cancelled")
                    continue
                slot, src, start = self._place(handle.keys)
                self.slots[slot] = _Active(handle, self._decoder(handle.request), handle.keys, start, src)
                self.retained[slot] = None
                self.stats.prefix_hit_tokens += start
                admitted.append(slot)
        return admitted

    def _place(self, keys: np.ndarray) -> tuple[int, int, int]:
        """(the free slot to use, the slot its prefix is read from, the prefix's length) for a prompt of ``keys``;
        at least the prompt's last token is always computed (its logits give the first token)."""
        free = sorted((i for i, a in enumerate(self.slots) if a is None), key=lambda i: self.last_used[i])
        if not self.cfg.prefix_cache:
            return free[0], free[0], 0
        limit = len(keys) - 1
        best_free = max(free, key=lambda i: (self._match(self.retained[i], keys, limit), self.last_used[i]))
        m_free = self._match(self.retained[best_free], keys, limit)
        live = [(self._match(a.cached_keys(), keys, limit), i) for i, a in enumerate(self.slots) if a is not None]
        m_live, src = max(live, default=(0, -1))
        if m_free >= m_live and m_free > 0:
            return best_free, best_free, m_free
        # a running request holds more of it: copy its prefix into the free slot whose own prefix is worth least
        slot = min(free, key=lambda i: (self.retained[i] is not None, self.last_used[i]))
        return (slot, src, m_live) if m_live > 0 else (slot, slot, 0)

    @staticmethod
    def _match(cached: np.ndarray | None, keys: np.ndarray, limit: int) -> int:
        return 0 if cached is None else min(common_prefix(cached, keys), limit)

    def _decoder(self, request: EngineRequest):
        if self.tokenizer is None:
            return None
        return StreamDecoder(self.tokenizer, stops=request.stop_strings)

    def _prepare_videos(self, admitted: list[int]) -> None:
        """Each admitted request's video tokens (device (max_videos * K, D)) for the videos its chunks still have
        to read: from the video cache, else encoded, every admitted request's together."""
        if not self.has_vision:
            return
        k = self.num_video_tokens
        need: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        wanted = {}
        for slot in admitted:
            a = self.slots[slot]
            slots = np.flatnonzero(a.keys < 0)
            for i, (h, video) in enumerate(zip(a.handle.video_hashes, a.handle.request.videos)):
                if slots[(i + 1) * k - 1] >= a.filled:  # the span is not all in the cached prefix
                    wanted.setdefault(slot, []).append((i, h))
                    if h not in self.video_tokens:
                        need[h] = video
                    else:
                        self.stats.video_cache_hits += 1
        if need:
            self._encode(need)
        for slot, videos in wanted.items():
            flat = np.zeros(self._video_tokens_shape[1:], self.video_tokens[videos[0][1]].dtype)
            for i, h in videos:
                flat[i] = self.video_tokens[h]
                self.video_tokens.move_to_end(h)
            self.slots[slot].video_flat = jax.device_put(flat.reshape(-1, flat.shape[-1]))
        budget = self.cfg.video_cache_mb * 2**20
        while self.video_tokens and sum(t.nbytes for t in self.video_tokens.values()) > budget:
            self.video_tokens.popitem(last=False)  # least recently used

    def _encode(self, videos: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        """Encode ``videos`` ({hash: (frames, mask)}) in one program (N padded to a power of two) into the cache."""
        n = pow2(len(videos))
        frames = np.zeros((n, *self._frame_shape), np.uint8)
        mask = np.zeros((n, self._frame_shape[0]), bool)
        for j, (f, m) in enumerate(videos.values()):
            frames[j], mask[j] = f, m
        tokens = np.asarray(self.programs.encode(self.state, jax.device_put(frames), jax.device_put(mask)))
        self.stats.encoded_videos += len(videos)
        for j, h in enumerate(videos):
            self.video_tokens[h] = tokens[j]

    def _bucket(self, n: int) -> int:
        return min(max(self.cfg.min_bucket, pow2(n)), pow2(self.cfg.prefill_chunk), self.cfg.max_length)

    def _prefill_round(self) -> None:
        """Prompt chunks, oldest request first: up to ``prefill_chunk`` tokens while others decode (so they keep
        streaming), every waiting one when none does."""
        decoding = any(a is not None and not a.prefilling for a in self.slots)
        budget = self.cfg.prefill_chunk
        order = sorted((i for i, a in enumerate(self.slots) if a is not None and a.prefilling),
                       key=lambda i: self.slots[i].handle.submitted)
        for slot in order:
            while self.slots[slot] is not None and self.slots[slot].prefilling and (budget > 0 or not decoding):
                try:
                    budget -= self._chunk(slot, budget if decoding else self.cfg.prefill_chunk)
                except Exception as e:  # noqa: BLE001 - this request fails; the others go on
                    self._fail(slot, e)
                    self._recover()

    def _chunk(self, slot: int, most: int) -> int:
        """Prefill the next chunk (at most ``most`` tokens) of the request in ``slot``; its first token is taken
        after its last chunk. Returns the chunk's tokens."""
        a = self.slots[slot]
        req, start = a.handle.request, a.filled
        ids = np.asarray(req.prompt_ids, np.int32)
        count = max(1, min(len(ids) - start, most, self.cfg.prefill_chunk))
        bucket = self._bucket(count)
        count = min(count, bucket)
        padded = np.zeros((1, bucket), np.int32)
        padded[0, :count] = ids[start:start + count]
        rows = np.full((1, bucket), -1, np.int32)
        video = ids < 0
        order = np.cumsum(video) - 1  # each video slot's row in the request's video tokens
        rows[0, :count] = np.where(video[start:start + count], order[start:start + count], -1)
        s = req.sampling
        self.ds = self.programs.extend(
            self.state, self.ds, jax.device_put(padded), jax.device_put(rows),
            a.video_flat if a.video_flat is not None else self._zeros_flat, jnp.int32(start), jnp.int32(count),
            jnp.int32(a.src if start == a.first else slot), jnp.int32(slot), jnp.uint32(req.seed % 2**32),
            jnp.float32(s.temperature), jnp.int32(s.top_k), jnp.float32(s.top_p), jnp.int32(req.video_prefix))
        a.filled += count
        self.stats.prefill_chunks += 1
        self.stats.prefill_tokens += count
        if not a.prefilling:
            a.video_flat = None
            self.stats.prefills += 1
            tokens, logprobs = jax.device_get((self.ds.tokens, self.ds.logprobs))
            self._take(slot, int(tokens[slot]), float(logprobs[slot]), time.perf_counter())
        return count

    def _take(self, slot: int, token: int, logprob: float, now: float) -> None:
        """Record one new token of the request in ``slot``; finish it if a stop rule says so (or fail it, if its
        decoding or its callback raises)."""
        try:
            self._record(slot, token, logprob, now)
        except Exception as e:  # noqa: BLE001 - this request fails; the others go on
            if self.slots[slot] is not None:
                self._fail(slot, e)

    def _record(self, slot: int, token: int, logprob: float, now: float) -> None:
        a = self.slots[slot]
        assert a is not None
        a.tokens.append(token)
        a.logprobs.append(logprob)
        a.times.append(now)
        self.stats.generated_tokens += 1
        req = a.handle.request
        if token == self.eos_id:
            return self._finish(slot, "eos")
        if a.decoder is not None:
            piece = a.decoder.push(token)
            if piece and a.handle.on_text is not None:
                a.handle.on_text(piece)
            if a.decoder.stopped:
                return self._finish(slot, "stop")
        if any(_ends_with(a.tokens, seq) for seq in req.sampling.stop_sequences):
            return self._finish(slot, "stop")
        if len(a.tokens) >= req.sampling.max_new_tokens:
            return self._finish(slot, "length")

    def _finish(self, slot: int, reason: str) -> None:
        a = self.slots[slot]
        self.slots[slot] = None
        if self.cfg.prefix_cache and (a.filled > a.first or a.src == slot):  # its row holds what its keys say
            self.retained[slot] = a.cached_keys()
        self._clock += 1
        self.last_used[slot] = self._clock
        self._deliver(a.handle, a, reason)

    def _deliver(self, handle: RequestHandle, a: _Active, reason: str, *, error: str | None = None) -> None:
        text = ""
        if a.decoder is not None:
            try:
                piece = a.decoder.finish()
                if piece and handle.on_text is not None and error is None:
                    handle.on_text(piece)
                text = a.decoder.answer
            except Exception as e:  # noqa: BLE001 - the request ends with what it has
                reason, error = "error", error or f"{type(e).__name__}: {e}"
        result = EngineResult(handle.request.id, a.tokens, a.logprobs, text, reason,
                              int(np.asarray(handle.request.prompt_ids).shape[0]), handle.submitted, a.times,
                              error=error)
        handle._result = result
        self.stats.finished += 1
        handle._done.set()
        if handle.on_done is not None:
            try:
                handle.on_done(result)
            except Exception:  # noqa: BLE001 - a caller's callback cannot stop the engine
                logger.exception("the on_done callback of request %r failed", handle.request.id)
