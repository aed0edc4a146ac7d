"""Chat with GPT4Video: an interactive REPL with streamed answers, and a batch mode over a JSONL file of requests.

    python -m g4v_jax.chat --ckpt ckpt/g4v                                        # interactive
    python -m g4v_jax.chat --ckpt ckpt/g4v --input requests.jsonl --output answers.jsonl [--batch-size 8]

Options: ``--tokenizer DIR`` (default: the checkpoint directory), ``--max-new-tokens 256 --temperature 0 --top-p 1
--top-k 0 --seed 0``, ``--system-prompt TEXT``, and ``key=value`` overrides of the saved model config
(``model.compute_dtype=bfloat16``).

Interactive
    Each stdin line is a question, except ``/video PATH`` (attach a video to the next question; several may be
    attached), ``/reset`` (forget the conversation) and ``/quit``. The answer streams to stdout after ``GPT4Video:``;
    then each ``<video>prompt</video>`` the model wrote is listed as ``video N request: prompt`` (the text-to-video
    backend will render them). The whole conversation is the prompt of each turn, as in training.

Batch
    One request per line::

        {"id": "q1", "videos": ["clip.mp4"],
         "turns": [{"from": "human", "video": 0}, {"from": "human", "value": "What happens?"}],
         "max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "seed": 1}

    ``videos`` paths are relative to the requests file (as in training manifests); the sampling keys are optional and
    default to the command-line flags (``seed`` matters only when sampling); ``id`` defaults to the line number
    (``answer_requests``: the 0-based position). Each output line is
    ``{"id", "answer", "video_requests": [{"prompt", "index", "start", "end"}], "num_tokens"}`` in input order, or
    ``{"id", "error"}`` for a request that could not be answered (unreadable video, too long, bad turns). A line that
    is not JSON or not a valid request stops the run before the model is loaded, naming ``file:line``.

Library
    ``ChatSession`` (``attach_video``, ``ask``, ``reset``) and ``answer_requests`` are what the CLI runs.

Decisions
    - Prompts are left-padded to ``bucket_length`` (clamped so prompt + ``max_new_tokens`` fits the context) and the
      videos of a chat prompt to a power-of-two count (masked zero videos, never read by the model), so a
      conversation reuses a few compiled programs. Batches are padded to a power-of-two number of rows (copies of a
      real row) for the same reason.
    - The answer is the decoded text up to the first ``###`` (the next turn's prefix; the engine stops on its tokens,
      and the text check also catches other tokenizations of it), whitespace-stripped. While streaming, a trailing
      run of whitespace / ``#`` and an incomplete UTF-8 character are held back until they are resolved, so the
      streamed pieces concatenate to exactly the answer text.
    - The AI turn stored in the history is the answer text as generated, ``<video>`` tags included (they are part of
      the model's answer in training). An empty answer stores no AI turn (the template has no empty turns).
    - Sampling keys: a chat turn uses ``fold_in(key(seed), turn number)``; a batch uses ``key(seed)``, so sampled
      batch answers are reproducible for the same requests file and batch size (rows of one batch share a key).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from g4v_jax.data.manifest import iter_jsonl, resolve_video_path
from g4v_jax.data.template import SYSTEM_PROMPT, TokenizedConversation, Turn, pad_batch, tokenize_conversation
from g4v_jax.data.video import VideoClip, VideoReadError, load_video
from g4v_jax.generate import SamplingConfig, bucket_length, generate, stop_sequences_for, stream
from g4v_jax.tags import VideoRequest, parse_video_tags

STOP_STRING = "###"  # every turn prefix starts with it: the model is done with its answer
ANSWER_MARKER = "GPT4Video:"  # what the REPL prints before a streamed answer
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k")


# --------------------------------------------------------------------------------------------------------------------
# Model / tokenizer facts
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ModelInfo:
    has_vision: bool
    num_video_tokens: int
    context: int
    vocab_size: int
    num_frames: int
    image_size: int
    eos_id: int
    pad_id: int
    sampling: str = "uniform_mid"  # the model's video preprocessing (model.video)
    resize: str = "short_side_crop"


def _model_info(model, tokenizer, num_frames: int | None, image_size: int | None) -> _ModelInfo:
    from g4v_jax.models.gpt4video import GPT4Video
    from g4v_jax.models.llama import LlamaForCausalLM

    video = None
    if isinstance(model, GPT4Video):
        cfg = model.cfg
        has_vision, llm, k, video = True, cfg.llm, cfg.num_video_tokens, cfg.video
        num_frames = cfg.num_frames if num_frames is None else num_frames
        image_size = cfg.vision.image_size if image_size is None else image_size
    elif isinstance(model, LlamaForCausalLM):
        has_vision, llm, k = False, model.cfg, 1  # text only; k is unused (the template needs some value)
        num_frames, image_size = num_frames or 1, image_size or 1
    else:
        raise TypeError(f"chat needs a GPT4Video or LlamaForCausalLM model (a gpt4video or llm checkpoint), got "
                        f"{type(model).__name__}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no EOS token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    preprocess = {"sampling": video.sampling, "resize": video.resize} if video is not None else {}
    return _ModelInfo(has_vision, k, llm.max_position_embeddings, llm.vocab_size, int(num_frames), int(image_size),
                      int(eos), int(pad), **preprocess)


def _with_stops(sampling: SamplingConfig, tokenizer) -> SamplingConfig:
    """``sampling`` stopping at the tokens of ``###`` (unless it already names stop sequences)."""
    if sampling.stop_sequences:
        return sampling
    return dataclasses.replace(sampling, stop_sequences=stop_sequences_for(tokenizer, (STOP_STRING,)))


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _prompt_length(info: _ModelInfo, n: int, max_new_tokens: int) -> int:
    """Padded length of an ``n``-token prompt: its bucket, clamped to what the context leaves; raises if too long."""
    room = info.context - max_new_tokens
    if n > room:
        raise ValueError(f"the conversation is {n} tokens, but with max_new_tokens={max_new_tokens} the model's "
                         f"context of {info.context} leaves room for {max(room, 0)}; start a new conversation or "
                         f"lower max_new_tokens")
    return min(bucket_length(n), room)


