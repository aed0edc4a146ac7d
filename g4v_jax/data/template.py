"""The conversation template: the one place where GPT4Video's prompt format is written down.

Format (paper §4.1 plus the official release's system prompt)::

    {SYSTEM_PROMPT} ###Human: <video>{video tokens}</video> ###Human: {instruction} ###AI: {answer}

``render`` gives this as a string (logs, debugging, chat display); ``tokenize_conversation`` gives the model's
``input_ids`` and ``labels``. Both are built from the same piece list (``_pieces``), so they cannot drift apart.

Pieces and spaces
    Pieces are joined by a single space, and that space is attached to the *start* of the following piece:
    ``" ###Human:"``, ``" {text}"``, ``" ###AI:"``, ``" {answer}"``, ``" <video>"``. A role prefix therefore ends
    without a trailing space, and an answer starts with one. This is the choice that keeps training and inference
    identical: the generation prompt ends with exactly the tokens of the ``" ###AI:"`` piece that precedes every
    answer in training, and the model then generates ``" {answer}"`` the way BPE tokenizers naturally encode text after
    a space (one ``Ġword`` / ``▁word`` token rather than a lone space token followed by ``word``). The one piece that
    joins without a space is the close tag, which directly follows the video slots.

    Exact layout, with ``N = num_video_tokens`` and ``-1 = VIDEO_PLACEHOLDER_ID``::

        piece                             labels
        BOS (if the tokenizer has one)    IGNORE
        "{system prompt}"                 IGNORE  (omitted when empty; the first prefix then has no leading space)
        " ###Human:"                      IGNORE
        " <video>"  -1 x N  "</video>"    IGNORE  (a video turn; tags numbered when there are several videos)
        " ###Human:"  " {text}"           IGNORE  (a text turn)
        " ###AI:"                         IGNORE
        " {answer}"  EOS                  = ids   (the only labelled tokens)
        [" ###AI:"]                       IGNORE  (add_generation_prompt: the model continues from here, no EOS)

    ``render`` shows the same thing without BOS/EOS (``video_text`` stands in for the slots), so decoding the ids with
    the slots removed and special tokens skipped gives ``render(..., video_text="")``.

Tokenizing pieces
    Each piece is encoded on its own with ``add_special_tokens=False`` and the ids are concatenated, so every label
    border falls exactly on a piece border. The first piece is encoded as the start of a text. Every later piece is
    encoded as a *continuation*: ``encode("\\n" + piece)`` minus the ids of ``encode("\\n")``. Byte-level BPE (GPT-2
    style, and our ``build_bpe_tokenizer``) encodes a piece the same either way; sentencepiece-style LLaMA tokenizers
    prepend a "▁" to every separate ``encode`` call, which would put a spurious space before ``"</video>"`` and double
    the space of ``" ###AI:"`` (legacy ``tokenizer.json``), and the newline anchor absorbs that prefix. When the
    anchor's ids are not a prefix of the anchored encoding (the tokenizer merged across it), the piece is encoded
    plainly instead.

Videos
    A video is a human turn of its own (``Turn("human", video=i)``), numbered ``0..V-1`` in order of appearance, each
    once; anything else is a ``ValueError``. Tags are ``<video>``/``</video>`` for one video and ``<video1>``/
    ``</video1>``, ``<video2>``, ... (1-based) for several. The model replaces each ``VIDEO_PLACEHOLDER_ID`` slot with
    one video token of the corresponding video, in order.

Lengths
    ``max_length`` is a hard limit: a longer conversation raises ``ValueError`` naming its length and the limit. Nothing
    is ever truncated silently (a cut answer or a cut video would train on something that is not the data).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

VIDEO_PLACEHOLDER_ID = -1  # value in input_ids at each video-embedding slot; the model puts video tokens there
IGNORE_INDEX = -100

SYSTEM_PROMPT = (
    "The following is a conversation between a curious human and AI assistant GPT4Video. GPT4Video generates video "
    "prompts at the most appropriate time and gives helpful, detailed, and polite answers to the user's questions."
)
HUMAN_PREFIX = "###Human:"
AI_PREFIX = "###AI:"
ROLES = ("human", "ai")
PAD_SIDES = ("right", "left")

# Encoding anchor for continuation pieces; a newline is a token boundary for byte-level BPE and sentencepiece alike.
_ANCHOR = "\n"


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str  # "human" or "ai"
    text: str = ""
    video: int | None = None  # a human turn that *is* a video: index of the video in the conversation; text empty

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Turn.role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.text, str):
            raise ValueError(f"Turn.text must be a str, got {type(self.text).__name__}")
        if self.video is None:
            if not self.text:
                raise ValueError(f"a {self.role} turn without a video needs non-empty text")
            return
        if self.role != "human":
            raise ValueError(f"only human turns can be videos, got role={self.role!r} with video={self.video!r}")
        # bool is an int subclass; Turn("human", video=True) is a bug, not video 1.
        if isinstance(self.video, bool) or not isinstance(self.video, (int, np.integer)) or self.video < 0:
            raise ValueError(f"Turn.video must be an int >= 0 (the video's index), got {self.video!r}")
        if self.text:
            raise ValueError(f"a video turn has no text (put the instruction in its own human turn), got {self.text!r}")


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: the generated __eq__ would compare arrays ambiguously
class TokenizedConversation:
    input_ids: np.ndarray  # int32 (L,), VIDEO_PLACEHOLDER_ID at video slots
    labels: np.ndarray  # int32 (L,), IGNORE_INDEX except AI answer tokens and the EOS ending each answer
    num_videos: int
    # tokens up to and including the end of the last video span (its close tag), 0 without one; a video written as
    # its caption in tags (stage 2, ``manifest.replace_videos_with_captions``) counts as a video span
    video_prefix: int = 0

    def __post_init__(self) -> None:
        ids, labels = self.input_ids, self.labels
        if ids.dtype != np.int32 or ids.ndim != 1:
            raise ValueError(f"TokenizedConversation.input_ids must be int32 (L,), got {ids.dtype} {ids.shape}")
        if labels.dtype != np.int32 or labels.shape != ids.shape:
            raise ValueError(f"TokenizedConversation.labels must be int32 {ids.shape}, got {labels.dtype} "
                             f"{labels.shape}")
        if self.num_videos < 0:
            raise ValueError(f"num_videos must be >= 0, got {self.num_videos}")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


# --------------------------------------------------------------------------------------------------------------------
# Pieces (shared by render and tokenize_conversation)
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Piece:
    text: str = ""  # text to encode (already carrying its leading separator space)
    video: int | None = None  # a run of video slots instead of text
    labelled: bool = False  # an AI answer: its tokens (and the EOS after it) are trained on
    eos: bool = False  # append EOS after the text
    ends_video: bool = False  # the last piece of a video span: a close tag, or a whole caption-in-tags turn


# A human turn that is a video written as its caption between its tags, as stage 2 writes videos
_CAPTION_VIDEO = re.compile(r"<video(\d*)>.*</video\1>", re.DOTALL)


def is_caption_video(text: str) -> bool:
    """Whether a human turn's text is a video written as its caption in tags (``"<video>a red circle ...</video>"``)."""
    return _CAPTION_VIDEO.fullmatch(text.strip()) is not None


