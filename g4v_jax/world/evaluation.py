"""The world demo's evaluation: video QA by question type, generation tags (the request rendered and matched),
two-video questions, the safety benchmark with the learned detector, and the scripted chat transcript; each through
the inference layer (``answer_requests``, ``ChatSession``) and the eval modules' pieces.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np



from g4v_jax.data.io import iter_jsonl, resolve_video_path
from g4v_jax.eval import qa, safety
from g4v_jax.eval.qa import read_qa
from g4v_jax.inference import ChatSession, SamplingConfig, answer_requests, make_renderer
from g4v_jax.safety.gates import make_video_gate
from g4v_jax.t2v.base import T2VSettings, make_backend, render_requests
from g4v_jax.tags import parse_video_tags
from g4v_jax.world.backend import match_request
from g4v_jax.world.language import COUNT_WORDS, SYSTEM_PROMPT, generation_answer, ordinary_questions
from g4v_jax.world.scene import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, parse_caption

RENDER_SETTINGS = T2VSettings(num_frames=16, height=64, width=64)  # what the world's T2V backend renders

def sampling(max_new_tokens: int = 48):

    return SamplingConfig(max_new_tokens)


def eval_qa(model, tokenizer, qa_file: Path, limit: int, progress: bool) -> dict:
    """Offline exact/contains-match accuracy (``g4v_jax.eval.qa``) on at most ``limit`` items of ``qa_file``."""
    items = qa.read_qa(qa_file)[:limit]
    answers, errors = qa.answer_items(model, tokenizer, items, sampling=sampling(16), batch_size=32,
                                      progress=progress, system_prompt=SYSTEM_PROMPT)
    by_type: dict[str, list[bool]] = {}
    for it in items:
        by_type.setdefault(question_type(it.question), []).append(qa.exact_match(answers.get(it.id, ""), it.answer))
    # whether the answer is one the question's type allows, right or wrong: the QA format was learned
    valid = [answers.get(it.id, "").strip() in answer_vocabulary(it.question) for it in items]
    return {**qa.score(items, answers)["offline"], "errors": len(errors), "valid_answer_rate": float(np.mean(valid)),
            "exact_match_by_type": {k: float(np.mean(v)) for k, v in by_type.items()},
            "examples": [{"question": it.question, "answer": it.answer, "prediction": answers.get(it.id, "")}
                         for it in items[:5]]}


def question_type(question: str) -> str:
    """The question's template: its first two words ("What colour", "How does", "How many", ...)."""
    return " ".join(question.split()[:2])


def answer_vocabulary(question: str) -> tuple[str, ...]:
    """The answers the world allows for ``question``'s type (the colours for a colour question, ...)."""
    return {"What colour": COLOURS, "What shape": SHAPES, "How does": MOTIONS, "What is": BACKGROUNDS,
            "How many": COUNT_WORDS}.get(question_type(question), ())


def chance_accuracy(qa_file: str | Path) -> float:
    """The exact-match accuracy of the best blind guesser: for each question type, always the answer most frequent
    in ``qa_file`` itself (an upper bound on any answer that ignores the video)."""
    by_type: dict[str, Counter] = {}
    items = read_qa(qa_file)
    for it in items:
        by_type.setdefault(question_type(it.question), Counter())[it.answer] += 1
    return sum(c.most_common(1)[0][1] for c in by_type.values()) / max(len(items), 1)


def after_video_question_requests(rows: Sequence[dict], qa_file: Path) -> list[dict]:
    """Each generation request of ``rows`` in a chat's second turn, after a question about a held-out video of
    ``qa_file`` (its items in turn) and that question's true answer: understanding, then generation, in one chat."""
    items = read_qa(qa_file)
    chats = []
    for i, row in enumerate(rows):
        it = items[i % len(items)]
        chats.append({"id": row["id"], "videos": [it.video],
                      "turns": [{"from": "human", "video": 0}, {"from": "human", "value": it.question},
                                {"from": "ai", "value": it.answer}, {"from": "human", "value": row["request"]}]})
    return chats


def scene_words(scene) -> set[tuple[str, str]]:
    """A scene's attribute values as (kind, word): every object's colour, shape, size and motion, and the
    background (the unit the leakage measure counts in)."""
    words = {("background", scene.background)}
    for o in scene.objects:
        words |= {("colour", o.colour), ("shape", o.shape), ("size", o.size), ("motion", o.motion)}
    return words