def _check_vocab(info: _ModelInfo, conv: TokenizedConversation) -> None:
    top = int(conv.input_ids.max(initial=0))
    if top >= info.vocab_size:
        raise ValueError(f"the tokenizer produced id {top}, outside the model's vocabulary of {info.vocab_size}: "
                         f"tokenizer and checkpoint do not belong together")


def _video_arrays(rows: Sequence[Sequence[VideoClip]], num_videos: int, info: _ModelInfo):
    """(B, V, T, S, S, 3) uint8 and (B, V, T) bool with row b's clips first; the rest zeros, fully masked."""
    t, s = info.num_frames, info.image_size
    videos = np.zeros((len(rows), num_videos, t, s, s, 3), np.uint8)
    mask = np.zeros((len(rows), num_videos, t), bool)
    for b, clips in enumerate(rows):
        for v, clip in enumerate(clips):
            videos[b, v], mask[b, v] = clip.frames, clip.frame_mask
    return videos, mask


# --------------------------------------------------------------------------------------------------------------------
# Answers: cleaning and incremental decoding
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str  # the answer, <video> tags included, without the "###" that ended it
    requests: list[VideoRequest]  # the <video>...</video> spans of ``text`` (offsets into ``text``)
    num_tokens: int  # tokens generated (the stop token included)
    videos: tuple = ()  # t2v.RenderedVideo per request when the session renders (path or error each)


_HELD = re.compile(r"[\s#\ufffd]+\Z")  # a streamed tail that may still change: spaces, '#'s, a partial character


def clean_answer(text: str) -> str:
    """The answer in decoded model output: up to the first ``###`` (the next turn's prefix), whitespace-stripped."""
    cut = text.find(STOP_STRING)
    return (text if cut < 0 else text[:cut]).strip()


