"""GPT4Video-50k-style instruction dialogues (paper §4.2), written by an LLM behind an OpenAI-compatible endpoint.

    python -m g4v_jax.data.build.instruct --url http://host:8000/v1 --model gpt-4 --out data/g4v50k.jsonl \\
        [--captions webvid.csv --num-single 10000 --single-dialogues 3] [--groups groups.jsonl --multi-dialogues 1] \\
        [--seed 0] [--temperature 0.7] [--workers 4] [--requests-per-minute 500] [--limit N] [--max-retries 5] \\
        [--no-progress]

The API key comes from ``$OPENAI_API_KEY``. A rerun with the same arguments resumes: finished requests are skipped
without a call (``endpoint.run_requests``; progress in ``OUT.progress.jsonl``). The CLI prints a Markdown summary
(also written to ``OUT.report.md``) and exits 0 when every request is finished, 1 when some are left (``--limit``,
failures), 2 on a rejected key or URL.

Inputs
    - ``--captions``: a WebVid-style CSV with a header; ``videoid`` is the id and ``name`` the caption, other
      columns are ignored. Whitespace in captions is collapsed; rows with an empty id or caption are skipped.
      ``--num-single`` captions are drawn uniformly without replacement (reservoir sampling, one pass, memory
      O(N), seeded by ``--seed``); a repeated id in the sample is dropped.
    - ``--groups``: the JSONL written by ``g4v_jax.data.build.pairing``, one group per line:
      ``{"id": "g00001", "captions": [{"id": "123", "caption": "..."}, {"id": "456", "caption": "..."}]}`` with two
      or more captions (other keys, e.g. ``scores``, are ignored). Every group is used.

Prompts (``single_video_prompt``, ``multi_video_prompt``)
    - single: the caption as ``<video> caption </video>``; the LLM writes ``--single-dialogues`` (3) dialogues
      between two people A and B, not a person and an assistant, in which the video is shown or asked for, written
      as ``<video> caption </video>`` where it appears.
    - multi: the captions as ``<videoX> caption </videoX>`` (X = 1..k); the LLM writes ``--multi-dialogues`` (1)
      multi-round dialogues that move between the videos, each video written with its own numbered tags.
    Both ask for JSON only: a list of dialogues, each a list of ``{"speaker": "A" | "B", "text": "..."}``.

Parsing a reply (``reply_dialogues``, ``dialogue_turns``), leniently
    - The JSON is found in the reply as it is, in a code fence, or as the first ``[...]``/``{...}`` that parses
      amid prose. ``{"dialogues": [...]}`` (any single list value) is unwrapped; a single dialogue without the outer
      list is taken as a list of one. A line may be ``{"speaker", "text"}`` (also ``role``/``name`` and
      ``content``/``value``/``message``; keys case-insensitive) or a ``"A: text"`` string.
    - Speakers: the first distinct speaker is the human, the second the AI (``"from": "human"`` / ``"ai"``); a
      third speaker rejects the dialogue. Lines are kept as turns in order (two lines of one speaker in a row stay
      two turns). A dialogue needs at least one AI turn.
    - Video tags (``video_spans``) are checked strictly: only the exact forms ``<video>``/``</video>`` and
      ``<videoN>``/``</videoN>`` (N >= 1, no leading zero); every opening tag is closed by its own closing tag before
      the next opens; the description between them is not empty. A single-video dialogue must show the video at
      least once and use only unnumbered tags. A multi-video dialogue must use only ``1..k`` and show at least two
      distinct videos; its tags are renumbered in order of first appearance (the first video shown is
      ``<video1>``), the convention of ``template.video_tags`` for real videos, so text and video examples agree.
    - The text, tags and descriptions included, is kept as the LLM wrote it: stage 2 trains on this text.
    A reply that is not JSON counts once (``no_json``); otherwise each rejected dialogue counts once under its
    reason (``bad_line``, ``too_many_speakers``, ``no_ai_turn``, ``malformed_tag``, ``unknown_video``,
    ``no_video``, ``too_few_videos``). Rejections never stop the run.

Output
    Our manifest (``g4v_jax.data.manifest``), text only, one example per accepted dialogue, ``"safety": "safe"``::

        {"id": "single-1066674784-0", "conversation": [{"from": "human", "value": "Look: <video> ... </video>"},
                                                       {"from": "ai", "value": "..."}], "safety": "safe"}

    Ids: ``single-<videoid>-<k>`` and ``multi-<group id>-<k>``, k = the dialogue's 0-based index in the reply.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import json
import os
import random
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from g4v_jax.data.build.endpoint import Job, Parsed, add_endpoint_args, run_and_report
from g4v_jax.data.io import read_records, record_id

CSV_ID_COLUMN = "videoid"
CSV_CAPTION_COLUMN = "name"
SINGLE_DIALOGUES = 3  # paper: "three dialogue between two individuals" per caption
MULTI_DIALOGUES = 1

SYSTEM_PROMPT = ("You write natural, realistic conversations between people for a dataset. You always answer with "
                 "JSON only, exactly in the format you are asked for.")

REPLY_FORMAT = (
    'Answer with JSON only, no other text: a list of dialogues ({n} here), each a list of lines '
    '{{"speaker": "A" or "B", "text": "..."}}, for example\n'
    '[[{{"speaker": "A", "text": "..."}}, {{"speaker": "B", "text": "..."}}, ...], ...]'
)

SINGLE_TEMPLATE = (
    "Below is a video, written as its description between video tags:\n\n"
    "<video> {caption} </video>\n\n"
    "Write {count} between two people, A and B, centred on this video. A and B are two people "
    "(friends, family members, colleagues, ...), not a person and an AI assistant: they talk naturally, with their "
    "own feelings, opinions and experiences. In each dialogue the video is shared or asked for: A shows it to B, or "
    "A asks B for a video like this and B shows it. Wherever the video appears in a line, write it exactly as "
    "\"<video> {caption} </video>\". Each dialogue has 2 to 6 lines; A speaks first and the speakers take turns.\n\n"
    + REPLY_FORMAT
)

MULTI_TEMPLATE = (
    "Below are {k} related videos, each written as its description between numbered video tags:\n\n"
    "{videos}\n\n"
    "Write {count} between two people, A and B (friends, family members, colleagues, "
    "...), not a person and an AI assistant: they talk naturally, with their own feelings, opinions and "
    "experiences. The conversation moves between the videos: the speakers show them, ask for them, compare them "
    "and talk about them, and every video appears at least once. Wherever video X appears in a line, write it "
    "exactly as \"<videoX> its description </videoX>\" with its own number X. Each dialogue has 4 to 10 lines; A "
    "speaks first and the speakers take turns.\n\n"
    + REPLY_FORMAT
)


class BuildError(ValueError):
    """Bad builder input; the message names the file (and line) and the problem."""


class DialogueError(ValueError):
    """A reply or dialogue rejected; ``reason`` is the short key it is counted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Caption:
    id: str
    text: str


