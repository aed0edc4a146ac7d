"""Training manifests: one JSON example per line (JSONL), validated on read, and converters from public formats.

Schema (one object per line; blank lines are ignored)::

    {"id": "vc11k-000123",                              // required, unique within the file
     "videos": ["videos/abc.mp4"],                      // optional; relative to the manifest's directory, or absolute
     "captions": ["a man rides a horse on a beach"],    // optional; exactly one per video
     "conversation": [{"from": "human", "video": 0},    // required, non-empty; "from" is "human" or "ai"
                      {"from": "human", "value": "Describe the video in detail."},
                      {"from": "ai", "value": "A man ..."}],
     "safety": "safe",                                  // optional: "safe", "harmful" or null
     "distill": false,                                  // optional: true trains the example toward the untuned
                                                        // LLM's predictions (train.distill_weight) instead of its text
     "template": "gpt4video"}                           // optional: "llm" writes a text-only example in the LLM
                                                        // tokenizer's own chat template (data.template)

Rules, all checked by ``read_manifest`` (the first violation raises ``ManifestError`` naming ``file:line``):

- A turn is either a video (``{"from": "human", "video": i}``) or text (``{"from": ..., "value": "..."}``, non-empty),
  never both. Only human turns can be videos.
- Videos are numbered ``0..V-1`` in order of appearance and each appears exactly once, so ``videos[i]`` is the i-th
  video the model sees. This is the rule of ``template.tokenize_conversation``; checking it here turns a bad line into
  an error at load time instead of a crash in a data-loader worker mid-training.
- ``captions`` is empty or has one entry per video. Stage 2 (``replace_videos_with_captions``) needs it.
- Unknown keys are errors (a misspelt ``"caption"`` would otherwise silently train without captions), as in the
  config files.

Paths stay as written in the file; ``data.io.resolve_video_path``
joins a relative one with the manifest's directory, so a
dataset directory can be moved or mounted elsewhere as a whole.

Stage 2 (text only)
    GPT4Video's second stage tunes the LLM on text: every video is replaced by its caption, written where the video
    was and wrapped in the same tags the template puts around video tokens (``<video>caption</video>``, or
    ``<video1>...</video1>``, ``<video2>...`` when there are several; ``template.video_tags``). GPT4Video-50k ships in
    exactly this form, so ``from_gpt4video50k`` copies its text as is.

Converters
    ``from_videochat11k`` (VideoChat-11K instruction data) and ``from_gpt4video50k`` (GPT4Video-50k-style
    conversations) write our manifest and return how many examples they wrote. Entries that cannot become a valid
    example are skipped, counted by reason and logged; the CLI prints the counts::

        python -m g4v_jax.data.manifest videochat11k IN.json VIDEO_DIR OUT.jsonl
        python -m g4v_jax.data.manifest gpt4video50k IN.json OUT.jsonl
        python -m g4v_jax.data.manifest check OUT.jsonl
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from g4v_jax.data.io import read_records, write_jsonl
from g4v_jax.data.template import ROLES, Turn, video_tags

SAFETY_LABELS = ("safe", "harmful")
MANIFEST_KEYS = ("id", "videos", "captions", "conversation", "safety", "distill", "template")
# "gpt4video": the ###Human/###AI prompt every stage trains on; "llm": the tokenizer's own chat template, for text-only
# rows that keep a pretrained LLM's chat behaviour (template.tokenize_in_llm_template)
TEMPLATES = ("gpt4video", "llm")
# The instruction used when a description has no question (VideoChat-11K's detailed descriptions).
DESCRIBE_INSTRUCTION = "Describe the video in detail."

_log = logging.getLogger(__name__)


class ManifestError(ValueError):
    """A manifest (or converter input) that does not fit the schema; the message names the file, line and problem."""


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    videos: tuple[str, ...]  # as written in the manifest (see resolve_video_path)
    captions: tuple[str, ...]  # empty, or one per video
    turns: tuple[Turn, ...]
    safety: str | None = None
    distill: bool = False  # stage 2: its tokens train toward the untuned LLM (train.distill_weight), not its text
    template: str = "gpt4video"  # one of TEMPLATES

    @property
    def num_answers(self) -> int:
        """Number of AI turns (the only labelled text)."""
        return sum(t.role == "ai" for t in self.turns)


# --------------------------------------------------------------------------------------------------------------------
# Parsing and validation
# --------------------------------------------------------------------------------------------------------------------


def _parse_turn(raw: Any, k: int) -> Turn:
    """One ``conversation`` entry -> ``Turn``; ``ValueError`` with a short reason (the caller adds file:line)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"conversation[{k}] must be an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"from", "value", "video"})
    if unknown:
        raise ValueError(f"conversation[{k}] has unknown key(s) {unknown} (allowed: from, value, video)")
    role = raw.get("from")
    if role not in ROLES:
        raise ValueError(f"conversation[{k}]: unknown role {role!r} (\"from\" must be one of {list(ROLES)})")
    if "video" in raw and "value" in raw:
        raise ValueError(f"conversation[{k}] has both \"video\" and \"value\"; a video is a turn of its own")
    if "video" in raw:
        video = raw["video"]
        if isinstance(video, bool) or not isinstance(video, int):
            raise ValueError(f"conversation[{k}]: \"video\" must be an integer index, got {video!r}")
        if role != "human":
            raise ValueError(f"conversation[{k}]: only human turns can be videos, got from={role!r}")
        return Turn("human", video=video)
    value = raw.get("value")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"conversation[{k}]: \"value\" must be a non-empty string, got {value!r}")
    return Turn(role, value)