def finish_answer(text: str, num_tokens: int) -> Answer:
    """``Answer`` of decoded model output: cleaned (``clean_answer``) and its video requests parsed."""
    answer = clean_answer(text)
    return Answer(answer, parse_video_tags(answer), int(num_tokens))


class StreamDecoder:
    """Token ids in, answer text pieces out. Decodes the cumulative ids each time (so BPE merges and multi-byte
    characters come out right) and returns the new part of the cleaned text, holding back a tail that may still
    change (trailing whitespace or '#', which may become the stop string, or a partial character). ``finish``
    flushes; the pieces then concatenate to ``finish_answer(self.text, ...).text``."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # decoded output so far (uncleaned)
        self.emitted = ""

    @property
    def stopped(self) -> bool:
        """The output contains the stop string: the answer is complete."""
        return STOP_STRING in self.text

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._emit(_HELD.sub("", clean_answer(self.text)))

    def finish(self) -> str:
        return self._emit(clean_answer(self.text))

    def _emit(self, visible: str) -> str:
        # visible text only grows; if a decode ever rewrote emitted text, wait until it agrees again
        if len(visible) <= len(self.emitted) or not visible.startswith(self.emitted):
            return ""
        piece, self.emitted = visible[len(self.emitted):], visible
        return piece


# --------------------------------------------------------------------------------------------------------------------
# Interactive session
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ChatSession:
    """A conversation with one model: ``attach_video(path)`` then ``ask(text)``; the history is the prompt.

    ``num_frames`` / ``image_size`` default to the model config's. ``turns`` is the committed history (video turns,
    questions, answers); ``clips[i]`` is video ``i`` of the conversation. Videos attached since the last answer
    are pending: they precede the next question.
    """

    model: Any
    tokenizer: Any
    sampling: SamplingConfig = SamplingConfig()
    num_frames: int | None = None
    image_size: int | None = None
    system_prompt: str = SYSTEM_PROMPT
    seed: int = 0
    turns: list[Turn] = dataclasses.field(default_factory=list)
    clips: list[VideoClip] = dataclasses.field(default_factory=list)
    # input safety gate (g4v_jax.safety.gates.make_video_gate): path -> flagged. A flagged video is not attached and
    # the next question gets the polite refusal without the model seeing the video.
    video_gate: Callable[[str], bool] | None = None
    # the text-to-video step: (requests, stem) -> [t2v.RenderedVideo]; see ``make_renderer``
    renderer: Callable[[Sequence[VideoRequest], str], list] | None = None

    def __post_init__(self) -> None:
        self._refuse_next = False
        self._info = _model_info(self.model, self.tokenizer, self.num_frames, self.image_size)
        self.num_frames, self.image_size = self._info.num_frames, self._info.image_size
        self.sampling = _with_stops(self.sampling, self.tokenizer)
        self.pending: list[int] = []  # indices of attached videos not yet in ``turns``
        self.last_prompt_ids: np.ndarray | None = None  # unpadded ids of the last prompt (video slots = -1)
        self._asked = 0

    def reset(self) -> None:
        """Forget the conversation (turns, videos, pending videos)."""
        self.turns, self.clips, self.pending, self.last_prompt_ids = [], [], [], None
        self._refuse_next = False

    def attach_video(self, path: str | os.PathLike) -> int:
        """Decode a video now (``VideoReadError`` naming the path if unreadable); it precedes the next question.
        Returns its 0-based index in the conversation."""
        if not self._info.has_vision:
            raise ValueError("this model is a text-only LLM: it cannot take videos")
        clip = load_video(path, num_frames=self.num_frames, size=self.image_size, sampling=self._info.sampling,
                          resize=self._info.resize)
        if self.video_gate is not None and self.video_gate(str(path)):
            self._refuse_next = True
            return -1
        self.clips.append(clip)
        self.pending.append(len(self.clips) - 1)
        return len(self.clips) - 1

    def prompt(self, text: str) -> tuple[list[Turn], TokenizedConversation, dict[str, np.ndarray]]:
        """The turns, tokenized conversation and model batch that ``ask(text)`` would generate from."""
        turns = [*self.turns, *(Turn("human", video=i) for i in self.pending), Turn("human", text)]
        conv = tokenize_conversation(self.tokenizer, turns, num_video_tokens=self._info.num_video_tokens,
                                     system_prompt=self.system_prompt, add_generation_prompt=True)
        _check_vocab(self._info, conv)
        length = _prompt_length(self._info, len(conv), self.sampling.max_new_tokens)
        padded = pad_batch([conv], pad_id=self._info.pad_id, length=length, side="left")
        batch = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
        if conv.num_videos:
            batch["videos"], batch["frame_mask"] = _video_arrays([self.clips[:conv.num_videos]],
                                                                 _pow2(conv.num_videos), self._info)
        return turns, conv, batch

    def ask(self, text: str, *, key: jax.Array | None = None,
            on_token: Callable[[str], None] | None = None) -> Answer:
        """Answer a question in the context of the conversation; ``on_token`` gets the answer's text pieces as they
        are generated. The question (after any pending videos) and the answer join the history."""
        if self._refuse_next:  # a flagged input video: refuse without describing it (the video was never attached)
            from g4v_jax.safety.refusal import POLITE_REFUSAL

            self._refuse_next = False
            if on_token is not None:
                on_token(POLITE_REFUSAL)
            self.turns = [*self.turns, *(Turn("human", video=i) for i in self.pending), Turn("human", text),
                          Turn("ai", POLITE_REFUSAL)]
            self.pending = []
            return Answer(POLITE_REFUSAL, [], 0)
        turns, conv, batch = self.prompt(text)
        if key is None:
            key = jax.random.fold_in(jax.random.key(self.seed), self._asked)
        decoder = StreamDecoder(self.tokenizer)
        n = 0
        for step in stream(self.model, batch, self.sampling, key=key, eos_id=self._info.eos_id,
                           pad_id=self._info.pad_id):
            n += 1
            token = int(step[0])
            if token == self._info.eos_id:
                break
            piece = decoder.push(token)
            if piece and on_token is not None:
                on_token(piece)
            if decoder.stopped:
                break
        piece = decoder.finish()
        if piece and on_token is not None:
            on_token(piece)
        answer = finish_answer(decoder.text, n)
        if self.renderer is not None and answer.requests:
            answer = dataclasses.replace(answer, videos=tuple(self.renderer(answer.requests, f"turn{self._asked + 1}")))
        self.turns = turns + ([Turn("ai", answer.text)] if answer.text else [])
        self.pending = []
        self.last_prompt_ids = conv.input_ids
        self._asked += 1
        return answer


def make_renderer(backend_name: str, out_dir: str | os.PathLike, *, settings=None, check_prompt=None,
                  check_video=None, **backend_options) -> Callable[[Sequence[VideoRequest], str], list]:
    """Chat answer -> files: every request's prompt is checked (``check_prompt``), the backend renders the accepted
    ones, every video is checked (``check_video``) and written under ``out_dir``. A failure is reported per request
    and never touches the text answer (``t2v.render_requests``)."""
    from g4v_jax.t2v import T2VSettings, make_backend, render_requests

    backend = make_backend(backend_name, **backend_options)
    settings = settings or T2VSettings()

    def render(requests: Sequence[VideoRequest], stem: str) -> list:
        return render_requests(backend, requests, settings, out_dir, check_prompt=check_prompt,
                               check_video=check_video, stem=stem)

    return render


# --------------------------------------------------------------------------------------------------------------------
# Batch mode
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    id: Any
    turns: list[Turn]
    videos: list[str]
    settings: dict  # the request's own sampling keys and seed


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name!r} must be an integer, got {value!r}")
    return value


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name!r} must be a number, got {value!r}")
    return float(value)


def parse_request(obj: Any, default_id: Any = None) -> ParsedRequest:
    """Check one request (module docstring) and turn it into ``Turn`` s; ``ValueError`` says what is wrong."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"a request must be a JSON object, got {type(obj).__name__}")
    rid = obj.get("id", default_id)
    videos = obj.get("videos", [])
    if not isinstance(videos, list) or not all(isinstance(v, str) and v for v in videos):
        raise ValueError(f"'videos' must be a list of paths, got {videos!r}")
    raw_turns = obj.get("turns")
    if not isinstance(raw_turns, list) or not raw_turns:
        raise ValueError("'turns' must be a non-empty list of {\"from\": \"human\"|\"ai\", \"value\": text} or "
                         "{\"from\": \"human\", \"video\": index}")
    turns = []
    for i, t in enumerate(raw_turns):
        if not isinstance(t, Mapping) or t.get("from") not in ("human", "ai"):
            raise ValueError(f"turn {i} must be an object with \"from\": \"human\" or \"ai\", got {t!r}")
        try:
            if "video" in t:
                turns.append(Turn(t["from"], video=t["video"]))
            else:
                turns.append(Turn(t["from"], t.get("value", "")))
        except ValueError as e:
            raise ValueError(f"turn {i}: {e}") from None
    referenced = [t.video for t in turns if t.video is not None]
    if referenced != list(range(len(videos))):
        raise ValueError(f"the video turns must be numbered 0..{len(videos) - 1} in order, one per path in "
                         f"'videos' ({len(videos)}), got {referenced}")
    if turns[-1].role != "human":
        raise ValueError("the last turn must be a human one (the model answers it)")
    settings = {}
    for name in SAMPLING_KEYS + ("seed",):
        if name in obj:
            check = _number if name in ("temperature", "top_p") else _int
            settings[name] = check(obj[name], name)
    SamplingConfig(**{k: v for k, v in settings.items() if k != "seed"})  # range checks
    return ParsedRequest(rid, turns, videos, settings)


