"""A chat with a loaded model: the prompt of each turn, streamed text, the ``<video>`` requests the model wrote.

``ChatSession`` (``attach_video``, ``ask``, ``reset``) is what the chat CLI and the world demo drive; ``model_info``
and the prompt helpers are shared with batch answering.

Decisions
    - A conversation's prompts go to one engine sized to the model's context; the engine pads them to power-of-two
      buckets, so a conversation reuses a few compiled programs. ``prompt`` adds the left-padded batch ``generate``
      takes (the static reference); ``ask`` does not build it.
    - The answer is the decoded text up to the first ``###`` (the next turn's prefix; generation stops on its tokens,
      and the text check also catches other tokenizations of it), whitespace-stripped; streamed pieces concatenate
      to exactly the answer text (``inference.text.StreamDecoder``).
    - The AI turn stored in the history is the answer text as generated, ``<video>`` tags included (they are part of
      the model's answer in training). An empty answer stores no AI turn (the template has no empty turns).
    - A chat turn runs on a one-slot ``Engine`` (the one road for every answer) and samples with the seed
      ``seed + turn number``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from g4v_jax.config import EngineConfig
from g4v_jax.data.template import SYSTEM_PROMPT, TokenizedConversation, Turn, pad_batch, tokenize_conversation
from g4v_jax.data.video import VideoClip, load_video
from g4v_jax.inference.engine import Engine, EngineRequest
from g4v_jax.inference.generate import SamplingConfig, bucket_length, pow2, stop_sequences_for
from g4v_jax.inference.text import Answer, STOP_STRING, finish_answer
from g4v_jax.models.gpt4video import model_kind
from g4v_jax.safety.refusal import POLITE_REFUSAL
from g4v_jax.t2v import T2VSettings, make_backend, render_requests
from g4v_jax.tags import VideoRequest

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k")


# --------------------------------------------------------------------------------------------------------------------
# Model / tokenizer facts
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelInfo:
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


def cache_length(info: ModelInfo, need: int) -> int:
    """Cache positions for ``need`` (prompt + answer budget): a power of two of at least 512, within the context. A
    decode step reads the whole cache, so a cache of the full context made every step of a short chat read 8192
    positions on SmolLM2; powers of two keep the compiled shapes few."""
    return min(info.context, max(512, pow2(need)))


def model_info(model, tokenizer, num_frames: int | None, image_size: int | None) -> ModelInfo:
    """What answering needs to know of a loaded ``gpt4video`` or ``llm`` model and its tokenizer."""
    kind = model_kind(model)
    video = None
    if kind == "gpt4video":
        cfg = model.cfg
        has_vision, llm, k, video = True, cfg.llm, cfg.num_video_tokens, cfg.video
        num_frames = cfg.num_frames if num_frames is None else num_frames
        image_size = cfg.vision.image_size if image_size is None else image_size
    elif kind == "llm":
        has_vision, llm, k = False, model.cfg, 1  # text only; k is unused (the template needs some value)
        num_frames, image_size = num_frames or 1, image_size or 1
    else:
        raise TypeError(f"answering needs a gpt4video or llm model, got a {kind} model")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no EOS token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    preprocess = {"sampling": video.sampling, "resize": video.resize} if video is not None else {}
    return ModelInfo(has_vision, k, llm.max_position_embeddings, llm.vocab_size, int(num_frames), int(image_size),
                      int(eos), int(pad), **preprocess)


def with_stops(sampling: SamplingConfig, tokenizer) -> SamplingConfig:
    """``sampling`` stopping at the tokens of ``###`` (unless it already names stop sequences)."""
    if sampling.stop_sequences:
        return sampling
    return dataclasses.replace(sampling, stop_sequences=stop_sequences_for(tokenizer, (STOP_STRING,)))


def prompt_length(info: ModelInfo, n: int, max_new_tokens: int) -> int:
    """Padded length of an ``n``-token prompt: its bucket, clamped to what the context leaves; raises if too long."""
    room = info.context - max_new_tokens
    if n > room:
        raise ValueError(f"the conversation is {n} tokens, but with max_new_tokens={max_new_tokens} the model's "
                         f"context of {info.context} leaves room for {max(room, 0)}; start a new conversation or "
                         f"lower max_new_tokens")
    return min(bucket_length(n), room)


def check_vocab(info: ModelInfo, conv: TokenizedConversation) -> None:
    top = int(conv.input_ids.max(initial=0))
    if top >= info.vocab_size:
        raise ValueError(f"the tokenizer produced id {top}, outside the model's vocabulary of {info.vocab_size}: "
                         f"tokenizer and checkpoint do not belong together")