def _str_list(raw: Any, key: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(s, str) and s for s in raw):
        raise ValueError(f"{key!r} must be a list of non-empty strings, got {raw!r}")
    return tuple(raw)


def example_from_dict(raw: Any) -> Example:
    """Validate one parsed manifest line; ``ValueError`` with a short reason on any violation of the schema."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(MANIFEST_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} (allowed: {', '.join(MANIFEST_KEYS)})")
    ex_id = raw.get("id")
    if not isinstance(ex_id, str) or not ex_id:
        raise ValueError(f"\"id\" must be a non-empty string, got {ex_id!r}")
    videos = _str_list(raw.get("videos"), "videos")
    captions = _str_list(raw.get("captions"), "captions")
    if captions and len(captions) != len(videos):
        raise ValueError(f"{len(captions)} caption(s) for {len(videos)} video(s); give one caption per video or none")
    conversation = raw.get("conversation")
    if not isinstance(conversation, list) or not conversation:
        raise ValueError("\"conversation\" must be a non-empty list of turns")
    turns = tuple(_parse_turn(t, k) for k, t in enumerate(conversation))
    order = [t.video for t in turns if t.video is not None]
    for index in order:
        if index >= len(videos):
            raise ValueError(f"video index {index} out of range: the example has {len(videos)} video(s)")
    if order != list(range(len(videos))):
        raise ValueError(
            f"video turns must show videos 0..{len(videos) - 1} in order, each exactly once; got indices {order}"
        )
    safety = raw.get("safety")
    if safety is not None and safety not in SAFETY_LABELS:
        raise ValueError(f"\"safety\" must be one of {list(SAFETY_LABELS)} or null, got {safety!r}")
    distill = raw.get("distill", False)
    if not isinstance(distill, bool):
        raise ValueError(f"\"distill\" must be true or false, got {distill!r}")
    template = raw.get("template", "gpt4video")
    if template not in TEMPLATES:
        raise ValueError(f"\"template\" must be one of {list(TEMPLATES)}, got {template!r}")
    if template == "llm" and videos:
        raise ValueError("an example in the LLM's own template (\"template\": \"llm\") is text only; it has videos")
    return Example(id=ex_id, videos=videos, captions=captions, turns=turns, safety=safety, distill=distill,
                   template=template)


def example_to_dict(ex: Example) -> dict[str, Any]:
    """The manifest line of ``ex`` (optional fields omitted when empty)."""
    out: dict[str, Any] = {"id": ex.id}
    if ex.videos:
        out["videos"] = list(ex.videos)
    if ex.captions:
        out["captions"] = list(ex.captions)
    out["conversation"] = [
        {"from": t.role, "video": int(t.video)} if t.video is not None else {"from": t.role, "value": t.text}
        for t in ex.turns
    ]
    if ex.safety is not None:
        out["safety"] = ex.safety
    if ex.distill:
        out["distill"] = True
    if ex.template != "gpt4video":
        out["template"] = ex.template
    return out


def read_manifest(path: str | os.PathLike) -> list[Example]:
    """All examples of a JSONL manifest, every line validated; ``ManifestError`` names ``file:line`` and the problem."""

    def parse(raw: Mapping[str, Any], where: str, lineno: int) -> Example:
        try:
            return example_from_dict(raw)
        except ValueError as e:
            raise ManifestError(f"{where}: {e}") from None

    return read_records(path, parse, error=ManifestError, kind="manifest", noun="examples", allow_empty=True)


def write_manifest(path: str | os.PathLike, examples: Iterable[Example]) -> None:
    """Write ``examples`` as JSONL (UTF-8, one per line); the file appears complete or not at all."""
    write_jsonl(path, (example_to_dict(ex) for ex in examples))


# --------------------------------------------------------------------------------------------------------------------
# Stage 2
# --------------------------------------------------------------------------------------------------------------------


def replace_videos_with_captions(ex: Example) -> Example:
    """Stage 2: each video turn i becomes the human text turn ``"<video>{caption}</video>"`` (numbered tags when the
    example has several videos); videos and captions are dropped. An example without videos is returned unchanged."""
    if not ex.videos:
        return ex
    if len(ex.captions) != len(ex.videos) or not all(c.strip() for c in ex.captions):
        raise ManifestError(
            f"example {ex.id!r} has {len(ex.videos)} video(s) but {len(ex.captions)} caption(s) (empty ones "
            f"included); stage 2 replaces every video by its caption, so each video needs a non-empty caption"
        )
    n = len(ex.videos)
    turns = []
    for turn in ex.turns:
        if turn.video is None:
            turns.append(turn)
            continue
        open_tag, close_tag = video_tags(turn.video, n)
        turns.append(Turn("human", f"{open_tag}{ex.captions[turn.video].strip()}{close_tag}"))
    return dataclasses.replace(ex, videos=(), captions=(), turns=tuple(turns))


# --------------------------------------------------------------------------------------------------------------------
# Converters
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConversionResult:
    written: int
    skipped: Mapping[str, int]  # reason -> count

    def summary(self, out_path: str | os.PathLike) -> str:
        total = sum(self.skipped.values())
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"wrote {self.written} examples to {os.fspath(out_path)}; skipped {total}" + (
            f" ({reasons})" if total else ""
        )


def _load_json_list(json_path: str | os.PathLike) -> list[Any]:
    p = Path(json_path)
    if not p.is_file():
        raise ManifestError(f"input {str(p)!r} not found (or not a file)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{p}: not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise ManifestError(f"{p}: expected a JSON list of entries at the top level, got {type(data).__name__}")
    return data


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _videochat_turns(entry: Mapping[str, Any]) -> list[dict[str, Any]] | str:
    """Conversation turns (manifest form, after the video turn) of one VideoChat entry, or the reason to skip it."""
    if "QA" in entry:
        qa = entry["QA"]
        if not isinstance(qa, list) or not qa:
            return "missing_fields"
        turns: list[dict[str, Any]] = []
        for k, pair in enumerate(qa):
            if not isinstance(pair, Mapping):
                return "missing_fields"
            # "q" may be empty (the detailed-description part); VideoChat2-style entries put the instruction in "i".
            question = _text(pair.get("q")) or _text(pair.get("i"))
            answer = _text(pair.get("a"))
            if not answer:
                return "missing_fields"
            if not question:
                if k > 0:  # a later answer without its question would follow the previous answer directly
                    return "missing_fields"
                question = DESCRIBE_INSTRUCTION
            turns += [{"from": "human", "value": question}, {"from": "ai", "value": answer}]
        return turns
    caption = _text(entry.get("caption"))
    if not caption:
        return "missing_fields"
    return [{"from": "human", "value": DESCRIBE_INSTRUCTION}, {"from": "ai", "value": caption}]


def convert_videochat11k(
    json_path: str | os.PathLike, video_dir: str | os.PathLike, out_path: str | os.PathLike, *, check_files: bool = True
) -> ConversionResult:
    """``from_videochat11k`` with the skip counts (see there)."""
    entries = _load_json_list(json_path)
    out_dir = Path(out_path).resolve().parent
    video_root = Path(video_dir).resolve()
    examples: list[Example] = []
    skipped: collections.Counter[str] = collections.Counter()
    for i, entry in enumerate(entries):
        video = _text(entry.get("video")) if isinstance(entry, Mapping) else ""
        turns = _videochat_turns(entry) if video else "missing_fields"
        if isinstance(turns, str):
            skipped[turns] += 1
            _log.warning("videochat11k entry %d skipped: %s", i, turns)
            continue
        file = video_root / video
        if check_files and not file.exists():
            skipped["missing_video_file"] += 1
            _log.warning("videochat11k entry %d skipped: video file %s does not exist", i, file)
            continue
        # Relative to the manifest when possible, so manifest + videos move together.
        rel = os.path.relpath(file, out_dir)
        raw = {"id": f"vc11k-{i:06d}", "videos": [rel], "conversation": [{"from": "human", "video": 0}, *turns]}
        try:
            examples.append(example_from_dict(raw))
        except ValueError as e:
            skipped["invalid"] += 1
            _log.warning("videochat11k entry %d skipped: %s", i, e)
    write_manifest(out_path, examples)
    return ConversionResult(written=len(examples), skipped=dict(skipped))


def from_videochat11k(
    json_path: str | os.PathLike, video_dir: str | os.PathLike, out_path: str | os.PathLike, *, check_files: bool = True
) -> int:
    """VideoChat-11K instruction JSON -> our manifest; returns the number of examples written.

    Input: a JSON list of ``{"video": "xxx.mp4", "QA": [{"q": ..., "a": ...}, ...]}`` (the conversation part; the
    detailed-description part has one pair whose ``q`` may be empty, and VideoChat2-style pairs may carry the
    instruction in ``"i"``) or ``{"video": ..., "caption": ...}``. Each becomes: the video turn, then the question
    (``DESCRIBE_INSTRUCTION`` when empty) and answer turns. Ids are ``vc11k-{index in the input:06d}``; video paths are
    written relative to ``out_path``'s directory. Entries with missing fields, and (``check_files``) those whose video
    file does not exist under ``video_dir``, are skipped, counted and logged. No captions are written: the detailed
    descriptions are answers, not the short captions stage 2 needs.
    """
    return convert_videochat11k(json_path, video_dir, out_path, check_files=check_files).written


_G4V_ROLES = {"human": "human", "gpt": "ai", "ai": "ai"}


def convert_gpt4video50k(json_path: str | os.PathLike, out_path: str | os.PathLike) -> ConversionResult:
    """``from_gpt4video50k`` with the skip counts (see there)."""
    entries = _load_json_list(json_path)
    examples: list[Example] = []
    seen: set[str] = set()
    skipped: collections.Counter[str] = collections.Counter()

    def skip(i: int, reason: str, detail: str = "") -> None:
        skipped[reason] += 1
        _log.warning("gpt4video50k entry %d skipped: %s%s", i, reason, f" ({detail})" if detail else "")

    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            skip(i, "missing_fields", "not an object")
            continue
        raw_id, convs = entry.get("id"), entry.get("conversations")
        if raw_id is None or raw_id == "" or not isinstance(convs, list) or not convs:
            skip(i, "missing_fields")
            continue
        ex_id = str(raw_id)
        if ex_id in seen:
            skip(i, "duplicate_id", ex_id)
            continue
        turns = []
        for turn in convs:
            if not isinstance(turn, Mapping):
                break
            role = _G4V_ROLES.get(turn["from"]) if isinstance(turn.get("from"), str) else None
            value = _text(turn.get("value"))
            if role is None or not value:
                break
            turns.append({"from": role, "value": value})
        if len(turns) != len(convs):
            skip(i, "bad_turn", f"id {ex_id!r}: unknown role or empty value")
            continue
        raw = {"id": ex_id, "conversation": turns, "safety": entry.get("safety")}
        try:
            examples.append(example_from_dict(raw))
        except ValueError as e:
            skip(i, "invalid", str(e))
            continue
        seen.add(ex_id)
    write_manifest(out_path, examples)
    return ConversionResult(written=len(examples), skipped=dict(skipped))


def from_gpt4video50k(json_path: str | os.PathLike, out_path: str | os.PathLike) -> int:
    """GPT4Video-50k-style conversations -> our manifest (text only, for stage 2); returns the number written.

    Input: a JSON list of ``{"id", "conversations": [{"from": "human" | "gpt", "value": ...}], "safety"?}`` whose
    values already contain videos as ``<video>caption</video>`` / ``<videoX>caption</videoX>`` text; that text is
    kept as is and ``"gpt"`` becomes ``"ai"``. Entries with missing fields, unknown roles, empty values, a repeated
    id or a safety label other than ``safe``/``harmful``/null are skipped, counted and logged.
    """
    return convert_gpt4video50k(json_path, out_path).written


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m g4v_jax.data.manifest",
        description="Convert public datasets to our JSONL manifest, or check one.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    vc = sub.add_parser("videochat11k", help="VideoChat-11K instruction JSON -> manifest")
    vc.add_argument("input", help="the instruction JSON (a list of {video, QA} or {video, caption})")
    vc.add_argument("video_dir", help="directory the entries' video names are relative to")
    vc.add_argument("output", help="manifest to write (.jsonl)")
    vc.add_argument("--no-check-files", action="store_true", help="write entries whose video file does not exist")
    g4 = sub.add_parser("gpt4video50k", help="GPT4Video-50k-style conversation JSON -> manifest (text only)")
    g4.add_argument("input")
    g4.add_argument("output")
    check = sub.add_parser("check", help="validate a manifest and print a summary (what training would skip: "
                                         "python -m g4v_jax.data.check)")
    check.add_argument("manifest")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.ERROR)  # per-entry skip warnings would flood the terminal; counts are printed
    try:
        if args.command == "videochat11k":
            result = convert_videochat11k(args.input, args.video_dir, args.output, check_files=not args.no_check_files)
            print(result.summary(args.output))
        elif args.command == "gpt4video50k":
            result = convert_gpt4video50k(args.input, args.output)
            print(result.summary(args.output))
        else:
            examples = read_manifest(args.manifest)
            videos = sum(len(ex.videos) for ex in examples)
            captioned = sum(bool(ex.captions) for ex in examples)
            print(f"{args.manifest}: {len(examples)} examples, {videos} videos, {captioned} examples with captions")
            print(f"what training would skip, and why: python -m g4v_jax.data.check {args.manifest} --config CFG")
    except (ValueError, OSError) as e:  # ManifestError, ConfigError, a tokenizer that does not load
        print(f"g4v_jax.data.manifest: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