@dataclasses.dataclass
class _Job:
    position: int
    id: Any
    conv: TokenizedConversation
    clips: list[VideoClip]
    sampling: SamplingConfig
    seed: int


def answer_requests(model, tokenizer, requests: Sequence[Mapping], *, sampling: SamplingConfig = SamplingConfig(),
                    batch_size: int = 8, num_frames: int | None = None, image_size: int | None = None,
                    system_prompt: str = SYSTEM_PROMPT, seed: int = 0, progress: bool = True,
                    on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Answer many requests (module docstring) in jitted batches; results in input order.

    ``on_result`` is called with each result as soon as it is final (a request's error at once, answers as their
    batch finishes), so a caller can write them out before the rest are done.

    Requests with the same sampling settings (``sampling`` overridden by their own keys) and seed share batches of
    up to ``batch_size`` rows, grouped by video count and length; each batch is left-padded to one bucketed length
    and its rows' videos to the batch's largest count. A request that cannot be prepared (bad turns, unreadable
    video, too long for the context) gets ``{"id", "error"}``; the others are answered.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from tqdm import tqdm

    info = _model_info(model, tokenizer, num_frames, image_size)
    base = _with_stops(sampling, tokenizer)
    results: list[dict | None] = [None] * len(requests)
    clip_cache: dict[str, VideoClip | VideoReadError] = {}
    groups: dict[tuple[SamplingConfig, int], list[_Job]] = {}
    for pos, obj in enumerate(requests):
        rid = obj.get("id", pos) if isinstance(obj, Mapping) else pos
        try:
            job = _prepare(pos, obj, info, tokenizer, base, seed, system_prompt, clip_cache)
        except ValueError as e:  # VideoReadError included
            results[pos] = {"id": rid, "error": str(e)}
            if on_result is not None:
                on_result(results[pos])
            continue
        groups.setdefault((job.sampling, job.seed), []).append(job)

    with tqdm(total=len(requests), disable=not progress, desc="answering", unit="req", file=sys.stderr) as bar:
        bar.update(sum(r is not None for r in results))
        for (cfg, key_seed), jobs in groups.items():
            jobs.sort(key=lambda j: (j.conv.num_videos, len(j.conv)))
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start:start + batch_size]
                for job, answer in zip(chunk, _run_batch(model, tokenizer, info, chunk, cfg, key_seed, batch_size)):
                    results[job.position] = {
                        "id": job.id, "answer": answer.text,
                        "video_requests": [{"prompt": r.prompt, "index": r.index, "start": r.start, "end": r.end}
                                           for r in answer.requests],
                        "num_tokens": answer.num_tokens,
                    }
                    if on_result is not None:
                        on_result(results[job.position])
                bar.update(len(chunk))
    return results  # type: ignore[return-value]