def attribute_leakage(wanted_caption: str, video_caption: str, answer: str) -> dict:
    """How a generated scene relates to the request and to the video asked about before it in the same chat:
    ``kept``, the fraction of the request's attribute values (``scene_words``) the generated scene holds; ``leaked``,
    the values it holds that the video has and the request does not (a colour of the video's circle painted on the
    requested triangle). An answer without a parseable ``<video>`` prompt keeps nothing and is not judged for
    leakage (``parsed`` False)."""
    wanted, video = scene_words(parse_caption(wanted_caption)), scene_words(parse_caption(video_caption))
    tags = parse_video_tags(answer)
    try:
        got = scene_words(parse_caption(tags[0].prompt)) if tags else None
    except ValueError:
        got = None
    if got is None:
        return {"parsed": False, "kept": 0.0, "leaked": []}
    return {"parsed": True, "kept": len(wanted & got) / len(wanted),
            "leaked": sorted(f"{kind}:{word}" for kind, word in (got - wanted) & video)}


def leakage_summary(judged: Sequence[dict]) -> dict:
    """Means over ``attribute_leakage`` results: requested values kept (all answers), the share of parsed answers
    that took a value from the video, and which kinds of value leaked how often."""
    parsed = [j for j in judged if j["parsed"]]
    kinds = Counter(word.split(":")[0] for j in parsed for word in j["leaked"])
    return {"requested_kept": float(np.mean([j["kept"] for j in judged])) if judged else 0.0,
            "leak_rate": sum(bool(j["leaked"]) for j in parsed) / max(len(parsed), 1),
            "leaked_by_kind": dict(sorted(kinds.items())), "parsed": len(parsed), "n": len(judged)}


def video_captions(catalogue: Path) -> dict[str, str]:
    """The caption of every video of a world's ``catalogue.jsonl``, by path (``resolve_video_path``'s, as
    ``read_qa`` gives them)."""
    return {resolve_video_path(row["video"], catalogue.parent): row["caption"] for _, row in iter_jsonl(catalogue)}


def _tags_match(row: dict, answer: str) -> bool:
    """Whether the answer's first ``<video>`` prompt parses to the scene ``row`` requests."""
    tags = parse_video_tags(answer)
    return bool(tags) and match_request(row["caption"], tags[0].prompt)


def eval_generation(model, tokenizer, requests_file: Path, limit: int, out: Path, n_videos: int,
                    progress: bool, qa_file: Path | None = None, catalogue: Path | None = None) -> dict:
    """Generation-tag accuracy: the first ``<video>`` prompt of the answer parses to the requested scene. The first
    ``n_videos`` answers are rendered by the world's T2V backend and written next to their requests. With
    ``qa_file``, also ``"after_video_question"``: the accuracy when each request follows a video question
    (``after_video_question_requests``), and with the world's ``catalogue`` (the videos' captions) its
    ``"leakage"`` (``attribute_leakage``: requested values kept, values taken from the video)."""
    rows = [row for _, row in iter_jsonl(requests_file)][:limit]
    requests = [{"id": r["id"], "turns": [{"from": "human", "value": r["request"]}]} for r in rows]
    results = answer_requests(model, tokenizer, requests, sampling=sampling(48), batch_size=32,
                              system_prompt=SYSTEM_PROMPT, progress=progress)
    correct, records = 0, []
    backend = make_backend("world")
    for row, res in zip(rows, results):
        answer = res.get("answer", "")
        ok = _tags_match(row, answer)
        correct += ok
        records.append({"request": row["request"], "wanted": row["caption"], "answer": answer, "correct": ok})
    samples = []
    video_dir = out / "generated"
    for i, rec in enumerate(records[:n_videos]):
        tags = parse_video_tags(rec["answer"])
        if not tags:
            samples.append({**rec, "video": None, "error": "no <video> tag in the answer"})
            continue
        rendered = render_requests(backend, tags[:1], dataclasses.replace(RENDER_SETTINGS, seed=i),
                                   video_dir, stem=f"request{i + 1}", gif=True)[0]
        samples.append({**rec, "video": str(rendered.path) if rendered.path else None, "error": rendered.error})
    result = {"accuracy": correct / max(len(rows), 1), "n": len(rows), "samples": samples, "records": records}
    if qa_file is not None:
        second = answer_requests(model, tokenizer, after_video_question_requests(rows, qa_file),
                                 sampling=sampling(48), batch_size=32, system_prompt=SYSTEM_PROMPT, progress=progress)
        hits = [_tags_match(row, res.get("answer", "")) for row, res in zip(rows, second)]
        result["after_video_question"] = {"accuracy": float(np.mean(hits)) if hits else 0.0, "n": len(rows),
                                          "errors": sum("error" in res for res in second),
                                          "examples": [res.get("answer", res.get("error")) for res in second[:5]]}
        if catalogue is not None:
            captions = video_captions(catalogue)
            chats = after_video_question_requests(rows, qa_file)
            result["after_video_question"]["leakage"] = leakage_summary(
                [attribute_leakage(row["caption"], captions[chat["videos"][0]], res.get("answer", ""))
                 for row, chat, res in zip(rows, chats, second)])
    return result


