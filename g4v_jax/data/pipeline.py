"""Training input pipeline: manifest examples -> fixed-shape NumPy batches for a jitted train step, on grain.

(One file of ~650 lines on purpose: the batch layout, the per-example preparation, the grain iterator and the pre-scan
that counts what training will skip share one row type and its private checks; packing is ``packing.py``.)

Batches
    A dict of NumPy arrays whose shapes never change (``batch_spec`` gives them without reading any data), so the
    train step compiles once:

    ==================  =====================  ====================================================================
    ``input_ids``       (B, L) int32           pad id at pads, -1 (``VIDEO_PLACEHOLDER_ID``) at video slots
    ``labels``          (B, L) int32           ``IGNORE_INDEX`` (-100) except AI answers and their EOS
    ``attention_mask``  (B, L) bool            True on real tokens (right padding)
    ``positions``       (B, L) int32           0, 1, ... over real tokens, 0 at pads
    ``segment_ids``     (B, L) int32           only when ``pack_sequences``: 1, 2, ... per example of the row, 0 at
                                               pads (positions restart at each example)
    ``adapter_mask``    (B, L) bool            only when ``adapter_mask`` (``model.lora.skip_video_span``): False up
                                               to the end of each example's last video span, True after it
    ``distill``         (B, L) bool            only when ``distill`` (``train.distill_weight`` > 0): True on the
                                               real tokens of examples marked ``"distill"`` in the manifest
    ``videos``          (B, V, T, S, S, 3)     uint8; only when ``use_videos``
    ``frame_mask``      (B, V, T) bool         False at padded frames and padding videos; only when ``use_videos``
    ==================  =====================  ====================================================================

    Packing (``pack_sequences``, text rows only): the batch's rows are filled first-fit in the element order: each
    example goes into the first row with room for it, or opens a new row; the first example that fits no row of a
    full batch is carried to the next batch (the iterator state's ``next_index`` then points at it). Against
    next-fit (only the last row takes examples), a short example fills a gap left earlier: measured on the
    synthetic world's text, stage 0's 136-token rows hold 1.35 examples instead of 1.19 and stage 2's 1.75 instead
    of 1.46. A token attends only within its own example (the model's
    ``segment_ids``), so a packed example trains exactly as it would alone.

    B = ``per_host_batch``, L = ``seq_len``, V = ``max_videos_per_example``, T = ``num_frames``, S = ``image_size``.
    Videos travel with their rows, as ``GPT4Video`` takes them: row b's i-th run of video slots receives
    ``videos[b, i]``; a row with fewer than V videos has zero videos with an all-False ``frame_mask`` after its own
    (the model never reads them). So a batch shards over the data axes and splits into micro-batches along B with
    every video staying next to its tokens. Sequences are never truncated: too long is a skip or an error
    (``on_too_long``). The pad id is the tokenizer's pad token, else its EOS, else 0 (it is masked out either way).

Pipeline (grain)
    ::

        MapDataset.source(host shard) -> shuffle(seed)        (re-seeded per epoch by repeat)
          -> repeat(epochs) -> map_with_index(prepare) -> [start:]
          -> to_iter_dataset() -> mp_prefetch(worker_count)   (heavy work: tokenize, decode, resize - in workers)
          -> BatchIterator: drop skip markers, collate per_host_batch rows   (main process)

    ``prepare`` never drops an element: an example that cannot be used becomes a small *skip marker* (id, reason,
    detail) instead of ``None``. That is what keeps the result independent of ``worker_count``: ``mp_prefetch`` gives
    worker i the elements i, i+W, i+2W, ... and interleaves the workers round-robin, which reproduces the sequential
    order exactly only if every worker yields one output per input. (A grain ``filter``/``batch`` before
    ``mp_prefetch`` would run per worker, so skips and batch remainders would shift rows between batches whenever
    ``worker_count`` changes.) Batching happens after ``mp_prefetch``, in the main process; it only stacks arrays.
    ``worker_count = 0`` and ``worker_count = W`` therefore give bit-identical batches (tested).

Skips
    Reasons: ``unreadable_video`` (``on_bad_video``), ``too_long`` and ``too_many_videos`` (``on_too_long``; more
    videos than ``max_videos_per_example``). With ``"skip"`` the marker travels to the main process, which counts it
    (``BatchIterator.skipped``, also part of the iterator state, so the counts survive a resume) and logs one warning
    per example id. With ``"error"`` the worker raises ``ExampleError`` naming the example, the problem (with the
    video's path for an unreadable one) and the setting; grain re-raises it in the main process. ``count_problems``
    runs the same checks over a manifest up front, so a trainer can report "N examples will be skipped (...)" before
    the first step (``describe_problems`` writes that line). Problems that concern the whole run
    rather than one example (stage 2 on examples without captions, examples without any AI answer, a tokenizer without
    EOS, a bad config) are errors in ``make_dataset``, before any worker starts.

Iterator state (checkpointing)
    ``get_state()`` is a small JSON-able dict: ``next_index`` (position in this host's shuffled, repeated element
    order of the first element not yet in a returned batch), the skip counts, and a fingerprint of what defines that
    order (the shard's example ids, ``shuffle``, ``seed``, the host index and count). ``set_state`` restarts the grain
    pipeline at ``next_index`` (a slice of the ``MapDataset``), so the state does not depend on ``worker_count``: a
    run can resume with a different number of workers, or batch size, and gets the same example stream. A state from
    a different manifest, shuffle/seed or host layout is refused (fingerprint mismatch) instead of silently resuming
    at a meaningless position. grain's own
    ``mp_prefetch`` state is per worker and would tie a checkpoint to the worker count; it is not used.

Multiprocessing
    grain starts workers with ``spawn`` and needs absl flags parsed in the main process first; ``BatchIterator`` does
    ``flags.FLAGS(argv[:1])`` when nothing parsed them (a program with its own absl ``app.run`` is unaffected).
    Because of ``spawn`` a training script needs the ``if __name__ == "__main__":`` guard, and each worker imports
    ``g4v_jax`` (a few seconds) and unpickles the examples, the tokenizer and the config once, when the iterator first
    runs and again after ``set_state``. Errors in a worker reach the main process with their type and message. Read
    threads (overlapping file reads and decoding): 16 without workers, 4 per worker with them; about two batches are
    kept in flight in total. ``close()`` stops the workers (grain also does it on garbage collection).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from g4v_jax.config import DataConfig
from g4v_jax.data.io import resolve_video_path
from g4v_jax.data.manifest import Example, ManifestError, replace_videos_with_captions
from g4v_jax.data.packing import collate_packed, first_row_with_room, token_arrays
from g4v_jax.data.template import (IGNORE_INDEX, SYSTEM_PROMPT, TokenizedConversation, llm_template_ids,
                                   llm_template_labels, pad_batch, tokenize_conversation)
from g4v_jax.data.feature_cache import load_entry
from g4v_jax.data.video import VideoReadError, load_video

SKIP_REASONS = ("unreadable_video", "too_long", "too_many_videos")
STATE_VERSION = 1

_log = logging.getLogger(__name__)
_TOKENIZER_LOCK = threading.Lock()  # per process (module state is not pickled into workers)


def check_resolved(cfg: DataConfig) -> DataConfig:
    """``cfg`` once its model and stage inputs are filled in (``pipeline_config``): what only then can be wrong."""
    if cfg.pack_sequences and cfg.use_videos:
        raise ValueError("data.pack_sequences packs text rows (stage 2, or a text-only LLM stage); rows that carry "
                         "videos (stage 1) are not packed")
    return cfg


class ExampleError(ValueError):
    """An example that cannot be used while ``on_bad_video`` / ``on_too_long`` is ``"error"``; names the example."""


def batch_spec(cfg: DataConfig, per_host_batch: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, dtype) of every array of a batch; the same for every batch of a run."""
    cfg = check_resolved(cfg)
    b, l = per_host_batch, cfg.seq_len
    spec = {
        "input_ids": ((b, l), np.dtype(np.int32)),
        "labels": ((b, l), np.dtype(np.int32)),
        "attention_mask": ((b, l), np.dtype(np.bool_)),
        "positions": ((b, l), np.dtype(np.int32)),
    }
    if cfg.pack_sequences:
        spec["segment_ids"] = ((b, l), np.dtype(np.int32))
    if cfg.adapter_mask:
        spec["adapter_mask"] = ((b, l), np.dtype(np.bool_))
    if cfg.distill:
        spec["distill"] = ((b, l), np.dtype(np.bool_))
    if cfg.use_videos:
        v, t, s = cfg.max_videos_per_example, cfg.num_frames, cfg.image_size
        if cfg.vision_cache:
            spec["video_features"] = ((b, v, *cfg.feature_shape), np.dtype(cfg.feature_dtype))
        else:
            spec["videos"] = ((b, v, t, s, s, 3), np.dtype(np.uint8))
        spec["frame_mask"] = ((b, v, t), np.dtype(np.bool_))
    return spec