def _prepare(pos: int, obj, info: _ModelInfo, tokenizer, base: SamplingConfig, seed: int, system_prompt: str,
             clip_cache: dict) -> _Job:
    req = parse_request(obj, default_id=pos)
    cfg = dataclasses.replace(base, **{k: v for k, v in req.settings.items() if k != "seed"})
    if req.videos and not info.has_vision:
        raise ValueError("this model is a text-only LLM: it cannot take videos")
    clips = []
    for path in req.videos:
        if path not in clip_cache:
            try:
                clip_cache[path] = load_video(path, num_frames=info.num_frames, size=info.image_size,
                                              sampling=info.sampling, resize=info.resize)
            except VideoReadError as e:
                clip_cache[path] = e
        if isinstance(clip_cache[path], VideoReadError):
            raise clip_cache[path]
        clips.append(clip_cache[path])
    conv = tokenize_conversation(tokenizer, req.turns, num_video_tokens=info.num_video_tokens,
                                 system_prompt=system_prompt, add_generation_prompt=True)
    _check_vocab(info, conv)
    _prompt_length(info, len(conv), cfg.max_new_tokens)  # raises if it cannot fit
    key_seed = int(req.settings.get("seed", seed)) if cfg.temperature > 0 else 0  # greedy: no key, one group
    return _Job(pos, req.id, conv, clips, cfg, key_seed)