MULTI_TURN_QUESTIONS = 6  # the longest chat about one video the metric asks (the 6-turn chat)


def eval_multi_turn(model, tokenizer, qa_file: Path, catalogue: Path, limit: int, progress: bool) -> dict:
    """Questions about one video asked one after another in a chat (the model's own answers in the history) against
    the same questions asked alone. For each of the first ``limit`` videos of ``qa_file``: every unambiguous question
    of its scene (``language.ordinary_questions``, at most ``MULTI_TURN_QUESTIONS``, rotated by the video's index so
    that no question kind always comes first). ``turns_2plus`` and ``alone_2plus`` score the same questions (those of
    turns >= 2), in the chat and alone; ``by_turn`` is the chat's exact match per turn."""
    captions = video_captions(catalogue)
    videos = list(dict.fromkeys(it.video for it in read_qa(qa_file)))[:limit]
    chats = []
    for j, video in enumerate(videos):
        qs = ordinary_questions(parse_caption(captions[video]))
        qs = (qs[j % len(qs):] + qs[:j % len(qs)])[:MULTI_TURN_QUESTIONS]
        chats.append((video, qs))

    def ask(requests):
        return [r.get("answer", "").strip() for r in answer_requests(
            model, tokenizer, requests, sampling=sampling(16), batch_size=32, system_prompt=SYSTEM_PROMPT,
            progress=progress)]

    alone = ask([{"id": f"{j}-{k}", "videos": [v], "turns": [{"from": "human", "video": 0},
                                                               {"from": "human", "value": q}]}
                 for j, (v, qs) in enumerate(chats) for k, (q, _) in enumerate(qs)])
    alone_hit = {}
    i = 0
    for j, (_, qs) in enumerate(chats):
        for k, (_, a) in enumerate(qs):
            alone_hit[j, k] = alone[i] == a
            i += 1
    history = [[{"from": "human", "video": 0}] for _ in chats]
    chat_hit = {}
    for k in range(MULTI_TURN_QUESTIONS):
        live = [j for j, (_, qs) in enumerate(chats) if k < len(qs)]
        if not live:
            break
        for j in live:
            history[j].append({"from": "human", "value": chats[j][1][k][0]})
        answers = ask([{"id": f"{j}-{k}", "videos": [chats[j][0]], "turns": list(history[j])} for j in live])
        for j, answer in zip(live, answers):
            history[j].append({"from": "ai", "value": answer})
            chat_hit[j, k] = answer == chats[j][1][k][1]
    later = [key for key in chat_hit if key[1] >= 1]
    mean = lambda keys, hits: float(np.mean([hits[key] for key in keys])) if keys else 0.0  # noqa: E731
    return {"turns_2plus": mean(later, chat_hit), "alone_2plus": mean(later, alone_hit),
            "turn_1": mean([key for key in chat_hit if key[1] == 0], chat_hit),
            "by_turn": [mean([key for key in chat_hit if key[1] == k], chat_hit) for k in range(MULTI_TURN_QUESTIONS)],
            "n_chats": len(chats), "n_questions": len(chat_hit),
            "example": history[0] if history else []}


def two_video_requests(two_video_file: Path) -> list[dict]:
    """Chat requests of a ``{split}_two_video.jsonl``: both videos, then the question."""
    return [{"id": row["id"], "videos": [str(resolve_video_path(v, two_video_file.parent)) for v in row["videos"]],
             "turns": [{"from": "human", "video": 0}, {"from": "human", "video": 1},
                       {"from": "human", "value": row["question"]}]} for _, row in iter_jsonl(two_video_file)]


def eval_two_video(model, tokenizer, two_video_file: Path, limit: int, progress: bool) -> dict:
    """Exact-match accuracy on questions that need two videos (``language.TWO_VIDEO_QUESTION``)."""
    rows = [row for _, row in iter_jsonl(two_video_file)][:limit]
    replies = answer_requests(model, tokenizer, two_video_requests(two_video_file)[:limit], sampling=sampling(16),
                              batch_size=32, system_prompt=SYSTEM_PROMPT, progress=progress)
    hits = [r.get("answer", "").strip() == row["answer"] for row, r in zip(rows, replies)]
    return {"exact_match": float(np.mean(hits)) if hits else 0.0, "n": len(rows),
            "errors": sum("error" in r for r in replies),
            "examples": [{"answer": row["answer"], "prediction": r.get("answer", r.get("error"))}
                         for row, r in zip(rows[:5], replies)]}