@dataclasses.dataclass(frozen=True)
class Group:
    id: str
    captions: tuple[Caption, ...]


def collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------


def iter_caption_csv(path: str | os.PathLike, skipped: collections.Counter | None = None) -> Iterator[Caption]:
    """(id, caption) of each usable row of a WebVid-style CSV; rows with an empty id or caption are counted in
    ``skipped["empty"]``. A file without the ``videoid``/``name`` header columns is a ``BuildError``."""
    p = Path(path)
    if not p.is_file():
        raise BuildError(f"caption CSV {str(p)!r} not found (or not a file)")
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in (CSV_ID_COLUMN, CSV_CAPTION_COLUMN) if c not in columns]
        if missing:
            raise BuildError(f"{p}: the header has no column(s) {missing} (found {columns}); a WebVid-style CSV has "
                             f"{CSV_ID_COLUMN!r} (the id) and {CSV_CAPTION_COLUMN!r} (the caption)")
        for row in reader:
            video_id = (row.get(CSV_ID_COLUMN) or "").strip()
            caption = collapse_whitespace(row.get(CSV_CAPTION_COLUMN) or "")
            if not video_id or not caption:
                if skipped is not None:
                    skipped["empty"] += 1
                continue
            yield Caption(video_id, caption)


def reservoir_sample(items: Iterator[Any], n: int, rng: random.Random) -> list[Any]:
    """``n`` items drawn uniformly without replacement from a stream of unknown length (Algorithm R); all of them
    when the stream is shorter."""
    sample: list[Any] = []
    for i, item in enumerate(items):
        if i < n:
            sample.append(item)
        else:
            j = rng.randrange(i + 1)
            if j < n:
                sample[j] = item
    return sample