def _run_batch(model, tokenizer, info: _ModelInfo, jobs: list[_Job], cfg: SamplingConfig, seed: int,
               batch_size: int) -> list[Answer]:
    rows = jobs + [jobs[-1]] * (min(batch_size, _pow2(len(jobs))) - len(jobs))  # few batch shapes, few compiles
    length = _prompt_length(info, max(len(j.conv) for j in rows), cfg.max_new_tokens)
    padded = pad_batch([j.conv for j in rows], pad_id=info.pad_id, length=length, side="left")
    batch = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
    num_videos = max(j.conv.num_videos for j in rows)
    if num_videos:
        batch["videos"], batch["frame_mask"] = _video_arrays([j.clips for j in rows], num_videos, info)
    out = generate(model, batch, cfg, key=jax.random.key(seed), eos_id=info.eos_id, pad_id=info.pad_id)
    answers = []
    for b in range(len(jobs)):
        ids = out.tokens[b, :out.lengths[b]].tolist()
        if info.eos_id in ids:
            ids = ids[:ids.index(info.eos_id)]
        answers.append(finish_answer(tokenizer.decode(ids, skip_special_tokens=True), int(out.lengths[b])))
    return answers


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


class CLIError(Exception):
    """A problem the user can fix (bad path, bad input line): printed as one line, exit status 2."""