def video_arrays(rows: Sequence[Sequence[VideoClip]], num_videos: int, info: ModelInfo):
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
        self._info = model_info(self.model, self.tokenizer, self.num_frames, self.image_size)
        self.num_frames, self.image_size = self._info.num_frames, self._info.image_size
        self.sampling = with_stops(self.sampling, self.tokenizer)
        self.pending: list[int] = []  # indices of attached videos not yet in ``turns``
        self.last_prompt_ids: np.ndarray | None = None  # unpadded ids of the last prompt (video slots = -1)
        self._asked = 0
        self._engine_obj: Engine | None = None

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

    def conversation(self, text: str) -> tuple[list[Turn], TokenizedConversation]:
        """The turns and tokenized conversation ``ask(text)`` answers; raises if they cannot fit the context."""
        turns = [*self.turns, *(Turn("human", video=i) for i in self.pending), Turn("human", text)]
        conv = tokenize_conversation(self.tokenizer, turns, num_video_tokens=self._info.num_video_tokens,
                                     system_prompt=self.system_prompt, add_generation_prompt=True)
        check_vocab(self._info, conv)
        prompt_length(self._info, len(conv), self.sampling.max_new_tokens)  # raises if it cannot fit
        return turns, conv

    def prompt(self, text: str) -> tuple[list[Turn], TokenizedConversation, dict[str, np.ndarray]]:
        """``conversation(text)`` and the left-padded batch ``generate`` would take for it (the static reference)."""
        turns, conv = self.conversation(text)
        length = prompt_length(self._info, len(conv), self.sampling.max_new_tokens)
        padded = pad_batch([conv], pad_id=self._info.pad_id, length=length, side="left")
        batch = {k: padded[k] for k in ("input_ids", "attention_mask", "adapter_mask")}
        if conv.num_videos:
            batch["videos"], batch["frame_mask"] = video_arrays([self.clips[:conv.num_videos]],
                                                                 pow2(conv.num_videos), self._info)
        return turns, conv, batch

    def _engine(self, num_videos: int, need: int):
        """The session's one-slot engine, its cache ``cache_length(need)`` positions (prompt + answer budget). It is
        rebuilt, re-reading the conversation once, only when a prompt outgrows it or holds more videos than it was
        sized for."""
        cfg = None if self._engine_obj is None else self._engine_obj.cfg
        if cfg is None or cfg.max_videos < num_videos or cfg.max_length < need:
            cfg = EngineConfig(num_slots=1, max_length=cache_length(self._info, need),
                               max_videos=max(4, pow2(num_videos)))
            self._engine_obj = Engine(self.model, self.tokenizer, cfg, eos_id=self._info.eos_id)
        return self._engine_obj

    def ask(self, text: str, *, seed: int | None = None,
            on_token: Callable[[str], None] | None = None) -> Answer:
        """Answer a question in the context of the conversation; ``on_token`` gets the answer's text pieces as they
        are generated. The question (after any pending videos) and the answer join the history."""
        if self._refuse_next:  # a flagged input video: refuse without describing it (the video was never attached)

            self._refuse_next = False
            if on_token is not None:
                on_token(POLITE_REFUSAL)
            self.turns = [*self.turns, *(Turn("human", video=i) for i in self.pending), Turn("human", text),
                          Turn("ai", POLITE_REFUSAL)]
            self.pending = []
            return Answer(POLITE_REFUSAL, [], 0)
        turns, conv = self.conversation(text)
        engine = self._engine(conv.num_videos, len(conv) + self.sampling.max_new_tokens)
        clips = [(c.frames, c.frame_mask) for c in self.clips[:conv.num_videos]]
        handle = engine.submit(EngineRequest.from_conversation(
                                   conv, clips, self.sampling, seed=self.seed + self._asked if seed is None else seed),
                               on_text=on_token)
        engine.run()
        result = handle.result()
        answer = finish_answer(result.text, len(result.tokens))
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
    and never touches the text answer (``t2v.render_requests``).

    ``settings``: a ``T2VSettings``, a dict of its fields over the backend's defaults (``default_settings``: the
    family's for a diffusers pipeline, e.g. 81 frames of 480x832 for Wan), or None for those defaults."""
    backend = make_backend(backend_name, **backend_options)
    defaults = getattr(backend, "default_settings", None) or T2VSettings()
    if isinstance(settings, dict):
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(T2VSettings)})
        if unknown:
            raise ValueError(f"unknown text-to-video setting(s) {unknown}; known: "
                             f"{[f.name for f in dataclasses.fields(T2VSettings)]}")
        settings = dataclasses.replace(defaults, **settings)
    settings = settings or defaults

    def render(requests: Sequence[VideoRequest], stem: str) -> list:
        return render_requests(backend, requests, settings, out_dir, check_prompt=check_prompt,
                               check_video=check_video, stem=stem)

    return render