def video_tags(index: int, num_videos: int) -> tuple[str, str]:
    """(open, close) tags of video ``index`` (0-based) among ``num_videos``: unnumbered for one, 1-based for several."""
    if not 0 <= index < num_videos:
        raise ValueError(f"video index {index} out of range for a conversation with {num_videos} video(s)")
    if num_videos == 1:
        return "<video>", "</video>"
    return f"<video{index + 1}>", f"</video{index + 1}>"


def _check_videos(turns: Sequence[Turn]) -> int:
    """Number of videos; raises unless the video turns are numbered 0, 1, ... in order of appearance."""
    found = [t.video for t in turns if t.video is not None]
    if found != list(range(len(found))):
        raise ValueError(
            f"videos must be numbered 0..{len(found) - 1} in order of appearance, each exactly once; "
            f"the video turns have indices {found}"
        )
    return len(found)


def _pieces(turns: Sequence[Turn], system_prompt: str, add_generation_prompt: bool) -> tuple[list[_Piece], int]:
    """The conversation as pieces (module docstring), and its number of videos. Validates the conversation."""
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    for i, turn in enumerate(turns):
        if not isinstance(turn, Turn):
            raise ValueError(f"turn {i} is a {type(turn).__name__}, expected a Turn")
    if add_generation_prompt and turns[-1].role != "human":
        raise ValueError(f"add_generation_prompt needs the last turn to be human, got {turns[-1].role!r}")
    num_videos = _check_videos(turns)

    pieces = [_Piece(system_prompt)] if system_prompt else []
    for turn in turns:
        lead = " " if pieces else ""  # the separator belongs to the next piece; none before the very first
        if turn.role == "ai":
            pieces.append(_Piece(lead + AI_PREFIX))
            pieces.append(_Piece(" " + turn.text, labelled=True, eos=True))
        elif turn.video is not None:
            open_tag, close_tag = video_tags(turn.video, num_videos)
            pieces.append(_Piece(lead + HUMAN_PREFIX))
            pieces.extend([_Piece(" " + open_tag), _Piece(video=turn.video), _Piece(close_tag, ends_video=True)])
        else:
            pieces.append(_Piece(lead + HUMAN_PREFIX))
            pieces.append(_Piece(" " + turn.text, ends_video=is_caption_video(turn.text)))
    if add_generation_prompt:
        pieces.append(_Piece(" " + AI_PREFIX))
    return pieces, num_videos