def read_requests(path: str | os.PathLike) -> list[dict]:
    """Requests of a JSONL file; a line that is not a JSON object is a ``CLIError`` naming ``file:line``. A request
    that is an object but wrong (bad turns, ``max_new_tokens: 0``) is kept: answering gives it its own error and the
    rest of the batch is answered. Relative video paths are resolved against the file's directory; a missing ``id``
    becomes the line number."""
    path = Path(path)
    out = []
    try:
        for lineno, obj in iter_jsonl(path, CLIError):
            if not isinstance(obj, Mapping):
                raise CLIError(f"{path}:{lineno}: a request must be a JSON object, got {type(obj).__name__}")
            obj = dict(obj)
            obj.setdefault("id", lineno)
            videos = obj.get("videos", [])
            if isinstance(videos, list) and all(isinstance(v, str) and v for v in videos):
                obj["videos"] = [resolve_video_path(v, path.parent) for v in videos]
            out.append(obj)
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read {path}: {e}") from None
    if not out:
        raise CLIError(f"{path}: no requests in the file")
    return out


def _load(args):
    import g4v_jax
    from g4v_jax.data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(args.tokenizer or args.ckpt)
    except (OSError, ValueError) as e:
        raise CLIError(f"tokenizer: {e}" + ("" if args.tokenizer else " (pass --tokenizer DIR)")) from None
    try:
        model = g4v_jax.load(args.ckpt, args.overrides)
    except (OSError, ValueError) as e:
        raise CLIError(f"checkpoint {args.ckpt}: {e}") from None
    if not hasattr(model, "language_model") and type(model).__name__ != "LlamaForCausalLM":
        raise CLIError(f"checkpoint {args.ckpt} holds a {type(model).__name__}, not a language model: chat needs a "
                       f"gpt4video or llm checkpoint")
    return model, tokenizer


