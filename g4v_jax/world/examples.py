"""The examples of each training stage of the world (stage 0 text, stage 1 videos, stage 2 text and safety), the
held-out questions and the detector's labels, made from ``language`` and ``scene``; ``tasks.build_world`` writes
them.
"""

from __future__ import annotations

import dataclasses

import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from g4v_jax.data.manifest import Example
from g4v_jax.data.io import iter_jsonl, resolve_video_path
from g4v_jax.data.template import Turn, video_tags
from g4v_jax.world.scene import (
    BACKGROUNDS, COLOURS, HELD_OUT_PAIRS, MAX_OBJECTS, MOTIONS, SHAPES, SIZES, Scene, caption, noun_phrase,
    parse_caption, random_scene
)
from g4v_jax.world.language import (
    BACKGROUND_QUESTION, COUNT_QUESTION, DESCRIBE_INSTRUCTION, GENERATION_TEMPLATES, LOOKALIKE_TEMPLATES_TRAIN,
    QA_PER_TEST_VIDEO, REFUSALS, STAGE2_MIX, TWO_VIDEO_QUESTION, count_answer, fill_request, generation_answer,
    harmful_requests, harmful_training_requests, object_questions, ordinary_questions, two_video_answer,
    two_video_text_example, video_text
)



# --------------------------------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------------------------------


def _rng(seed: int, part: str) -> np.random.Generator:
    """The generator of one part of the world; parts are independent of each other's sizes."""
    return np.random.default_rng([seed, zlib.crc32(part.encode())])


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


QA_TURNS_MAX = 3  # ordinary QA pairs per stage-0/1 example: each costly sequence (a video) teaches several answers


def _qa_turns(rng: np.random.Generator, scene: Scene, max_questions: int = QA_TURNS_MAX) -> list[Turn]:
    """1..max_questions random ordinary QA pairs, then the description."""
    qa = ordinary_questions(scene)
    n = min(len(qa), int(rng.integers(1, max_questions + 1)))
    turns = []
    for k in rng.choice(len(qa), size=n, replace=False):
        turns += [Turn("human", qa[k][0]), Turn("ai", qa[k][1])]
    return turns + [Turn("human", DESCRIBE_INSTRUCTION), Turn("ai", caption(scene))]


# Of stage 0's examples, this fraction is plain language-model text of CORPUS_SENTENCES_PER_EXAMPLE sentences each
# (the rest QA on captions): one sentence for every three QA examples. A sentence is ~15 tokens, so three share a
# row instead of padding one each to the row length (the longest three-sentence example is ~130 tokens).
STAGE0_CORPUS_FRACTION = 0.1
CORPUS_SENTENCES_PER_EXAMPLE = 3


def corpus_sentence(rng: np.random.Generator) -> str:
    """One sentence of the world's language, unpaired: a caption, a request, a generation answer, a harmful request
    or a refusal (training phrasings only). Pre-training teaches the LLM these words and forms, as LLaMA knows
    English, while which answer goes with which request is left to stage 2. No count questions: counting is the
    skill that only stage 2 teaches."""
    kind = int(rng.integers(5))
    if kind == 4:
        return _pick(rng, REFUSALS)
    if kind == 3:
        return _pick(rng, harmful_requests("train"))[1]
    scene = random_scene(rng)  # every pair: see stage0_examples
    if kind == 2:
        return generation_answer(scene)
    if kind == 1:
        return fill_request(_pick(rng, GENERATION_TEMPLATES + LOOKALIKE_TEMPLATES_TRAIN), scene)
    return caption(scene)


# Of stage 0's examples, this fraction asks to rewrite a scene's noun phrase as its caption: copying a long list
# of attributes in order, a skill pre-trained LLMs have (why: docs/world.md).
STAGE0_REWRITE_FRACTION = 0.2
REWRITE_INSTRUCTION = "Write this as a caption: {np}"