# --------------------------------------------------------------------------------------------------------------------
# Rendering and tokenization
# --------------------------------------------------------------------------------------------------------------------


def render(
    turns: Sequence[Turn],
    *,
    system_prompt: str = SYSTEM_PROMPT,
    add_generation_prompt: bool = False,
    video_text: str = "<VIDEO>",
) -> str:
    """The conversation as one human-readable string; ``video_text`` stands for each video's tokens.

    ``"{system} ###Human: <video><VIDEO></video> ###Human: {text} ###AI: {answer}"``; with ``add_generation_prompt``
    it ends in ``" ###AI:"`` (no trailing space: the answer brings its own). BOS/EOS are not shown.
    """
    pieces, _ = _pieces(turns, system_prompt, add_generation_prompt)
    return "".join(video_text if p.video is not None else p.text for p in pieces)


def _encode(tokenizer, text: str, anchor: list[int] | None) -> list[int]:
    """ids of ``text`` (no specials); as a continuation of earlier text when given the ids of ``_ANCHOR`` (module
    docstring), else as the start of a text."""
    if anchor is not None:
        anchored = list(tokenizer.encode(_ANCHOR + text, add_special_tokens=False))
        if anchored[: len(anchor)] == anchor:
            return anchored[len(anchor) :]
        # else the tokenizer merged across the anchor; the plain encoding is the best we can do
    return list(tokenizer.encode(text, add_special_tokens=False))


def tokenize_conversation(
    tokenizer,
    turns: Sequence[Turn],
    *,
    num_video_tokens: int,
    system_prompt: str = SYSTEM_PROMPT,
    add_generation_prompt: bool = False,
    max_length: int | None = None,
) -> TokenizedConversation:
    """``input_ids`` and ``labels`` of a conversation for any HF tokenizer (layout in the module docstring).

    Each video takes ``num_video_tokens`` ``VIDEO_PLACEHOLDER_ID`` slots. Only AI answers and the EOS after each are
    labelled. ``max_length`` (in tokens, slots included) is a hard limit: longer raises ``ValueError``.
    """
    if num_video_tokens < 1:
        raise ValueError(f"num_video_tokens must be >= 1, got {num_video_tokens}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1 or None, got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no EOS token; AI answers must end with one")
    pieces, num_videos = _pieces(turns, system_prompt, add_generation_prompt)

    anchor = list(tokenizer.encode(_ANCHOR, add_special_tokens=False))
    bos = tokenizer.bos_token_id
    ids: list[int] = [bos] if bos is not None else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    video_prefix = 0
    for i, piece in enumerate(pieces):
        if piece.video is not None:
            chunk = [VIDEO_PLACEHOLDER_ID] * num_video_tokens
        else:
            chunk = _encode(tokenizer, piece.text, anchor if i > 0 else None)
        if piece.eos:
            chunk = chunk + [eos]
        ids.extend(chunk)
        labels.extend(chunk if piece.labelled else [IGNORE_INDEX] * len(chunk))
        if piece.ends_video:
            video_prefix = len(ids)

    if max_length is not None and len(ids) > max_length:
        raise ValueError(
            f"conversation is too long: {len(ids)} tokens (including {num_videos} video(s) x {num_video_tokens} "
            f"video tokens) > max_length={max_length}; shorten the conversation or raise max_length "
            f"(it is never truncated)"
        )
    return TokenizedConversation(
        input_ids=np.asarray(ids, dtype=np.int32), labels=np.asarray(labels, dtype=np.int32), num_videos=num_videos,
        video_prefix=video_prefix,
    )


# --------------------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------------------


def _render_ids(tokenizer, messages: Sequence[dict], generation: bool) -> list[int]:
    """``messages`` in the tokenizer's own chat template, encoded. The rendering carries the template's own special
    tokens (BOS included), so it is encoded without adding any."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation)
    return list(tokenizer.encode(text, add_special_tokens=False))


def tokenize_chat_template(tokenizer, messages: Sequence[dict]) -> TokenizedConversation:
    """A text-only conversation ``[{"role", "content": str}]`` in the tokenizer's own chat template (a plain LLM
    served as vLLM serves it), ready for the model's answer."""
    ids = np.asarray(_render_ids(tokenizer, messages, True), np.int32)
    return TokenizedConversation(ids, np.full(ids.shape, IGNORE_INDEX, np.int32), num_videos=0)


def _chat_messages(turns: Sequence[Turn]) -> list[dict]:
    return [{"role": "user" if t.role == "human" else "assistant", "content": t.text} for t in turns]