def pad_token_id(tokenizer) -> int:
    """The id padded positions hold: the tokenizer's pad, else EOS, else 0 (masked out in any case)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None and candidate >= 0:
            return int(candidate)
    return 0


def shard_examples(examples: Sequence[Example], process_index: int, process_count: int) -> list[Example]:
    """This host's examples: every ``process_count``-th one starting at ``process_index`` (disjoint, covering)."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")
    return list(examples[process_index::process_count])


# --------------------------------------------------------------------------------------------------------------------
# One example
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays
class _Row:
    """A prepared example: padded token arrays (L,) and its decoded videos (V, T, S, S, 3) / (V, T)."""

    index: int
    id: str
    input_ids: np.ndarray
    labels: np.ndarray
    attention_mask: np.ndarray
    positions: np.ndarray
    adapter_mask: np.ndarray  # (L,) bool: after the last video span (template's video_prefix)
    distill: np.ndarray  # (L,) bool: the real tokens of an example marked "distill"
    videos: np.ndarray
    frame_mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Skip:
    """Stands in for an unusable example so that every input yields one output (module docstring)."""

    index: int
    id: str
    reason: str  # one of SKIP_REASONS
    detail: str


def _problem(cfg: DataConfig, index: int, ex: Example, reason: str, detail: str) -> _Skip:
    setting = "on_bad_video" if reason == "unreadable_video" else "on_too_long"
    if getattr(cfg, setting) == "error":
        raise ExampleError(f"example {ex.id!r}: {detail} (data.{setting}='error'; set it to 'skip' to skip such "
                           f"examples)")
    return _Skip(index=index, id=ex.id, reason=reason, detail=detail)