def sample_captions(path: str | os.PathLike, n: int, seed: int = 0) -> tuple[list[Caption], collections.Counter]:
    """``n`` captions of a WebVid-style CSV drawn uniformly (seeded), repeated ids dropped; and the skip counts."""
    if n < 0:
        raise BuildError(f"the number of captions to sample must be >= 0, got {n}")
    skipped: collections.Counter = collections.Counter()
    sample = reservoir_sample(iter_caption_csv(path, skipped), n, random.Random(seed))
    unique: dict[str, Caption] = {}
    for cap in sample:
        if cap.id in unique:
            skipped["duplicate_id"] += 1
        else:
            unique[cap.id] = cap
    return list(unique.values()), skipped


def _caption_entry(raw: Any, where: str) -> Caption:
    if not isinstance(raw, dict):
        raise BuildError(f"{where}: each caption must be an object {{\"id\", \"caption\"}}, got {raw!r}")
    cap_id, text = raw.get("id"), raw.get("caption")
    if isinstance(cap_id, bool) or not isinstance(cap_id, (str, int)) or str(cap_id).strip() == "":
        raise BuildError(f"{where}: caption \"id\" must be a non-empty string or integer, got {cap_id!r}")
    if not isinstance(text, str) or not text.strip():
        raise BuildError(f"{where}: \"caption\" must be a non-empty string, got {text!r}")
    return Caption(str(cap_id).strip(), collapse_whitespace(text))


def read_groups(path: str | os.PathLike) -> list[Group]:
    """The caption groups of a pairing JSONL (module docstring); ``BuildError`` names ``file:line`` and the
    problem."""

    def parse(raw: Mapping, where: str, lineno: int) -> Group:
        if "id" not in raw:
            raise BuildError(f"{where}: \"id\" must be a non-empty string, got None")
        captions = raw.get("captions")
        if not isinstance(captions, list) or len(captions) < 2:
            raise BuildError(f"{where}: \"captions\" must be a list of 2 or more captions, got {captions!r}")
        return Group(record_id(raw, lineno, where, BuildError), tuple(_caption_entry(c, where) for c in captions))

    return read_records(path, parse, error=BuildError, kind="groups", noun="groups", allow_empty=True)


# --------------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------------


def how_many(n: int, noun: str) -> str:
    """``"one dialogue"`` / ``"3 different dialogues"`` for the prompts."""
    return f"one {noun}" if n == 1 else f"{n} different {noun}s"


def single_video_prompt(caption: str, dialogues: int = SINGLE_DIALOGUES) -> str:
    return SINGLE_TEMPLATE.format(caption=caption, n=dialogues, count=how_many(dialogues, "dialogue"))


def multi_video_prompt(captions: Sequence[str], dialogues: int = MULTI_DIALOGUES) -> str:
    videos = "\n".join(f"<video{x}> {c} </video{x}>" for x, c in enumerate(captions, start=1))
    return MULTI_TEMPLATE.format(k=len(captions), videos=videos, n=dialogues,
                                 count=how_many(dialogues, "multi-round dialogue"))