def repl(session: ChatSession, stdin=None, stdout=None) -> None:
    """The interactive loop (module docstring) over ``stdin`` / ``stdout``."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    tty = stdin.isatty()

    def say(text: str = "", end: str = "\n") -> None:
        stdout.write(text + end)
        stdout.flush()

    say("GPT4Video chat: type a question; /video PATH attaches a video to the next one; /reset; /quit")
    while True:
        if tty:
            say("You: ", end="")
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            say()
            break
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            arg = arg.strip().strip("'\"")
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                session.reset()
                say("(new conversation)")
            elif command == "/video" and arg:
                try:
                    index = session.attach_video(os.path.expanduser(arg))
                    say(f"(video {index + 1} attached: {arg})" if index >= 0 else
                        "(the safety checker flagged this video: it was not attached)")
                except ValueError as e:  # VideoReadError, text-only model
                    say(f"error: {e}")
            elif command == "/video":
                say("usage: /video PATH")
            else:
                say(f"unknown command {command}; commands: /video PATH, /reset, /quit")
            continue
        say(ANSWER_MARKER + " ", end="")
        t0 = time.perf_counter()
        try:
            answer = session.ask(line, on_token=lambda piece: say(piece, end=""))
        except ValueError as e:  # too long for the context
            say(f"\nerror: {e}")
            continue
        except KeyboardInterrupt:
            say("\n(interrupted; the question was dropped)")
            continue
        say()
        for i, request in enumerate(answer.requests, 1):
            say(f"video {i} request: {request.prompt}")
            if i <= len(answer.videos):
                rendered = answer.videos[i - 1]
                say(f"video {i}: {rendered.path}" if rendered.path else f"video {i}: {rendered.error}")
        dt = time.perf_counter() - t0
        print(f"[{answer.num_tokens} tokens in {dt:.1f}s]", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m g4v_jax.chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="model directory (g4v_jax.load)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --ckpt)")
    ap.add_argument("--input", default=None, help="batch mode: requests JSONL")
    ap.add_argument("--output", default=None, help="batch mode: answers JSONL")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--system-prompt", default=SYSTEM_PROMPT)
    ap.add_argument("--safety-checker", default=None,
                    help="converted SD safety checker dir (python -m convert.sd_safety_checker): input and output "
                         "video gate")
    ap.add_argument("--t2v", default=None, help="render the <video> prompts with this backend: solid | diffusers")
    ap.add_argument("--t2v-path", default=None, help="the diffusers pipeline directory (e.g. zeroscope_v2_576w)")
    ap.add_argument("--t2v-out", default="outputs/videos")
    ap.add_argument("--blocklist", default="", help="comma-separated words no video prompt may contain")
    ap.add_argument("overrides", nargs="*", help="model config overrides, e.g. model.compute_dtype=bfloat16")
    args = ap.parse_intermixed_args(argv)
    try:
        _main(args)
    except CLIError as e:
        print(f"g4v_jax.chat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("g4v_jax.chat: interrupted", file=sys.stderr)
        return 130
    return 0


def _safety_and_t2v(args):
    """The input gate and the renderer (prompt check -> backend -> output check -> files) the flags ask for."""
    from g4v_jax.safety.gates import keyword_prompt_check, make_output_video_check, make_video_gate

    gate = check_video = None
    if args.safety_checker:
        from g4v_jax.safety.checker import load_safety_checker

        try:
            checker = load_safety_checker(args.safety_checker)
        except (OSError, ValueError) as e:
            raise CLIError(f"--safety-checker {args.safety_checker}: {e}") from None
        gate, check_video = make_video_gate(checker), make_output_video_check(checker)
    renderer = None
    if args.t2v:
        options = {"path": args.t2v_path} if args.t2v == "diffusers" else {}
        blocklist = [w.strip() for w in args.blocklist.split(",") if w.strip()]
        try:
            renderer = make_renderer(args.t2v, args.t2v_out, check_prompt=keyword_prompt_check(blocklist),
                                     check_video=check_video, **options)
        except (ImportError, ValueError, RuntimeError) as e:  # unknown backend, missing weights, no torch
            raise CLIError(f"--t2v {args.t2v}: {e}") from None
    return gate, renderer


def _main(args) -> None:
    from g4v_jax.weights import CONFIG_FILE

    if not Path(args.ckpt).is_dir():
        raise CLIError(f"--ckpt {args.ckpt}: no such directory")
    if not (Path(args.ckpt) / CONFIG_FILE).is_file():
        raise CLIError(f"--ckpt {args.ckpt}: not a g4v_jax model directory ({CONFIG_FILE} is missing)")
    if (args.input is None) != (args.output is None):
        raise CLIError("batch mode needs both --input and --output")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p)
    except ValueError as e:
        raise CLIError(str(e)) from None
    requests = read_requests(args.input) if args.input else None  # fail on a bad line before loading the model
    model, tokenizer = _load(args)
    if requests is None:
        gate, renderer = _safety_and_t2v(args)
        repl(ChatSession(model, tokenizer, sampling, system_prompt=args.system_prompt, seed=args.seed,
                         video_gate=gate, renderer=renderer))
        return
    answer_batch_file(model, tokenizer, requests, Path(args.output), sampling=sampling, batch_size=args.batch_size,
                      system_prompt=args.system_prompt, seed=args.seed)


def answer_batch_file(model, tokenizer, requests: Sequence[Mapping], output: Path, **kwargs) -> list[dict]:
    """``answer_requests`` with each result appended (and flushed) to ``output`` as it is final, so a crash or
    Ctrl-C keeps every finished answer; once all are done the file is rewritten in input order."""
    done: list[dict] = []
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        out = open(output, "w", encoding="utf-8")
    except OSError as e:
        raise CLIError(f"cannot write {output}: {e.strerror or e}") from None

    def write(result: dict) -> None:
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
        out.flush()
        done.append(result)

    try:
        with out:
            results = answer_requests(model, tokenizer, requests, on_result=write, **kwargs)
    except KeyboardInterrupt:
        raise CLIError(f"interrupted: {len(done)} of {len(requests)} answers are in {output} (each line carries its "
                       "request's id)") from None
    except OSError as e:
        raise CLIError(f"cannot write {output}: {e.strerror or e}") from None
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results), encoding="utf-8")
    os.replace(tmp, output)
    errors = sum("error" in r for r in results)
    print(f"wrote {len(results)} answers to {output}" + (f" ({errors} failed)" if errors else ""), file=sys.stderr)
    return results


if __name__ == "__main__":
    sys.exit(main())
