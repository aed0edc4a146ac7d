"""The safeguarding dialogues (paper §4.3, Fig. 3 centre and right), written by an LLM behind a chat endpoint.

    python -m g4v_jax.data.build.safety_data --url http://host:8000/v1 --model gpt-4 --out data/safety.jsonl \\
        [--rtp prompts.jsonl [--categories sexually_explicit severe_toxicity] [--threshold 0.9] \\
         [--per-category 1500] [--fields prompt] [--dialogues-per-text 1]] \\
        [--flagged flagged.jsonl [--questions-per-video 3]] \\
        [--seed 0] [--temperature 0.7] [--workers 4] [--requests-per-minute 500] [--limit N] [--no-progress]

Requests, resumability, rate limit, exit status and the Markdown summary are those of
``g4v_jax.data.build.endpoint.run_requests`` (the same loop as ``instruct``); the API key is ``$OPENAI_API_KEY``.
Every example is labelled ``"safety": "harmful"``.

Output side (Fig. 3 centre): refusing harmful requests
    Input (``--rtp``): RealToxicityPrompts JSONL, one object per line: ``{"filename", "begin", "end",
    "challenging", "prompt": {"text", "toxicity", "severe_toxicity", "sexually_explicit", "threat", ...},
    "continuation": {...}}``; scores may be null (never selected).

    Selection (``select_toxic_texts``): for each category in ``--categories`` (default ``sexually_explicit``, then
    ``severe_toxicity``), the candidates are the texts of ``--fields`` (default the prompt only; ``continuation``
    adds continuations, each judged by its own scores) whose score in that category is strictly greater than
    ``--threshold`` (0.9). Each category's candidates are shuffled with a generator seeded by (``--seed``,
    category) and taken in that order, skipping a text already taken (equal after collapsing whitespace and
    case-folding), until ``--per-category`` (1,500) are taken, so no text is used twice; a text above the
    threshold in two categories goes to the first category that reaches it. A category with too few candidates
    gives what it has (the summary shows the counts).

    For each text the LLM writes ``--dialogues-per-text`` (1) dialogue(s) between a user (A, the human) and an AI
    assistant (B): the user makes requests built on the text, at least one for a video about it, and every AI turn
    politely refuses. Parsing is ``instruct``'s (JSON list of ``{"speaker", "text"}`` dialogues, found leniently).
    A dialogue is rejected (counted by reason) when an AI turn is not a refusal (``not_refusal``:
    ``g4v_jax.safety.refusal.is_refusal``, a refusal phrase in its opening) or when any turn contains a video tag
    (``video_tag``: the refusals must not start the text-to-video model). Ids: ``refuse-<category>-<line>-<k>``
    (``<line>c`` for a continuation), k the dialogue's index in the reply.

Input side (Fig. 3 right): refusing flagged input videos
    Input (``--flagged``): a JSONL of videos that the input detector flagged, one per line:
    ``{"id": "clip42", "caption": "a description of the video", "video": "videos/clip42.mp4"}``; ``id`` and
    ``caption`` are required, ``video`` is optional, other keys are errors. Produce it by running the input gate
    (``g4v_jax.safety.gates.make_video_gate``) over candidate videos and keeping the flagged ones with their
    captions (e.g. WebVid captions). The caption is what stage 2 trains on (the video as ``<video>caption</video>``
    text); ``video`` is kept so that the same example can train with the real frames. A relative ``video`` is
    relative to the flagged file's directory and is written relative to the output's directory (files are not
    checked: they may live on another machine).

    For each flagged video the LLM writes ``--questions-per-video`` (3) different messages a user might send with
    it (questions, requests to describe it, continue it, make a similar video); reply: a JSON list of strings.
    Each message becomes one example, the same conversation the chat's input gate produces:
    the video turn, the message, and the AI's ``POLITE_REFUSAL`` (word for word, so that the model and the gate
    refuse alike)::

        {"id": "flagged-clip42-0", "videos": ["../videos/clip42.mp4"], "captions": ["..."],
         "conversation": [{"from": "human", "video": 0}, {"from": "human", "value": "What are they doing?"},
                          {"from": "ai", "value": POLITE_REFUSAL}], "safety": "harmful"}

    Without ``video`` the video turn is the text ``<video>caption</video>`` (the stage-2 form,
    ``manifest.replace_videos_with_captions``). Messages that are empty, repeated or contain a video tag are
    rejected (``bad_question``, ``duplicate_question``, ``video_tag``); a reply without a JSON list, ``no_json``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import random
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from g4v_jax.data.build.endpoint import Job, Parsed, add_endpoint_args, run_and_report
from g4v_jax.data.build.instruct import (
    BuildError,
    DialogueError,
    chat_messages,
    collapse_whitespace,
    dialogues_to_examples,
    extract_json,
    has_video_tag,
    how_many,
)
from g4v_jax.data.io import iter_jsonl, read_records, record_id
from g4v_jax.data.template import video_tags
from g4v_jax.safety.refusal import POLITE_REFUSAL, is_refusal

CATEGORIES = ("sexually_explicit", "severe_toxicity")  # paper §4.3
RTP_SCORES = ("toxicity", "severe_toxicity", "sexually_explicit", "threat", "insult", "identity_attack", "profanity",
              "flirtation")
RTP_FIELDS = ("prompt", "continuation")
THRESHOLD = 0.9
PER_CATEGORY = 1500
DIALOGUES_PER_TEXT = 1
QUESTIONS_PER_VIDEO = 3
FLAGGED_KEYS = ("id", "caption", "video")

_CATEGORY_WORDS = {"sexually_explicit": "sexually explicit", "severe_toxicity": "severely toxic (hateful, abusive "
                   "or violent)", "identity_attack": "an attack on people's identity", "flirtation": "flirtatious"}

REFUSAL_TEMPLATE = (
    "We are building training data that teaches an AI assistant to refuse harmful requests politely. Here is a "
    "text that is {what}:\n\n\"\"\"{text}\"\"\"\n\n"
    "Write {count} between a user (A) and an AI assistant (B). The user makes requests based on "
    "this text, and at least one request asks the assistant to make or show a video about it. Every reply of the "
    "assistant politely refuses: it starts with an apology such as \"I'm sorry, but I can't ...\", briefly says why, "
    "may offer a harmless alternative, never repeats or describes the harmful content and never shows a video. "
    "Each dialogue has 1 to 3 rounds; A speaks first and the speakers take turns.\n\n"
    "Answer with JSON only, no other text: a list of dialogues ({n} here), each a list of lines "
    "{{\"speaker\": \"A\" or \"B\", \"text\": \"...\"}}, for example\n"
    "[[{{\"speaker\": \"A\", \"text\": \"...\"}}, {{\"speaker\": \"B\", \"text\": \"I'm sorry, but ...\"}}]]"
)

QUESTIONS_TEMPLATE = (
    "We are building training data that teaches an AI assistant to decline videos with unsafe content. A user "
    "shares a video that a safety detector flagged; it is described here:\n\n<video> {caption} </video>\n\n"
    "Write {count} the user might send together with this video: questions about it, or requests "
    "to describe it, explain it, continue it or make a similar video. Write only the user's messages, without "
    "video tags and without repeating the description.\n\n"
    "Answer with JSON only, no other text: a list of strings ({n} here), for example [\"...\", \"...\"]"
)


@dataclasses.dataclass(frozen=True)
class ToxicText:
    key: str  # "<line>" for a prompt text, "<line>c" for a continuation; unique within the input file
    text: str
    category: str
    score: float


@dataclasses.dataclass(frozen=True)
class RTPText:
    key: str
    text: str
    scores: dict[str, float | None]


@dataclasses.dataclass(frozen=True)
class FlaggedVideo:
    id: str
    caption: str
    video: str | None  # as it goes into the manifest (relative to the output's directory), or None


# --------------------------------------------------------------------------------------------------------------------
# RealToxicityPrompts
# --------------------------------------------------------------------------------------------------------------------


def _score(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BuildError(f"{where}: a score must be a number or null, got {value!r}")
    return float(value)


def read_rtp(path: str | os.PathLike, fields: Sequence[str] = ("prompt",)) -> list[RTPText]:
    """The texts (of ``fields``) of a RealToxicityPrompts JSONL with their scores; ``BuildError`` names
    ``file:line`` and the field. Entries with an empty text are left out."""
    bad = [f for f in fields if f not in RTP_FIELDS]
    if bad or not fields:
        raise BuildError(f"fields must be among {list(RTP_FIELDS)}, got {list(fields)}")
    p = Path(path)
    if not p.is_file():
        raise BuildError(f"RealToxicityPrompts file {str(p)!r} not found (or not a file)")
    texts: list[RTPText] = []
    for lineno, raw in iter_jsonl(p, BuildError):
        if not isinstance(raw, dict):
            raise BuildError(f"{p}:{lineno}: expected a JSON object, got {type(raw).__name__}")
        for field in fields:
            part = raw.get(field)
            if part is None and field == "continuation":
                continue  # some dumps have prompts only
            where = f"{p}:{lineno}: {field!r}"
            if not isinstance(part, dict):
                raise BuildError(f"{where} must be an object with \"text\" and scores, got {part!r}")
            text = part.get("text")
            if not isinstance(text, str):
                raise BuildError(f"{where}: \"text\" must be a string, got {text!r}")
            if not text.strip():
                continue
            scores = {name: _score(part.get(name), f"{where}.{name}") for name in RTP_SCORES if name in part}
            key = f"{lineno}" if field == "prompt" else f"{lineno}c"
            texts.append(RTPText(key, text.strip(), scores))
    return texts


def select_toxic_texts(texts: Sequence[RTPText], *, categories: Sequence[str] = CATEGORIES,
                       threshold: float = THRESHOLD, per_category: int = PER_CATEGORY,
                       seed: int = 0) -> tuple[list[ToxicText], dict[str, int]]:
    """The texts for the refusal dialogues (module docstring) and each category's number of candidates."""
    unknown = [c for c in categories if c not in RTP_SCORES]
    if unknown:
        raise BuildError(f"unknown categor(y/ies) {unknown}; RealToxicityPrompts scores are {list(RTP_SCORES)}")
    if len(set(categories)) != len(categories):
        raise BuildError(f"categories repeat: {list(categories)}")
    if per_category < 0:
        raise BuildError(f"per_category must be >= 0, got {per_category}")
    used: set[str] = set()
    selected: list[ToxicText] = []
    candidates_per_category: dict[str, int] = {}
    for category in categories:
        candidates = [t for t in texts if t.scores.get(category) is not None and t.scores[category] > threshold]
        candidates_per_category[category] = len(candidates)
        # a per-category generator: adding a category or changing another's count leaves this one's order alone
        random.Random(f"{seed}:{category}").shuffle(candidates)
        taken = 0
        for t in candidates:
            if taken == per_category:
                break
            norm = collapse_whitespace(t.text).casefold()
            if norm in used:
                continue
            used.add(norm)
            selected.append(ToxicText(t.key, t.text, category, float(t.scores[category])))
            taken += 1
    return selected, candidates_per_category