def stage0_examples(rng: np.random.Generator, n: int) -> list[Example]:
    """Text-only QA and descriptions of random scenes (videos written as captions in tags), a
    ``STAGE0_REWRITE_FRACTION`` of noun phrase -> caption rewrites, and a ``STAGE0_CORPUS_FRACTION`` of plain
    language-model text (``CORPUS_SENTENCES_PER_EXAMPLE`` unrelated ``corpus_sentence``s, each an AI turn so that
    every token is a target).

    Stage 0 stands in for LLaMA's pre-training, whose text holds "red triangle" as surely as "red circle"; so its
    scenes use every (colour, shape) pair, held-out ones included. Without them a from-scratch LM learns that "red"
    is never followed by "triangle" and cannot even copy a held-out pair from a request into a ``<video>`` tag
    (generation-tag accuracy 0.0 in the run that excluded them). No video and no stage-1 or stage-2 example ever
    holds a held-out pair: the held-out test is of the *visual* combination and of the paper's two stages. The
    rewrites are not generation requests: which answer (a ``<video>`` tag) goes with a request is stage 2's to
    teach."""
    out = []
    for i in range(n):
        draw = rng.random()
        if draw < STAGE0_CORPUS_FRACTION:
            turns = [Turn("ai", corpus_sentence(rng)) for _ in range(CORPUS_SENTENCES_PER_EXAMPLE)]
        elif draw < STAGE0_CORPUS_FRACTION + STAGE0_REWRITE_FRACTION:
            scene = random_scene(rng)  # every pair, as below
            turns = [Turn("human", REWRITE_INSTRUCTION.format(np=noun_phrase(scene))), Turn("ai", caption(scene))]
        else:
            scene = random_scene(rng)  # every pair, held-out ones included (docstring)
            turns = [Turn("human", video_text(scene)), *_qa_turns(rng, scene)]
        out.append(Example(id=f"stage0-{i:06d}", videos=(), captions=(), turns=tuple(turns)))
    return out


def stage1_example(index: int, video: str, scene: Scene, rng: np.random.Generator) -> Example:
    turns = [Turn("human", video=0), *_qa_turns(rng, scene)]
    return Example(id=f"stage1-{index:06d}", videos=(video,), captions=(caption(scene),), turns=tuple(turns))


# Of stage 0's examples (added after them, from their own generator, so the others stay as they were) and of stage 1's
# (pairs of its own videos): two videos and TWO_VIDEO_QUESTION, so that a chat can ask about two videos at once.
TWO_VIDEO_FRACTION = 0.1


def stage0_two_video_examples(rng: np.random.Generator, n: int) -> list[Example]:
    return [Example(id=f"stage0-two-{i:06d}", videos=(), captions=(), turns=tuple(two_video_text_example(rng)))
            for i in range(n)]


def stage1_two_video_examples(rng: np.random.Generator, singles: Sequence[Example], n: int) -> list[Example]:
    """``n`` examples pairing two of stage 1's single-video examples' videos."""
    out = []
    for i in range(n):
        a, b = (singles[k] for k in rng.choice(len(singles), size=2, replace=False))
        turns = (Turn("human", video=0), Turn("human", video=1), Turn("human", TWO_VIDEO_QUESTION),
                 Turn("ai", two_video_answer(parse_caption(a.captions[0]), parse_caption(b.captions[0]))))
        out.append(Example(id=f"stage1-two-{i:06d}", videos=(a.videos[0], b.videos[0]),
                           captions=(a.captions[0], b.captions[0]), turns=turns))
    return out


# Stage 2's examples with a real stage-1 video (a share of n_text, on top of it): with data.stage2_keep_videos the
# adapters learn to answer after a real video span, not only after its caption (measured: docs/world.md).
STAGE2_VIDEO_FRACTION = 0.15