def chat_messages(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


# --------------------------------------------------------------------------------------------------------------------
# Reply parsing
# --------------------------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n(.*?)```", re.S)
_DECODER = json.JSONDecoder()


def extract_json(reply: str) -> Any:
    """The JSON value in an LLM reply: the whole reply, else a fenced block, else the first ``[``/``{`` that starts
    a value that parses (prose around it ignored). ``DialogueError("no_json")`` when there is none."""
    if not isinstance(reply, str):
        raise DialogueError("no_json", f"the reply is not text: {reply!r}")
    candidates = [reply.strip(), *(m.group(1).strip() for m in _FENCE.finditer(reply))]
    for text in candidates:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    for i, ch in enumerate(reply):
        if ch in "[{":
            try:
                return _DECODER.raw_decode(reply, i)[0]
            except json.JSONDecodeError:
                continue
    raise DialogueError("no_json", f"no JSON in the reply {reply[:120]!r}")


_SPEAKER_KEYS = ("speaker", "role", "name", "from")
_TEXT_KEYS = ("text", "content", "value", "message", "utterance")
_LINE_STRING = re.compile(r"^\s*([^:\n]{1,40}?)\s*:\s*(.+)$", re.S)


def _is_line(obj: Any) -> bool:
    if isinstance(obj, dict):
        keys = {str(k).lower() for k in obj}
        return bool(keys & set(_SPEAKER_KEYS)) and bool(keys & set(_TEXT_KEYS))
    return isinstance(obj, str)


def _unwrap(obj: Any) -> Any:
    """``{"dialogues": [...]}``-style wrappers -> the list inside (the only list value, or a known key)."""
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
        for key in ("dialogues", "conversations", "dialogue", "conversation", "lines", "turns"):
            if isinstance(obj.get(key), list):
                return obj[key]
    return obj


def reply_dialogues(reply: str) -> list[Any]:
    """The list of (raw) dialogues in a reply; ``DialogueError("no_json")`` when there is none."""
    data = _unwrap(extract_json(reply))
    if not isinstance(data, list) or not data:
        raise DialogueError("no_json", f"expected a non-empty JSON list of dialogues, got {str(data)[:120]!r}")
    if all(_is_line(x) for x in data):
        return [data]  # one dialogue without the outer list
    return data


def _line(raw: Any) -> tuple[str, str]:
    """(speaker key, text) of one dialogue line."""
    if isinstance(raw, str):
        m = _LINE_STRING.match(raw)
        if not m:
            raise DialogueError("bad_line", f"a line without a speaker: {raw[:80]!r}")
        speaker, text = m.group(1), m.group(2)
    elif isinstance(raw, dict):
        low = {str(k).lower(): v for k, v in raw.items()}
        speaker = next((low[k] for k in _SPEAKER_KEYS if k in low), None)
        text = next((low[k] for k in _TEXT_KEYS if k in low), None)
    else:
        raise DialogueError("bad_line", f"a line must be an object or a string, got {raw!r}")
    if not isinstance(speaker, (str, int)) or isinstance(speaker, bool) or not str(speaker).strip():
        raise DialogueError("bad_line", f"a line without a speaker: {raw!r}")
    if not isinstance(text, str) or not text.strip():
        raise DialogueError("bad_line", f"a line without text: {raw!r}")
    key = re.sub(r"^(?:person|speaker)\s+", "", collapse_whitespace(str(speaker)).casefold())
    return key, text.strip()


def dialogue_turns(raw: Any) -> list[dict[str, str]]:
    """Manifest turns (``{"from": "human" | "ai", "value": text}``) of one raw dialogue; the first speaker is the
    human, the second the AI. ``DialogueError`` on a bad line, a third speaker or no AI turn."""
    lines = _unwrap(raw)
    if not isinstance(lines, list) or not lines:
        raise DialogueError("bad_line", f"a dialogue must be a non-empty list of lines, got {str(raw)[:80]!r}")
    roles: dict[str, str] = {}
    turns = []
    for line in lines:
        speaker, text = _line(line)
        if speaker not in roles:
            if len(roles) == 2:
                raise DialogueError("too_many_speakers", f"a third speaker {speaker!r}")
            roles[speaker] = "human" if not roles else "ai"
        turns.append({"from": roles[speaker], "value": text})
    if len(roles) < 2:
        raise DialogueError("no_ai_turn", "only one speaker")
    return turns


# Anything that looks like a video tag; each must then be exactly one of the canonical forms.
_TAG_LIKE = re.compile(r"<\s*/?\s*video\s*\d*\s*>", re.I)
_CANONICAL_TAG = re.compile(r"<(/?)video([1-9][0-9]*)?>")


def has_video_tag(text: str) -> bool:
    return _TAG_LIKE.search(text) is not None


def video_spans(text: str) -> list[tuple[int | None, str]]:
    """(number or None, description) of each ``<video>...</video>`` / ``<videoN>...</videoN>`` span in ``text``, in
    order; ``DialogueError("malformed_tag")`` for a non-canonical tag, an unclosed, nested, stray or mismatched tag,
    or an empty description."""
    spans: list[tuple[int | None, str]] = []
    opened: tuple[int | None, int] | None = None  # (number, offset just past the opening tag)
    for m in _TAG_LIKE.finditer(text):
        canonical = _CANONICAL_TAG.fullmatch(m.group())
        if canonical is None:
            raise DialogueError("malformed_tag", f"{m.group()!r} is not <video>, <videoN> or their closing tags")
        closing, number = canonical.group(1) == "/", int(canonical.group(2)) if canonical.group(2) else None
        if not closing:
            if opened is not None:
                raise DialogueError("malformed_tag", f"{m.group()!r} opens before the previous tag was closed")
            opened = (number, m.end())
            continue
        if opened is None:
            raise DialogueError("malformed_tag", f"{m.group()!r} closes nothing")
        if opened[0] != number:
            raise DialogueError("malformed_tag", f"{m.group()!r} closes a tag numbered {opened[0]}")
        description = text[opened[1]:m.start()].strip()
        if not description:
            raise DialogueError("malformed_tag", "a video tag with no description")
        spans.append((number, description))
        opened = None
    if opened is not None:
        raise DialogueError("malformed_tag", "a video tag is never closed")
    return spans


def check_single_video(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """A single-video dialogue shows its video (unnumbered tags only) at least once."""
    numbers = [n for t in turns for n, _ in video_spans(t["value"])]
    if any(n is not None for n in numbers):
        raise DialogueError("unknown_video", "a numbered video tag in a single-video dialogue")
    if not numbers:
        raise DialogueError("no_video", "the video never appears")
    return turns


def check_multi_video(turns: list[dict[str, str]], num_videos: int) -> list[dict[str, str]]:
    """A multi-video dialogue uses only ``<video1>``..``<videoK>``, shows two or more of them, and comes back with
    its tags renumbered in order of first appearance."""
    order: list[int] = []
    for t in turns:
        for n, _ in video_spans(t["value"]):
            if n is None or not 1 <= n <= num_videos:
                raise DialogueError("unknown_video", f"tag number {n} in a dialogue about videos 1..{num_videos}")
            if n not in order:
                order.append(n)
    if len(order) < 2:
        raise DialogueError("too_few_videos", f"{len(order)} distinct video(s) shown; a multi-video dialogue needs 2+")
    new_number = {old: new for new, old in enumerate(order, start=1)}

    def renumber(m: re.Match) -> str:
        return f"<{m.group(1)}video{new_number[int(m.group(2))]}>"

    return [dict(t, value=_CANONICAL_TAG.sub(renumber, t["value"])) for t in turns]


def dialogues_to_examples(reply: str, request_id: str, check: Callable[[list[dict[str, str]]], list[dict[str, str]]],
                          *, safety: str | None) -> Parsed:
    """Every dialogue of a reply that passes ``check`` as a manifest example ``<request_id>-<k>``; the others
    counted by reason (module docstring). Shared by the safety builder."""
    try:
        raw_dialogues = reply_dialogues(reply)
    except DialogueError as e:
        return Parsed([], {e.reason: 1})
    examples: list[dict[str, Any]] = []
    rejected: collections.Counter = collections.Counter()
    for k, raw in enumerate(raw_dialogues):
        try:
            turns = check(dialogue_turns(raw))
        except DialogueError as e:
            rejected[e.reason] += 1
            continue
        example: dict[str, Any] = {"id": f"{request_id}-{k}", "conversation": turns}
        if safety is not None:
            example["safety"] = safety
        examples.append(example)
    return Parsed(examples, dict(rejected))


# --------------------------------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------------------------------


def single_video_job(caption: Caption, dialogues: int = SINGLE_DIALOGUES) -> Job:
    request_id = f"single-{caption.id}"
    return Job(request_id, chat_messages(single_video_prompt(caption.text, dialogues)),
               lambda reply: dialogues_to_examples(reply, request_id, check_single_video, safety="safe"))


def multi_video_job(group: Group, dialogues: int = MULTI_DIALOGUES) -> Job:
    request_id = f"multi-{group.id}"
    k = len(group.captions)
    return Job(request_id, chat_messages(multi_video_prompt([c.text for c in group.captions], dialogues)),
               lambda reply: dialogues_to_examples(reply, request_id, lambda t: check_multi_video(t, k),
                                                   safety="safe"))


def instruct_jobs(captions: Sequence[Caption] = (), groups: Sequence[Group] = (), *,
                  single_dialogues: int = SINGLE_DIALOGUES, multi_dialogues: int = MULTI_DIALOGUES) -> list[Job]:
    """Single-video jobs (in the given order), then multi-video jobs."""
    return ([single_video_job(c, single_dialogues) for c in captions]
            + [multi_video_job(g, multi_dialogues) for g in groups])


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m g4v_jax.data.build.instruct",
                                     description="GPT4Video-50k-style instruction dialogues from video captions.")
    g = parser.add_argument_group("inputs")
    g.add_argument("--captions", help="WebVid-style caption CSV (videoid, name) for single-video dialogues")
    g.add_argument("--num-single", type=int, default=10000, help="captions to sample from --captions")
    g.add_argument("--single-dialogues", type=int, default=SINGLE_DIALOGUES, help="dialogues asked per caption")
    g.add_argument("--groups", help="caption groups JSONL (g4v_jax.data.build.pairing) for multi-video dialogues")
    g.add_argument("--multi-dialogues", type=int, default=MULTI_DIALOGUES, help="dialogues asked per group")
    g.add_argument("--seed", type=int, default=0, help="seed of the caption sample")
    add_endpoint_args(parser)
    args = parser.parse_args(argv)
    if not args.captions and not args.groups:
        parser.error("give --captions and/or --groups")
    if args.single_dialogues < 1 or args.multi_dialogues < 1:
        parser.error("--single-dialogues and --multi-dialogues must be >= 1")
    try:
        captions, skipped = sample_captions(args.captions, args.num_single, args.seed) if args.captions else ([], {})
        groups = read_groups(args.groups) if args.groups else []
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jobs = instruct_jobs(captions, groups, single_dialogues=args.single_dialogues,
                         multi_dialogues=args.multi_dialogues)
    preamble = (f"{len(captions)} sampled caption(s) (skipped: {dict(skipped) or 'none'}), {len(groups)} group(s)")
    return run_and_report(jobs, args, "GPT4Video-50k-style instruction data", preamble=preamble)


if __name__ == "__main__":
    sys.exit(main())