def refusal_prompt(text: str, category: str, dialogues: int = DIALOGUES_PER_TEXT) -> str:
    what = _CATEGORY_WORDS.get(category, category.replace("_", " "))
    return REFUSAL_TEMPLATE.format(what=what, text=text, n=dialogues, count=how_many(dialogues, "dialogue"))


def check_refusals(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """Every AI turn refuses and no turn contains a video tag."""
    if any(has_video_tag(t["value"]) for t in turns):
        raise DialogueError("video_tag", "a video tag in a safety dialogue")
    for t in turns:
        if t["from"] == "ai" and not is_refusal(t["value"]):
            raise DialogueError("not_refusal", f"an AI turn that does not refuse: {t['value'][:80]!r}")
    return turns


def refusal_job(item: ToxicText, dialogues: int = DIALOGUES_PER_TEXT) -> Job:
    request_id = f"refuse-{item.category}-{item.key}"
    return Job(request_id, chat_messages(refusal_prompt(item.text, item.category, dialogues)),
               lambda reply: dialogues_to_examples(reply, request_id, check_refusals, safety="harmful"))


# --------------------------------------------------------------------------------------------------------------------
# Flagged input videos
# --------------------------------------------------------------------------------------------------------------------


def read_flagged(path: str | os.PathLike, out_path: str | os.PathLike) -> list[FlaggedVideo]:
    """The flagged videos of a JSONL (module docstring), video paths re-based on ``out_path``'s directory;
    ``BuildError`` names ``file:line`` and the problem."""
    here, out_dir = Path(path).resolve().parent, Path(out_path).resolve().parent

    def parse(raw: Mapping, where: str, lineno: int) -> FlaggedVideo:
        if "id" not in raw:
            raise BuildError(f"{where}: \"id\" must be a non-empty string or integer, got None")
        caption, video = raw.get("caption"), raw.get("video")
        if not isinstance(caption, str) or not caption.strip():
            raise BuildError(f"{where}: \"caption\" must be a non-empty string (stage 2 trains on it), got "
                             f"{caption!r}")
        if video is not None and (not isinstance(video, str) or not video.strip()):
            raise BuildError(f"{where}: \"video\" must be a non-empty path string when given, got {video!r}")
        if video is not None and not os.path.isabs(video):
            video = os.path.relpath(here / video, out_dir)
        return FlaggedVideo(record_id(raw, lineno, where, BuildError), collapse_whitespace(caption), video)

    return read_records(path, parse, error=BuildError, kind="flagged-video", noun="videos", keys=FLAGGED_KEYS,
                        allow_empty=True)


def questions_prompt(caption: str, n: int = QUESTIONS_PER_VIDEO) -> str:
    return QUESTIONS_TEMPLATE.format(caption=caption, n=n, count=how_many(n, "message"))


def flagged_examples(reply: str, item: FlaggedVideo, request_id: str) -> Parsed:
    """One refusal example per acceptable user message in the reply (module docstring)."""
    try:
        data = extract_json(reply)
    except DialogueError as e:
        return Parsed([], {e.reason: 1})
    if isinstance(data, dict):  # {"messages": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list) or not data:
        return Parsed([], {"no_json": 1})
    if item.video is not None:
        video_turn: dict[str, Any] = {"from": "human", "video": 0}
        media: dict[str, Any] = {"videos": [item.video], "captions": [item.caption]}
    else:
        open_tag, close_tag = video_tags(0, 1)
        video_turn, media = {"from": "human", "value": f"{open_tag}{item.caption}{close_tag}"}, {}
    examples: list[dict[str, Any]] = []
    rejected: collections.Counter = collections.Counter()
    seen: set[str] = set()
    for k, question in enumerate(data):
        if isinstance(question, dict):  # {"text": ...}
            question = next((v for v in question.values() if isinstance(v, str)), None)
        if not isinstance(question, str) or not question.strip():
            rejected["bad_question"] += 1
            continue
        question = question.strip()
        if has_video_tag(question):
            rejected["video_tag"] += 1
            continue
        norm = collapse_whitespace(question).casefold()
        if norm in seen:
            rejected["duplicate_question"] += 1
            continue
        seen.add(norm)
        examples.append({"id": f"{request_id}-{k}", **media,
                         "conversation": [video_turn, {"from": "human", "value": question},
                                          {"from": "ai", "value": POLITE_REFUSAL}],
                         "safety": "harmful"})
    return Parsed(examples, dict(rejected))


def flagged_job(item: FlaggedVideo, questions: int = QUESTIONS_PER_VIDEO) -> Job:
    request_id = f"flagged-{item.id}"
    return Job(request_id, chat_messages(questions_prompt(item.caption, questions)),
               lambda reply: flagged_examples(reply, item, request_id))


def safety_jobs(toxic: Iterable[ToxicText] = (), flagged: Iterable[FlaggedVideo] = (), *,
                dialogues_per_text: int = DIALOGUES_PER_TEXT, questions_per_video: int = QUESTIONS_PER_VIDEO
                ) -> list[Job]:
    """Output-side jobs (in selection order), then input-side jobs."""
    return ([refusal_job(t, dialogues_per_text) for t in toxic]
            + [flagged_job(f, questions_per_video) for f in flagged])


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def selection_markdown(candidates: dict[str, int], selected: Sequence[ToxicText], threshold: float) -> str:
    per = collections.Counter(t.category for t in selected)
    lines = [f"| category | candidates (score > {threshold:g}) | selected |", "|---|---:|---:|"]
    lines += [f"| {c} | {n} | {per[c]} |" for c, n in candidates.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m g4v_jax.data.build.safety_data",
                                     description="Safety dialogues: polite refusals of harmful requests and videos.")
    g = parser.add_argument_group("output side: RealToxicityPrompts")
    g.add_argument("--rtp", help="RealToxicityPrompts JSONL")
    g.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=RTP_SCORES)
    g.add_argument("--threshold", type=float, default=THRESHOLD, help="select scores strictly above this")
    g.add_argument("--per-category", type=int, default=PER_CATEGORY)
    g.add_argument("--fields", nargs="+", default=["prompt"], choices=RTP_FIELDS)
    g.add_argument("--dialogues-per-text", type=int, default=DIALOGUES_PER_TEXT)
    g.add_argument("--seed", type=int, default=0, help="seed of the selection")
    g = parser.add_argument_group("input side: flagged videos")
    g.add_argument("--flagged", help="JSONL of flagged videos: {id, caption, video?}")
    g.add_argument("--questions-per-video", type=int, default=QUESTIONS_PER_VIDEO)
    add_endpoint_args(parser)
    args = parser.parse_args(argv)
    if not args.rtp and not args.flagged:
        parser.error("give --rtp and/or --flagged")
    if args.dialogues_per_text < 1 or args.questions_per_video < 1:
        parser.error("--dialogues-per-text and --questions-per-video must be >= 1")
    preamble = []
    try:
        selected: list[ToxicText] = []
        if args.rtp:
            selected, candidates = select_toxic_texts(read_rtp(args.rtp, args.fields), categories=args.categories,
                                                      threshold=args.threshold, per_category=args.per_category,
                                                      seed=args.seed)
            preamble.append(selection_markdown(candidates, selected, args.threshold))
        flagged = read_flagged(args.flagged, args.out) if args.flagged else []
        if args.flagged:
            preamble.append(f"{len(flagged)} flagged video(s)")
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jobs = safety_jobs(selected, flagged, dialogues_per_text=args.dialogues_per_text,
                       questions_per_video=args.questions_per_video)
    return run_and_report(jobs, args, "Safety dialogues", preamble="\n\n".join(preamble))


if __name__ == "__main__":
    sys.exit(main())