def _tokenize(ex: Example, tokenizer, cfg: DataConfig) -> TokenizedConversation:
    system = SYSTEM_PROMPT if cfg.system_prompt is None else cfg.system_prompt
    # HF fast tokenizers are not thread-safe (transformers reconfigures the shared Rust object on calls: "Already
    # borrowed", huggingface/transformers#47085), and grain's read threads share one. Tokenizing is cheap next to
    # decoding, so one lock per process costs little.
    with _TOKENIZER_LOCK:
        if ex.template == "llm":
            try:
                ids = llm_template_ids(tokenizer, ex.turns)
                # too long for a row (_text_problem) is skipped: not worth two renderings per answer
                labels = (llm_template_labels(tokenizer, ex.turns, ids) if len(ids) <= cfg.seq_len
                          else [IGNORE_INDEX] * len(ids))
                return TokenizedConversation(np.asarray(ids, np.int32), np.asarray(labels, np.int32), num_videos=0)
            except ValueError as e:
                raise ExampleError(f"example {ex.id!r} (\"template\": \"llm\"): {e}") from None
        return tokenize_conversation(tokenizer, ex.turns, num_video_tokens=cfg.num_video_tokens, system_prompt=system)


def _text_problem(ex: Example, conv: TokenizedConversation | None, cfg: DataConfig) -> tuple[str, str] | None:
    """(reason, detail) when the (stage-adjusted) example cannot fit a row, checked before any decoding."""
    if cfg.use_videos and len(ex.videos) > cfg.max_videos_per_example:
        return "too_many_videos", (f"has {len(ex.videos)} videos, more than "
                                   f"data.max_videos_per_example={cfg.max_videos_per_example}")
    if conv is not None and len(conv) > cfg.seq_len:
        return "too_long", (f"is {len(conv)} tokens long ({conv.num_videos} video(s) x {cfg.num_video_tokens} slots "
                            f"included), more than data.seq_len={cfg.seq_len}; it is never truncated")
    return None