def stage2_video_examples(rng: np.random.Generator, singles: Sequence[Example], n: int,
                          harmful_pool: Sequence[tuple[str, str]]) -> list[Example]:
    """``n`` stage-2 examples that keep a video of stage 1's single-video examples: half of them with one ordinary
    question about it and its answer, then a generation request whose answer never depends on the video. No counting:
    counting real videos stays learnt from text only."""
    out = []
    for i in range(n):
        ex = singles[int(rng.integers(len(singles)))]
        turns = [Turn("human", video=0)]
        if rng.random() < 0.5:
            q, a = _pick(rng, ordinary_questions(parse_caption(ex.captions[0])))
            turns += [Turn("human", q), Turn("ai", a)]
        out.append(Example(id=f"stage2-video-{i:06d}", videos=ex.videos, captions=ex.captions,
                           turns=(*turns, *_request_exchange("generation", rng, harmful_pool))))
    return out


# Stage 2's questions about two real stage-1 videos (a share of n_text, on top of it): without them stage 2, which
# never shows two videos, took two-video questions from 94% at stage 1 to 39% (seed 0, docs/world.md).
STAGE2_TWO_VIDEO_FRACTION = 0.05


def stage2_two_video_examples(rng: np.random.Generator, singles: Sequence[Example], n: int) -> list[Example]:
    """``stage1_two_video_examples`` kept in stage 2 (``data.stage2_keep_videos``), with stage-2 ids."""
    return [dataclasses.replace(ex, id=ex.id.replace("stage1-two-", "stage2-two-"))
            for ex in stage1_two_video_examples(rng, singles, n)]


# Of stage 2's harmful and look-alike requests, this fraction comes in a chat's second turn, so that a refusal
# does not hinge on the request being the first; what precedes it is chosen so that no example holds two
# scenes to copy from (docs/world.md).
STAGE2_REQUEST_AFTER_EXCHANGE = 0.3


def _request_exchange(kind: str, rng: np.random.Generator, harmful_pool: Sequence[tuple[str, str]],
                      max_objects: int = MAX_OBJECTS) -> list[Turn]:
    """A request of ``kind`` ("harmful", "generation" or "lookalike") and the answer stage 2 teaches for it."""
    if kind == "harmful":
        return [Turn("human", _pick(rng, harmful_pool)[1]), Turn("ai", _pick(rng, REFUSALS))]
    scene = random_scene(rng, max_objects=max_objects, exclude_pairs=HELD_OUT_PAIRS)
    templates = GENERATION_TEMPLATES if kind == "generation" else LOOKALIKE_TEMPLATES_TRAIN
    return [Turn("human", fill_request(_pick(rng, templates), scene)), Turn("ai", generation_answer(scene))]


def _stage2_example(kind: str, rng: np.random.Generator, harmful_pool: Sequence[tuple[str, str]]
                    ) -> tuple[list[Turn], str | None]:
    """(turns, safety label) of one stage-2 example of ``kind`` (a key of ``STAGE2_MIX``); a label is the last
    request's."""
    if kind in ("harmful", "lookalike"):
        turns, max_objects = [], MAX_OBJECTS
        if rng.random() < STAGE2_REQUEST_AFTER_EXCHANGE:
            if kind == "harmful":
                turns = _request_exchange(_pick(rng, ("harmful", "generation")), rng, harmful_pool, max_objects=2)
            else:
                turns = _request_exchange("harmful", rng, harmful_pool)
                max_objects = 2
        label = "harmful" if kind == "harmful" else "safe"
        return turns + _request_exchange(kind, rng, harmful_pool, max_objects), label
    if kind == "generation":
        return _request_exchange(kind, rng, harmful_pool), None
    scene = random_scene(rng, exclude_pairs=HELD_OUT_PAIRS)
    if kind == "two_video":
        return two_video_text_example(rng, HELD_OUT_PAIRS), None
    if kind == "video_generation":  # understanding, then generation, in one chat (the paper's Fig. 1)
        if rng.random() < VIDEO_SPAN_NOISE:
            return [Turn("human", noise_video_text(rng)), *_request_exchange("generation", rng, harmful_pool)], None
        q, a = _pick(rng, ordinary_questions(scene))
        return [Turn("human", video_text(scene)), Turn("human", q), Turn("ai", a),
                *_request_exchange("generation", rng, harmful_pool)], None
    if kind == "count":
        turns = [Turn("human", COUNT_QUESTION), Turn("ai", count_answer(scene))]
        if rng.random() < 0.5:  # sometimes next to an ordinary question, in either order
            q, a = _pick(rng, ordinary_questions(scene))
            extra = [Turn("human", q), Turn("ai", a)]
            turns = extra + turns if rng.random() < 0.5 else turns + extra
        return [Turn("human", video_text(scene)), *turns], None
    return [Turn("human", video_text(scene)), *_qa_turns(rng, scene)], None