def llm_template_ids(tokenizer, turns: Sequence[Turn]) -> list[int]:
    """The ids of a text-only conversation in the tokenizer's own chat template (``tokenize_in_llm_template``'s
    ``input_ids``), in one rendering; ``ValueError`` without a chat template or with a video turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no chat template for a row in the LLM's "
                         "own template")
    if any(t.video is not None for t in turns):
        raise ValueError("a row in the LLM's own chat template is text only; it has a video turn")
    return _render_ids(tokenizer, _chat_messages(turns), False)


def llm_template_labels(tokenizer, turns: Sequence[Turn], ids: Sequence[int]) -> list[int]:
    """The labels of ``ids`` (``llm_template_ids(tokenizer, turns)``): each assistant message as the template writes
    it (its end-of-turn tokens included), ``IGNORE_INDEX`` elsewhere.

    Each assistant span is the difference between the conversation rendered up to that message and up to the
    message before it with the generation prompt; a template whose renderings are not prefixes of one another, or a
    tokenizer that encodes them differently across that border, raises ``ValueError`` rather than mislabel tokens."""
    ids = list(ids)
    messages = _chat_messages(turns)
    labels = [IGNORE_INDEX] * len(ids)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = _render_ids(tokenizer, messages[:k], True), _render_ids(tokenizer, messages[: k + 1], False)
        if ids[: len(end)] != end or end[: len(start)] != start:
            raise ValueError(f"the tokenizer's chat template does not render message {k} as a continuation of the "
                             "messages before it; its answer tokens cannot be told apart")
        labels[len(start) : len(end)] = end[len(start) :]
    return labels


def tokenize_in_llm_template(tokenizer, turns: Sequence[Turn], *, max_length: int | None = None
                             ) -> TokenizedConversation:
    """A text-only conversation in the tokenizer's own chat template (SmolLM2's ChatML, a LLaMA-3 template...), with
    the template's default system prompt: ``input_ids`` and ``labels`` (``llm_template_labels``). Rows that keep a
    pretrained LLM's chat behaviour are trained here."""
    ids = llm_template_ids(tokenizer, turns)
    if max_length is not None and len(ids) > max_length:  # before the labelling, which renders twice per answer
        raise ValueError(f"conversation is too long: {len(ids)} tokens > max_length={max_length} (it is never "
                         "truncated)")
    labels = llm_template_labels(tokenizer, turns, ids)
    return TokenizedConversation(np.asarray(ids, np.int32), np.asarray(labels, np.int32), num_videos=0)


def pad_batch(
    convs: Sequence[TokenizedConversation], pad_id: int, length: int | None = None, *, side: str = "right"
) -> dict[str, np.ndarray]:
    """Pad conversations to (B, L): ``input_ids`` (pad_id), ``labels`` (IGNORE_INDEX), ``attention_mask`` (bool),
    ``positions`` (int32: 0, 1, ... over real tokens, 0 at pads), ``adapter_mask`` (bool: real tokens after the
    conversation's ``video_prefix``, where ``lora.skip_video_span`` lets the adapters act), ``num_videos`` (B,)
    int32.

    ``side="right"`` for training, ``"left"`` for generation prompts (so every row ends at the same column).
    ``length=None`` pads to the longest conversation; one longer than ``length`` raises ``ValueError``.
    """
    if not convs:
        raise ValueError("pad_batch needs at least one conversation")
    if side not in PAD_SIDES:
        raise ValueError(f"side must be one of {PAD_SIDES}, got {side!r}")
    # A negative pad would read as a video slot (VIDEO_PLACEHOLDER_ID) or be out of the embedding table.
    if pad_id < 0:
        raise ValueError(f"pad_id must be a token id >= 0, got {pad_id}")
    longest = max(len(c) for c in convs)
    if length is None:
        length = longest
    elif longest > length:
        worst = max(range(len(convs)), key=lambda b: len(convs[b]))
        raise ValueError(f"conversation {worst} has {longest} tokens, more than the batch length {length}")

    batch = len(convs)
    input_ids = np.full((batch, length), pad_id, np.int32)
    labels = np.full((batch, length), IGNORE_INDEX, np.int32)
    mask = np.zeros((batch, length), np.bool_)
    for b, conv in enumerate(convs):
        n = len(conv)
        cols = slice(0, n) if side == "right" else slice(length - n, length)
        input_ids[b, cols], labels[b, cols], mask[b, cols] = conv.input_ids, conv.labels, True
    positions = np.where(mask, np.cumsum(mask, axis=1, dtype=np.int32) - 1, 0).astype(np.int32)
    prefix = np.asarray([c.video_prefix for c in convs], np.int32)
    adapter_mask = mask & (positions >= prefix[:, None])
    num_videos = np.asarray([c.num_videos for c in convs], np.int32)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "positions": positions,
            "adapter_mask": adapter_mask, "num_videos": num_videos}