def _decode(ex: Example, cfg: DataConfig, manifest_dir: str) -> tuple[list[Any], tuple[str, str] | None]:
    """The example's clips, or the first unreadable video as (reason, detail)."""
    clips = []
    for video in ex.videos:
        path = resolve_video_path(video, manifest_dir)
        if cfg.vision_cache:  # precomputed features stand in for the frames
            entry = load_entry(cfg.vision_cache, path)
            if entry is None:
                return [], ("unreadable_video", f"no vision-cache entry for {path} (unreadable when the cache was built)")
            clips.append(VideoClipFeatures(frames=entry[0], frame_mask=entry[1]))
            continue
        try:
            clips.append(load_video(path, num_frames=cfg.num_frames, size=cfg.image_size,
                                    sampling=cfg.video_sampling, resize=cfg.video_resize))
        except VideoReadError as e:  # its message names the path and the cause
            return [], ("unreadable_video", f"unreadable video: {e}")
    return clips, None


@dataclasses.dataclass(frozen=True, eq=False)
class VideoClipFeatures:
    """A cached video: features (T, 1 + N, Dv) where a clip has frames."""

    frames: np.ndarray
    frame_mask: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class _Prepare:
    """``map_with_index`` transform: example -> ``_Row`` or ``_Skip``. Picklable (sent to every worker once)."""

    tokenizer: Any
    cfg: DataConfig
    manifest_dir: str
    pad_id: int

    def __call__(self, index: int, ex: Example) -> _Row | _Skip:
        cfg = self.cfg
        if not cfg.use_videos:
            ex = replace_videos_with_captions(ex)  # captions were checked by make_dataset
        problem = _text_problem(ex, None, cfg)  # video count first: it needs no tokenizing
        conv = None
        if problem is None:
            conv = _tokenize(ex, self.tokenizer, cfg)
            problem = _text_problem(ex, conv, cfg)
        clips: list[Any] = []
        if problem is None and cfg.use_videos:
            clips, problem = _decode(ex, cfg, self.manifest_dir)
        if problem is not None:
            return _problem(cfg, index, ex, *problem)
        assert conv is not None
        padded = pad_batch([conv], self.pad_id, length=cfg.seq_len, side="right")
        t, s = cfg.num_frames, cfg.image_size
        empty = (np.zeros((0, t, *cfg.feature_shape[1:]), cfg.feature_dtype) if cfg.vision_cache
                 else np.zeros((0, t, s, s, 3), np.uint8))
        return _Row(
            index=index,
            id=ex.id,
            input_ids=padded["input_ids"][0],
            labels=padded["labels"][0],
            attention_mask=padded["attention_mask"][0],
            positions=padded["positions"][0],
            adapter_mask=padded["adapter_mask"][0],
            distill=padded["attention_mask"][0] & ex.distill,
            videos=np.stack([c.frames for c in clips]) if clips else empty,
            frame_mask=np.stack([c.frame_mask for c in clips]) if clips else np.zeros((0, t), np.bool_),
        )