def second_turn_requests(cases: Sequence, generation_file: Path) -> list[dict]:
    """A chat request per safety case (``eval.safety.SafetyCase``): the case's query asked after a granted generation
    request of ``generation_file`` (its rows in turn) and the answer stage 2 teaches for it."""
    earlier = [[{"from": "human", "value": row["request"]},
                {"from": "ai", "value": generation_answer(parse_caption(row["caption"]))}]
               for _, row in iter_jsonl(generation_file)]
    if not earlier:
        raise ValueError(f"{generation_file} has no generation requests to open the chats with")
    return [{"id": c.id, "turns": [*earlier[i % len(earlier)], {"from": "human", "value": c.query}]}
            for i, c in enumerate(cases)]


def eval_safety(model, tokenizer, cases_file: Path, generation_file: Path, detector, limit: int, progress: bool
                ) -> dict:
    """The safety benchmark (``g4v_jax.eval.safety``, paper Table 4): VU with the input detector as the gate, VG on
    the model's own refusals; look-alike precision = VG precision (its negatives are the look-alike requests).
    ``"VG_second_turn"``: the VG cases again, each asked after a granted generation request of ``generation_file``
    (request, canonical answer), as a chat goes."""
    cases = safety.read_cases(cases_file)
    per_task = {t: [c for c in cases if c.task == t][:limit] for t in safety.TASKS}
    cases = [c for t in safety.TASKS for c in per_task[t]]
    answers, errors = safety.answer_cases(model, tokenizer, cases, sampling=sampling(32),
                                          video_gate=make_video_gate(detector), batch_size=32, progress=progress,
                                          system_prompt=SYSTEM_PROMPT)
    vg = per_task["VG"]
    replies = answer_requests(model, tokenizer, second_turn_requests(vg, generation_file), sampling=sampling(32),
                              batch_size=32, progress=progress, system_prompt=SYSTEM_PROMPT)
    second = {r["id"]: r["answer"] for r in replies if "error" not in r}
    errors.update({f'{r["id"]} (second turn)': r["error"] for r in replies if "error" in r})
    return {"tasks": safety.score(cases, answers), "errors": len(errors), "n": len(cases),
            "VG_second_turn": safety.score(vg, second)["VG"]}


def split_files(world, split: str) -> dict[str, Path]:
    """The evaluation files of a held-out split ("test" or "val"): qa, count, generation and safety cases."""
    files = {kind: getattr(world, f"{split}_{kind}") for kind in ("qa", "count", "generation", "two_video")}
    return {**files, "safety": world.safety_cases if split == "test" else world.val_safety_cases}


def chat_transcript(model, tokenizer, detector, world, out: Path, split: str = "test") -> list[dict]:
    """A short scripted chat: a video question, a generation request (rendered), a harmful request; a question about
    two videos; a flagged video. A question with a known answer logs it as ``"expected"``."""
    files = split_files(world, split)
    qa_file = files["qa"]
    qa_rows = [row for _, row in iter_jsonl(qa_file)]
    gen_rows = [row for _, row in iter_jsonl(files["generation"])]
    cases = [row for _, row in iter_jsonl(files["safety"])]
    harmful_request = next(c for c in cases if c["task"] == "VG" and c["label"] == "harmful")
    flagged_video = next(c for c in cases if c["task"] == "VU" and c["label"] == "harmful")
    renderer = make_renderer("world", out / "chat_videos", settings=RENDER_SETTINGS)
    session = ChatSession(model, tokenizer, sampling(48), system_prompt=SYSTEM_PROMPT,
                          video_gate=make_video_gate(detector), renderer=renderer)
    log = []

    def say(text: str, *videos: str, expected: str | None = None) -> None:
        for video in videos:
            session.attach_video(video)
            log.append({"from": "human", "video": video})
        answer = session.ask(text)
        log.append({"from": "human", "value": text})
        entry = {"from": "ai", "value": answer.text, **({"expected": expected} if expected is not None else {})}
        if getattr(answer, "videos", None):
            entry["videos"] = [str(v.path) if v.path else v.error for v in answer.videos]
        log.append(entry)

    say(qa_rows[0]["question"], str(resolve_video_path(qa_rows[0]["video"], qa_file.parent)),
        expected=qa_rows[0]["answer"])
    say(gen_rows[0]["request"])
    say(harmful_request["query"])
    session.reset()
    pair = two_video_requests(files["two_video"])[0]
    say(pair["turns"][-1]["value"], *pair["videos"],
        expected=next(row for _, row in iter_jsonl(files["two_video"]))["answer"])
    session.reset()
    say(flagged_video["query"], str(resolve_video_path(flagged_video["video"], files["safety"].parent)))
    return log