# Of stage 2's generation requests after a video, this fraction has a video span of random caption words instead of a
# caption (and no question): whatever the span holds, the answer copies the request.
VIDEO_SPAN_NOISE = 0.5
_SPAN_WORDS = tuple(w for words in (SIZES, COLOURS, SHAPES, BACKGROUNDS, MOTIONS, ("a", "and", "on", "background"))
                    for phrase in words for w in phrase.split())


def noise_video_text(rng: np.random.Generator) -> str:
    """A video span of 8-32 random caption words in tags: not a scene, and never a held-out pair's two words."""
    open_tag, close_tag = video_tags(0, 1)
    while True:
        words = [_SPAN_WORDS[k] for k in rng.choice(len(_SPAN_WORDS), size=int(rng.integers(8, 33)))]
        if not set(zip(words, words[1:])) & HELD_OUT_PAIRS:
            return open_tag + " ".join(words) + close_tag


def stage2_examples(rng: np.random.Generator, n: int, mix: Mapping[str, float] = STAGE2_MIX) -> list[Example]:
    """Text-only stage-2 examples in the ``mix`` proportions, shuffled."""
    counts = {k: int(round(f * n)) for k, f in mix.items()}
    counts["qa"] += n - sum(counts.values())
    kinds = [k for k, c in counts.items() for _ in range(c)]
    rng.shuffle(kinds)
    pool = harmful_training_requests()
    out = []
    for i, kind in enumerate(kinds):
        turns, safety = _stage2_example(kind, rng, pool)
        out.append(Example(id=f"stage2-{i:06d}-{kind}", videos=(), captions=(), turns=tuple(turns), safety=safety))
    return out


def held_out_scene(rng: np.random.Generator, index: int, *, hazard: bool = False) -> Scene:
    """A test scene with exactly one held-out pair (cycling through them)."""
    pair = sorted(HELD_OUT_PAIRS)[index % len(HELD_OUT_PAIRS)]
    return random_scene(rng, exclude_pairs=HELD_OUT_PAIRS - {pair}, require_pair=pair, hazard=hazard)


def held_out_questions(rng: np.random.Generator, scene: Scene) -> list[tuple[str, str]]:
    """Up to ``QA_PER_TEST_VIDEO`` questions about the held-out object (colour, shape, motion) or the background."""
    candidates = [qa for o in scene.objects if o.pair in HELD_OUT_PAIRS for qa in object_questions(scene, o)]
    candidates.append((BACKGROUND_QUESTION, scene.background))
    keep = rng.choice(len(candidates), size=min(QA_PER_TEST_VIDEO, len(candidates)), replace=False)
    return [candidates[k] for k in sorted(keep)]


def detector_examples(path: str | os.PathLike) -> list[tuple[str, bool]]:
    """(video path, harmful) pairs of a ``detector_train.jsonl``, paths resolved against the file's directory."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"detector file {path} not found")
    out = []
    for lineno, raw in iter_jsonl(path):
        if not isinstance(raw, Mapping) or set(raw) != {"video", "harmful"} or not isinstance(raw["harmful"], bool) \
                or not isinstance(raw["video"], str) or not raw["video"]:
            raise ValueError(f"{path}:{lineno}: expected {{\"video\": non-empty path, \"harmful\": true|false}}, "
                             f"got {raw!r}")
        out.append((resolve_video_path(raw["video"], path.parent), raw["harmful"]))
    return out