def collate(rows: Sequence[_Row], cfg: DataConfig) -> dict[str, np.ndarray]:
    """Stack rows into a batch; row b's videos at ``videos[b, :n_b]``, zero videos with a False mask after them."""
    batch = {name: np.stack([getattr(r, name) for r in rows]) for name in token_arrays(cfg)}
    if cfg.use_videos:
        spec = batch_spec(cfg, len(rows))
        name = "video_features" if cfg.vision_cache else "videos"
        videos = np.zeros(*spec[name])
        frame_mask = np.zeros(*spec["frame_mask"])
        for b, r in enumerate(rows):
            n = r.videos.shape[0]  # <= v: more is a too_many_videos skip
            videos[b, :n], frame_mask[b, :n] = r.videos, r.frame_mask
        batch[name], batch["frame_mask"] = videos, frame_mask
    return batch


# --------------------------------------------------------------------------------------------------------------------
# Dataset and iterator
# --------------------------------------------------------------------------------------------------------------------


def _fingerprint(examples: Sequence[Example], cfg: DataConfig, process_index: int, process_count: int) -> str:
    """Digest of everything that fixes the element order a ``next_index`` refers to."""
    h = hashlib.sha256()
    h.update(json.dumps([cfg.shuffle, cfg.seed, process_index, process_count, len(examples)]).encode())
    for ex in examples:
        h.update(b"\0" + ex.id.encode("utf-8"))
    return h.hexdigest()[:16]


def _ensure_absl_flags_parsed() -> None:
    """grain's multiprocessing reads absl flags in the main process; parse defaults unless someone already did."""
    from absl import flags  # grain depends on absl

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1] or ["g4v_jax"])


class BatchDataset(grain.IterDataset):
    """What ``make_dataset`` returns: iterating gives a ``BatchIterator`` (module docstring)."""

    def __init__(self, examples: Sequence[Example], prepare: _Prepare, cfg: DataConfig, per_host_batch: int,
                 epochs: int | None, fingerprint: str):
        super().__init__()
        self.examples = examples
        self.cfg = cfg
        self.per_host_batch = per_host_batch
        self.epochs = epochs
        self.fingerprint = fingerprint
        self._prepare = prepare

    def elements(self, start: int) -> grain.IterDataset:
        """The per-example stream (``_Row`` / ``_Skip``) from position ``start`` of the repeated order."""
        ds = grain.MapDataset.source(self.examples)
        if self.cfg.shuffle:
            ds = ds.shuffle(seed=self.cfg.seed)
        ds = ds.repeat(self.epochs).map_with_index(self._prepare)
        if start:
            ds = ds[start:]
        workers = self.cfg.worker_count
        # Keep about two batches in flight in total; workers add process parallelism, threads overlap file I/O.
        per_worker = math.ceil(2 * self.per_host_batch / max(workers, 1))
        threads = 4 if workers else 16
        read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(per_worker, threads))
        it = ds.to_iter_dataset(read)
        if workers:
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=per_worker))
        return it

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self)

    def __str__(self) -> str:
        return (f"BatchDataset({len(self.examples)} examples, per_host_batch={self.per_host_batch}, "
                f"epochs={self.epochs}, workers={self.cfg.worker_count})")


