"""Continuous batching: many requests decoded together by one compiled step, each in its own slot of one KV cache.

(~570 lines: the slot table, the compiled programs and the host loop are one state machine; split, each part would
reach into the others' private state.)

    engine = Engine(model, tokenizer, EngineConfig(num_slots=8, max_length=1024))
    handle = engine.submit(EngineRequest(prompt_ids, clips, SamplingConfig(64, temperature=0.7), seed=1),
                           on_text=print)
    engine.run()            # until every submitted request is finished; a server thread calls serve_forever()
    handle.result()         # EngineResult: tokens, answer text, finish reason, timings

The shape is JetStream's (MaxText's engine): ``prefill`` -> ``insert(prefix, decode_state, slot)`` -> ``generate``,
with a queue of free slots. Three jitted programs, all over the preallocated decode state:

- ``encode`` (N, T, H, W, 3) frames + (N, T) mask -> (N, K, D) video tokens. The videos of every request admitted
  in one scheduling round are encoded together, N padded to a power of two.
- ``prefill_insert`` one request's prompt, right-padded to a power-of-two bucket (B_p), its video tokens spliced in
  at the video slots, runs through the LLM into a fresh (1, B_p) cache, which is copied into row ``slot`` of the
  (num_slots, max_length) cache; the request's first token is sampled. One program per bucket.
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
from g4v_jax.models.gpt4video import language_model, model_kind, splice_video_tokens
from g4v_jax.models.llama import KVCache, init_cache


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

    cache: KVCache  # k, v (layers, slots, S, H_kv, Dh); valid (slots, S); index (slots,)
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


def _prefill_insert(graphdef, state, ds: DecodeState, ids, video_tokens, n, slot, seed, temperature, top_k, top_p,
                    video_prefix) -> DecodeState:
    """Prefill one right-padded prompt ids (1, B_p) (``n`` real tokens) into a fresh cache, insert it at ``slot``,
    and sample its first token. Under ``lora.skip_video_span`` the adapters skip the first ``video_prefix`` tokens
    (generated tokens always come after them)."""
    model = nnx.merge(graphdef, state)
    lm = language_model(model)
    bucket = ids.shape[1]
    embeds = lm.embed(jnp.where(ids < 0, 0, ids))
    if video_tokens is not None:
        embeds = splice_video_tokens(embeds, ids, video_tokens)
    mask = (jnp.arange(bucket) < n)[None]
    fresh = init_cache(lm.cfg, 1, bucket, ds.cache.k.dtype)
    adapter_mask = (jnp.arange(bucket) >= video_prefix)[None] if lm.skip_video_span else None
    logits, prefix = lm(inputs_embeds=embeds, attention_mask=mask, cache=fresh, logits_at=(n - 1)[None],
                        adapter_mask=adapter_mask)
    # insert: the prefix's keys/values into row ``slot``; positions >= n are marked empty (decode overwrites them)
    cache = ds.cache
    at = (0, slot, 0, 0, 0)
    cache = KVCache(jax.lax.dynamic_update_slice(cache.k, prefix.k, at),
                    jax.lax.dynamic_update_slice(cache.v, prefix.v, at),
                    cache.valid.at[slot].set(jnp.arange(cache.max_length) < n),
                    cache.index.at[slot].set(n))
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
        self.prefill_insert = jax.jit(counted("prefill", _prefill_insert), donate_argnums=(1,))
        self.step = jax.jit(counted("step", _step), donate_argnums=(1,))


def _shape_tag(name: str, args) -> str:
    if name == "encode":
        return f"[{args[0].shape[0]} videos]"
    if name == "prefill":
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
    """Host-side state of a request in a slot."""

    def __init__(self, handle: RequestHandle, decoder) -> None:
        self.handle = handle
        self.decoder = decoder
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.times: list[float] = []


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    prefills: int = 0
    encoded_videos: int = 0
    generated_tokens: int = 0
    finished: int = 0
    slot_steps: int = 0  # sum over steps of occupied slots (occupancy = slot_steps / (steps * num_slots))


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
        self.lm_cfg = language_model(model).cfg
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
        self.ds = self._empty_state()
        self.slots: list[_Active | None] = [None] * cfg.num_slots
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
        cache = init_cache(self.lm_cfg, s, self.cfg.max_length, self._dtype)
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
        with self._lock:
            if len(self.queue) >= self.cfg.max_queue + self.free_slots():
                raise RequestError(f"the queue is full ({len(self.queue)} waiting; engine.max_queue)")
            self.queue.append(handle)
            self._lock.notify_all()
        return handle

    def warmup(self, buckets: Sequence[int] | None = None) -> None:
        """Compile every program the engine can need (each prompt bucket up to ``max_length`` or the ``buckets``
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
            vt = jnp.zeros(self._video_tokens_shape, self._dtype) if self.has_vision else None
            self.ds = self.programs.prefill_insert(
                self.state, self.ds, jnp.zeros((1, bucket), jnp.int32), vt, jnp.int32(1), jnp.int32(0),
                jnp.uint32(0), jnp.float32(0), jnp.int32(0), jnp.float32(1), jnp.int32(0))
        self.ds = self.programs.step(self.state, self.ds, jnp.zeros((self.cfg.num_slots,), bool))
        jax.block_until_ready(self.ds)
        self.ds = self._empty_state()

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
                    for i, a in enumerate(self.slots):
                        if a is not None:
                            self._fail(i, RuntimeError("the engine's scheduling round failed"))
                    self.ds = self._empty_state()

    def close(self, stop: threading.Event) -> None:
        """End ``serve_forever(stop)`` now, even while it waits for work."""
        stop.set()
        self._wake()

    def run_once(self) -> None:
        """One scheduling round: drop cancelled requests, fill free slots from the queue, decode one token."""
        for i, a in enumerate(self.slots):
            if a is not None and a.handle.cancelled:
                self._finish(i, "cancelled")
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        active = np.array([a is not None for a in self.slots])
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
        """Finish the request in ``slot`` with ``finish_reason="error"``."""
        a = self.slots[slot]
        self.slots[slot] = None
        if a is not None:
            self._deliver(a.handle, a, "error", error=f"{type(error).__name__}: {error}")

    def _recover(self) -> None:
        """After a failed program: a decode state whose buffers a donating call consumed is rebuilt (every slot's
        request must then go: their caches are gone)."""
        if any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(self.ds)):
            for i, a in enumerate(self.slots):
                if a is not None:
                    self._fail(i, RuntimeError("the decode state was lost to another request's failure"))
            self.ds = self._empty_state()

    def _admit(self) -> list[tuple[int, RequestHandle]]:
        admitted = []
        with self._lock:
            free = [i for i, a in enumerate(self.slots) if a is None]
            while free and self.queue:
                handle = self.queue.popleft()
                if handle.cancelled:
                    self._deliver(handle, _Active(handle, None), "cancelled")
                    continue
                slot = free.pop(0)
                self.slots[slot] = _Active(handle, self._decoder(handle.request))
                admitted.append((slot, handle))
        return admitted

    def _decoder(self, request: EngineRequest):
        if self.tokenizer is None:
            return None
        return StreamDecoder(self.tokenizer, stops=request.stop_strings)

    def _encode_videos(self, admitted) -> dict[int, jax.Array]:
        """Video tokens (1, max_videos, K, D) per admitted slot with videos: all their videos in one program."""
        clips = [(slot, v) for slot, h in admitted for v in h.request.videos]
        if not clips:
            return {}
        n = pow2(len(clips))
        frames = np.zeros((n, *self._frame_shape), np.uint8)
        mask = np.zeros((n, self._frame_shape[0]), bool)
        for j, (_, (f, m)) in enumerate(clips):
            frames[j], mask[j] = f, m
        tokens = np.asarray(self.programs.encode(self.state, jax.device_put(frames), jax.device_put(mask)))
        self.stats.encoded_videos += len(clips)
        out: dict[int, np.ndarray] = {}
        for j, (slot, _) in enumerate(clips):
            out.setdefault(slot, []).append(tokens[j])
        padded = {}
        for slot, toks in out.items():
            arr = np.zeros(self._video_tokens_shape, tokens.dtype)
            arr[0, :len(toks)] = np.stack(toks)
            padded[slot] = arr
        return padded

    def _bucket(self, n: int) -> int:
        return min(max(self.cfg.min_bucket, pow2(n)), self.cfg.max_length)

    def _prefill(self, admitted) -> None:
        try:
            video_tokens = self._encode_videos(admitted) if self.has_vision else {}
        except Exception as e:  # noqa: BLE001 - the admitted requests fail; the others go on
            for slot, _ in admitted:
                self._fail(slot, e)
            self._recover()
            return
        for slot, handle in admitted:
            try:
                self._prefill_one(slot, handle, video_tokens)
            except Exception as e:  # noqa: BLE001 - this request fails; the others go on
                if self.slots[slot] is not None and self.slots[slot].handle is handle:
                    self._fail(slot, e)
                self._recover()

    def _prefill_one(self, slot: int, handle: RequestHandle, video_tokens: dict) -> None:
        req = handle.request
        ids = np.asarray(req.prompt_ids, np.int32)
        bucket = self._bucket(len(ids))
        padded = np.zeros((1, bucket), np.int32)
        padded[0, :len(ids)] = ids
        vt = None
        if self.has_vision:
            vt = video_tokens.get(slot)
            vt = jnp.zeros(self._video_tokens_shape, self._dtype) if vt is None else jax.device_put(vt)
        s = req.sampling
        self.ds = self.programs.prefill_insert(
            self.state, self.ds, jax.device_put(padded), vt, jnp.int32(len(ids)), jnp.int32(slot),
            jnp.uint32(req.seed % 2**32), jnp.float32(s.temperature), jnp.int32(s.top_k), jnp.float32(s.top_p),
            jnp.int32(req.video_prefix))
        self.stats.prefills += 1
        tokens, logprobs = jax.device_get((self.ds.tokens, self.ds.logprobs))
        self._take(slot, int(tokens[slot]), float(logprobs[slot]), time.perf_counter())

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