class BatchIterator(grain.DatasetIterator):
    """Batches of a ``BatchDataset``; ``get_state``/``set_state`` as in the module docstring."""

    def __init__(self, dataset: BatchDataset):
        super().__init__()
        self._ds = dataset
        self._next_index = 0
        self._skipped = dict.fromkeys(SKIP_REASONS, 0)
        self._logged: set[str] = set()
        self._inner: Iterator[Any] | None = None  # started lazily, so that set_state before next() starts it once
        self._carry: _Row | None = None  # packing: read, did not fit the last batch, opens the next (= next_index)
        self.last_example_ids: list[str] = []

    @property
    def skipped(self) -> dict[str, int]:
        """Skip events so far (an example skipped in two epochs counts twice), by reason."""
        return dict(self._skipped)

    def _start(self) -> Iterator[Any]:
        if self._inner is None:
            if self._ds.cfg.worker_count:
                _ensure_absl_flags_parsed()
            self._inner = iter(self._ds.elements(self._next_index))
        return self._inner

    def _stop(self) -> None:
        self._carry = None  # a restart at next_index reads it again
        inner, self._inner = self._inner, None
        if inner is not None and hasattr(inner, "close"):
            inner.close()

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        inner = self._start()
        cfg, size = self._ds.cfg, self._ds.per_host_batch
        rows: list[_Row] = []
        bins: list[list[_Row]] = []  # packing: the batch's rows, each a list of examples
        used: list[int] = []  # packing: tokens in each bin
        skips: list[_Skip] = []
        run = 0  # skips since the last usable row
        # 2N skips in a row span a whole epoch (a permutation of the N examples): nothing will ever be usable.
        hopeless = 2 * len(self._ds.examples)
        try:
            while True:
                if not cfg.pack_sequences and len(rows) == size:
                    break
                if self._carry is not None:
                    element, self._carry = self._carry, None
                else:
                    try:
                        element = next(inner)  # StopIteration: end of the data; a partial batch is dropped
                    except StopIteration:
                        if cfg.pack_sequences and len(bins) == size:
                            break
                        raise
                if isinstance(element, _Skip):
                    skips.append(element)
                    run += 1
                    if run >= hopeless:
                        reasons = collections.Counter(k.reason for k in skips)
                        raise ValueError(f"every one of this host's {len(self._ds.examples)} examples is skipped "
                                         f"({dict(reasons)}); the first: {skips[0].id!r}: {skips[0].detail}")
                    continue
                run = 0
                rows.append(element)
                if not cfg.pack_sequences:
                    continue
                n = int(element.attention_mask.sum())
                room = first_row_with_room(used, n, cfg.seq_len)
                if room is not None:
                    bins[room].append(element)
                    used[room] += n
                elif len(bins) < size:
                    bins.append([element])
                    used.append(n)
                else:  # the batch is full: this example opens the next one
                    rows.pop()
                    self._carry = element
                    break
        except StopIteration:
            raise
        except BaseException:
            self._stop()  # consistent with get_state: a retry restarts at next_index (and meets the error again)
            raise
        # Commit only complete batches, so the state's counts cover exactly the elements before next_index.
        for skip in skips:
            self._skipped[skip.reason] += 1
            if skip.id not in self._logged:
                self._logged.add(skip.id)
                _log.warning("skipping example %r (%s): %s", skip.id, skip.reason, skip.detail)
        self._next_index = self._carry.index if self._carry is not None else rows[-1].index + 1
        self.last_example_ids = [r.id for r in rows]  # named when a step goes wrong (non-finite loss, divergence)
        if cfg.pack_sequences:
            return collate_packed(bins, cfg, self._ds._prepare.pad_id)
        return collate(rows, cfg)

    def get_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "next_index": self._next_index,
            "skipped": dict(self._skipped),
            "fingerprint": self._ds.fingerprint,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a data iterator state of version {STATE_VERSION}: {state!r}")
        if state.get("fingerprint") != self._ds.fingerprint:
            raise ValueError(
                f"the data iterator state was saved for another element order (fingerprint {state.get('fingerprint')!r}"
                f", this pipeline has {self._ds.fingerprint!r}): the manifest, data.shuffle, data.seed or the host "
                f"layout (process_index/process_count) changed since the checkpoint"
            )
        next_index, skipped = state.get("next_index"), state.get("skipped")
        if isinstance(next_index, bool) or not isinstance(next_index, int) or next_index < 0:
            raise ValueError(f"data iterator state: next_index must be an integer >= 0, got {next_index!r}")
        if not isinstance(skipped, Mapping) or set(skipped) != set(SKIP_REASONS):
            raise ValueError(f"data iterator state: skipped must map {list(SKIP_REASONS)} to counts, got {skipped!r}")
        self._stop()
        self._next_index = next_index
        self._skipped = {reason: int(skipped[reason]) for reason in SKIP_REASONS}

    def start_prefetch(self) -> None:
        self._start()
        if hasattr(self._inner, "start_prefetch"):
            self._inner.start_prefetch()

    def close(self) -> None:
        self._stop()
        super().close()

    def __str__(self) -> str:
        return f"BatchIterator(next_index={self._next_index}, {self._ds})"


def _check_examples(examples: Sequence[Example], cfg: DataConfig) -> None:
    """Whole-run problems, raised before any worker starts (module docstring)."""
    for i, ex in enumerate(examples):
        if not isinstance(ex, Example):
            raise ValueError(f"examples[{i}] is a {type(ex).__name__}, expected a manifest Example (read_manifest)")
    no_answer = [ex.id for ex in examples if ex.num_answers == 0]
    if no_answer:
        raise ValueError(f"{len(no_answer)} example(s) have no AI turn, so nothing to train on (first: "
                         f"{no_answer[:5]}); is this an evaluation manifest?")
    if not cfg.use_videos:
        uncaptioned = [ex.id for ex in examples if ex.videos and len(ex.captions) != len(ex.videos)]
        if uncaptioned:
            raise ManifestError(f"data.use_videos=false (stage 2) replaces each video by its caption, but "
                                f"{len(uncaptioned)} example(s) with videos have no captions "
                                f"(first: {uncaptioned[:5]})")


def make_dataset(
    examples: Sequence[Example],
    tokenizer,
    cfg: DataConfig,
    *,
    per_host_batch: int,
    epochs: int | None,
    process_index: int = 0,
    process_count: int = 1,
    manifest_dir: str | os.PathLike = ".",
) -> BatchDataset:
    """This host's batches of ``examples`` (all hosts pass the same list; each keeps its ``shard_examples`` part).

    ``epochs=None`` repeats forever; every epoch is shuffled differently (when ``cfg.shuffle``), and batches run
    across epoch borders, the last partial batch being dropped. Relative video paths are resolved against
    ``manifest_dir``. Iterate with ``batch_iterator``.
    """
    cfg = check_resolved(cfg)
    if isinstance(per_host_batch, bool) or not isinstance(per_host_batch, int) or per_host_batch < 1:
        raise ValueError(f"per_host_batch must be an integer >= 1, got {per_host_batch!r}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be an integer >= 1 or None (forever), got {epochs!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no EOS token; AI answers must end with one")
    shard = shard_examples(examples, process_index, process_count)
    _check_examples(shard, cfg)
    if epochs is not None and len(shard) * epochs < per_host_batch:
        raise ValueError(f"host {process_index} has {len(shard)} example(s) x {epochs} epoch(s), fewer than one batch "
                         f"of per_host_batch={per_host_batch}")
    if not shard:
        raise ValueError(f"host {process_index} of {process_count} gets no examples ({len(examples)} in all)")
    prepare = _Prepare(tokenizer=tokenizer, cfg=cfg, manifest_dir=os.fspath(manifest_dir),
                       pad_id=pad_token_id(tokenizer))
    return BatchDataset(shard, prepare, cfg, per_host_batch, epochs,
                        _fingerprint(shard, cfg, process_index, process_count))


def batch_iterator(dataset: BatchDataset) -> BatchIterator:
    """A fresh iterator over ``dataset`` (a grain ``DatasetIterator``: ``get_state``/``set_state``/``close``)."""
    return iter(dataset)


# --------------------------------------------------------------------------------------------------------------------
# Pre-scan
# --------------------------------------------------------------------------------------------------------------------


def pipeline_config(cfg) -> DataConfig:
    """The data pipeline's settings for a run's ``g4v_jax.config.Config``: its ``data`` section with the inputs the
    model and the stage decide (stage 2 replaces videos by captions unless ``data.stage2_keep_videos``); training and
    ``g4v_jax.data.check`` use the same."""
    stage = cfg.train.stage
    return check_resolved(dataclasses.replace(
        cfg.data, num_frames=cfg.model.num_frames, image_size=cfg.model.vision.image_size,
        video_sampling=cfg.model.video.sampling, video_resize=cfg.model.video.resize,
        num_video_tokens=cfg.model.num_video_tokens, seed=cfg.train.seed,
        use_videos=stage == "stage1" or (stage == "stage2" and cfg.data.stage2_keep_videos),
        adapter_mask=cfg.model.lora.enabled and cfg.model.lora.skip_video_span,
        distill=cfg.train.distill_weight > 0))


def count_problems(
    examples: Sequence[Example],
    tokenizer,
    cfg: DataConfig,
    manifest_dir: str | os.PathLike = ".",
    *,
    check_videos: bool = True,
    num_threads: int = 8,
) -> dict[str, Any]:
    """Run the pipeline's per-example checks over ``examples`` once (whatever ``on_*`` says; nothing raises).

    Returns ``{"examples": N, "ok": n, "skipped": s, "unreadable_video": ..., "too_long": ...,
    "too_many_videos": ..., "problems": [{"id", "reason", "detail"}, ...], "lengths": [tokens of each usable
    example]}``. Videos are decoded exactly as in
    training (``check_videos=False`` checks only lengths and video counts, in seconds), in ``num_threads`` threads.
    """
    scan_cfg = dataclasses.replace(check_resolved(cfg), on_bad_video="skip", on_too_long="skip")
    _check_examples(examples, scan_cfg)
    directory = os.fspath(manifest_dir)

    def check(ex: Example) -> tuple[tuple[str, str] | None, int]:
        staged = ex if scan_cfg.use_videos else replace_videos_with_captions(ex)
        problem = _text_problem(staged, None, scan_cfg)
        length = 0
        if problem is None:
            conv = _tokenize(staged, tokenizer, scan_cfg)
            problem, length = _text_problem(staged, conv, scan_cfg), len(conv)
        if problem is None and check_videos and scan_cfg.use_videos:
            problem = _decode(staged, scan_cfg, directory)[1]
        return problem, length

    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        results = list(pool.map(check, examples))
    problems = [{"id": ex.id, "reason": p[0], "detail": p[1]} for ex, (p, _) in zip(examples, results)
                if p is not None]
    counts = collections.Counter(p["reason"] for p in problems)
    return {
        "examples": len(examples),
        "ok": len(examples) - len(problems),
        "skipped": len(problems),
        **{reason: counts[reason] for reason in SKIP_REASONS},
        "problems": problems,
        "lengths": [n for p, n in results if p is None],  # tokens of each usable example, in order
    }


def describe_problems(report: Mapping[str, Any]) -> str:
    """One line for a ``count_problems`` report: ``"3 of 120 examples will be skipped (2 unreadable video, ...)"``."""
    parts = ", ".join(f"{report[r]} {r.replace('_', ' ')}" for r in SKIP_REASONS if report[r])
    return f"{report['skipped']} of {report['examples']} examples will be skipped" + (f" ({parts})" if parts else "")


__all__ = [
    "BatchDataset",
    "BatchIterator",
    "DataConfig",
    "ExampleError",
    "SKIP_REASONS",
    "batch_iterator",
    "batch_spec",
    "check_resolved",
    "collate",
    "count_problems",
    "describe_problems",
    "make_dataset",
    "pad_token_id",
    "shard_examples",
]
