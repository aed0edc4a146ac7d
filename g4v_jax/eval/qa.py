"""Open-ended video QA (MSVD-QA / MSRVTT-QA, paper Table 1) with offline metrics and an optional LLM judge.

    python -m g4v_jax.eval.qa --ckpt DIR --data qa.jsonl --out reports/msrvtt_qa \\
        [--judge-url URL --judge-model NAME [--judge-key-file FILE] | --judge-self] [--max-new-tokens 64]

Data (JSONL, one per line; ``video`` relative to the file)::

    {"id": "q1", "video": "videos/video7010.mp4", "question": "what is a man doing?", "answer": "sing"}

``from_msrvtt_qa`` (``python -m g4v_jax.eval.qa convert JSON VIDEO_DIR OUT``) writes this layout from the official
lists of ``{"video_id" | "video" | "video_name", "question", "answer", "id"?}``.

The model answers every question (video turn, then the question) in jitted batches through
``g4v_jax.inference.answer_requests``. Metrics (definitions recorded in every report):

- offline (no judge; always reported, labelled offline): exact-match accuracy (prediction == answer after
  normalisation: lowercase, punctuation removed, whitespace collapsed) and contains-match accuracy (the normalised
  answer occurs in the normalised prediction as whole words). Unanswered items count as wrong.
- judge (``--judge-url``/``--judge-model``: an OpenAI-compatible endpoint, cached under ``OUT/judge_cache``; or
  ``--judge-self``: our own model): the Video-ChatGPT protocol (``g4v_jax.eval.judge``): accuracy = yes / all
  samples (unanswered items and judge errors count as no), mean score over the judged items; judge errors counted.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import sys
import unicodedata
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import g4v_jax
from g4v_jax import inference
from g4v_jax.cli import fail
from g4v_jax.data.io import find_video, read_records, record_id, resolve_video_path, sha256_of, write_jsonl
from g4v_jax.data.template import SYSTEM_PROMPT
from g4v_jax.data.tokenizer import load_tokenizer
from g4v_jax.eval.judge import Judge, JudgeError, ModelJudge, OpenAIJudge, read_key_file
from g4v_jax.eval.report import data_line, markdown_table as markdown_table_of, write_report as write_report_files
from g4v_jax.inference import SamplingConfig

_log = logging.getLogger(__name__)

METRICS = {
    "exact_match": "offline: fraction of samples whose prediction equals the answer after normalisation (lowercase, "
                   "Unicode punctuation removed, whitespace collapsed); unanswered samples count as wrong",
    "contains_match": "offline: fraction of samples whose normalised answer occurs in the normalised prediction as "
                      "whole words (a word-boundary match); unanswered samples count as wrong",
    "judge_accuracy": "Video-ChatGPT protocol: fraction of ALL samples the judge called 'yes'; unanswered samples "
                      "(not sent to the judge) and judge errors count as 'no'",
    "judge_score": "Video-ChatGPT protocol: mean judge score (integer 0-5) over the samples the judge scored "
                   "(judge errors and unanswered samples excluded; both counted separately)",
}


class QAError(ValueError):
    """A QA file that does not fit the schema; names file:line."""


@dataclasses.dataclass(frozen=True)
class QAItem:
    id: str
    video: str  # resolved path
    question: str
    answer: str


def read_qa(path: str | os.PathLike) -> list[QAItem]:
    """Every question of a QA JSONL file (module docstring); ``QAError`` names ``file:line``."""
    base = Path(path).parent

    def parse(raw: Mapping, where: str, lineno: int) -> QAItem:
        video, question, answer = raw.get("video"), raw.get("question"), raw.get("answer")
        if not isinstance(video, str) or not video.strip():
            raise QAError(f"{where}: video must be a non-empty path")
        if not isinstance(question, str) or not question.strip():
            raise QAError(f"{where}: question must be a non-empty string")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise QAError(f"{where}: answer must be a non-empty string")
        return QAItem(record_id(raw, lineno, where, QAError), resolve_video_path(video, base), question.strip(),
                      answer.strip())

    return read_records(path, parse, error=QAError, kind="QA", noun="questions",
                        keys=("id", "video", "question", "answer"))


# --------------------------------------------------------------------------------------------------------------------
# Offline metrics
# --------------------------------------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """Lowercase, every Unicode punctuation character replaced by a space, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


def contains_match(prediction: str, answer: str) -> bool:
    """The normalised answer appears in the normalised prediction as whole words ("cat" in "a cat sits", not in
    "category"); an empty answer never matches."""
    gold = normalize(answer)
    if not gold:
        return False
    return re.search(rf"(?<!\w){re.escape(gold)}(?!\w)", normalize(prediction)) is not None


# --------------------------------------------------------------------------------------------------------------------
# Answering and judging
# --------------------------------------------------------------------------------------------------------------------


def answer_items(model, tokenizer, items: Sequence[QAItem], *, sampling, batch_size: int = 8,
                 progress: bool = True, system_prompt: str = SYSTEM_PROMPT) -> tuple[dict[str, str], dict[str, str]]:
    """The model's answer to every item, and {id: error} for items it could not answer. ``system_prompt`` must be
    the one the model was trained with (``data.system_prompt``; the release's by default)."""
    requests = [{"id": it.id, "videos": [it.video],
                 "turns": [{"from": "human", "video": 0}, {"from": "human", "value": it.question}]} for it in items]
    answers, errors = {}, {}
    for r in inference.answer_requests(model, tokenizer, requests, sampling=sampling, batch_size=batch_size,
                                  progress=progress, system_prompt=system_prompt):
        if "error" in r:
            errors[str(r["id"])] = r["error"]
        else:
            answers[str(r["id"])] = r["answer"]
    return answers, errors


def judge_items(items: Sequence[QAItem], answers: Mapping[str, str], judge: Judge, *,
                workers: int = 1) -> dict[str, dict]:
    """{id: {"pred", "score"} or {"error"}} for every answered item (``workers`` > 1: concurrent judge calls)."""
    todo = [it for it in items if it.id in answers]

    def one(it: QAItem) -> dict:
        try:
            return dict(judge.judge(it.question, it.answer, answers[it.id]))
        except JudgeError as e:
            return {"error": str(e)}

    if workers > 1:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, todo))
    else:
        results = [one(it) for it in todo]
    return {it.id: r for it, r in zip(todo, results)}


def score(items: Sequence[QAItem], answers: Mapping[str, str],
          judgements: Mapping[str, dict] | None = None) -> dict:
    """Metrics of the module docstring (fractions in [0, 1])."""
    n = len(items)
    div = lambda a, b: a / b if b else 0.0
    answered = [it for it in items if it.id in answers]
    offline = {"n": n, "answered": len(answered),
               "exact_match": div(sum(exact_match(answers[it.id], it.answer) for it in answered), n),
               "contains_match": div(sum(contains_match(answers[it.id], it.answer) for it in answered), n)}
    out = {"offline": offline}
    if judgements is not None:
        scored = [j for j in judgements.values() if "error" not in j]
        yes = sum(j["pred"] == "yes" for j in scored)
        out["judge"] = {"n": n, "judged": len(scored), "judge_errors": len(judgements) - len(scored),
                        "unanswered": n - len(answered), "yes": yes, "accuracy": div(yes, n),
                        "score": div(sum(j["score"] for j in scored), len(scored))}
    return out


def records(items: Sequence[QAItem], answers: Mapping[str, str], errors: Mapping[str, str],
            judgements: Mapping[str, dict] | None = None) -> list[dict]:
    out = []
    for it in items:
        pred = answers.get(it.id)
        rec: dict[str, Any] = {"id": it.id, "video": it.video, "question": it.question, "answer": it.answer,
                               "prediction": pred,
                               "exact_match": pred is not None and exact_match(pred, it.answer),
                               "contains_match": pred is not None and contains_match(pred, it.answer)}
        if it.id in errors:
            rec["error"] = errors[it.id]
        if judgements is not None:
            rec["judge"] = judgements.get(it.id)
        out.append(rec)
    return out


def markdown_table(report: Mapping, method: str) -> str:
    m = report["metrics"]
    header = ["Method", "N", "Exact match (offline)", "Contains match (offline)"]
    row = [method, m["offline"]["n"], f"{100 * m['offline']['exact_match']:.1f}",
           f"{100 * m['offline']['contains_match']:.1f}"]
    if "judge" in m:
        j = m["judge"]
        header += ["Judge accuracy", "Judge score", "Judge errors"]
        row += [f"{100 * j['accuracy']:.1f}", f"{j['score']:.2f}", j["judge_errors"]]
    return markdown_table_of(header, [row])


def build_report(*, checkpoint: str, data: str | os.PathLike, items: Sequence[QAItem], answers: Mapping[str, str],
                 errors: Mapping[str, str], judgements: Mapping[str, dict] | None = None,
                 judge_info: Mapping | None = None) -> dict:
    metrics = {k: v for k, v in METRICS.items() if judgements is not None or not k.startswith("judge")}
    return {"checkpoint": str(checkpoint), "data": str(data), "data_sha256": sha256_of(data), "samples": len(items),
            "judge": dict(judge_info) if judge_info else None, "metric_definitions": metrics,
            "metrics": score(items, answers, judgements), "model_errors": dict(errors),
            "records": records(items, answers, errors, judgements)}


def write_report(report: Mapping, out: str | os.PathLike, method: str) -> str:
    judge = report.get("judge")
    return write_report_files(report, out, title="Video QA", table=markdown_table(report, method),
                              before=[data_line(report, "samples")],
                              after=[f"Judge: {json.dumps(judge)}" if judge else "No judge: offline metrics only."])


# --------------------------------------------------------------------------------------------------------------------
# Converter
# --------------------------------------------------------------------------------------------------------------------

def from_msrvtt_qa(json_path: str | os.PathLike, video_dir: str | os.PathLike, out: str | os.PathLike, *,
                   check_files: bool = True) -> int:
    """Official MSRVTT-QA / MSVD-QA JSON (a list of ``{"video_id" | "video" | "video_name", "question", "answer",
    "id" | "question_id"?}``) -> our QA JSONL; returns the number written.

    An integer ``video_id`` N names ``videoN`` (MSRVTT's file names); a name without an extension is looked up with
    each of ``data.io.VIDEO_EXTENSIONS``.
    Paths are written relative to ``out``'s directory. Entries with missing fields and
    (``check_files``) entries whose video is not under ``video_dir`` are skipped and counted in the log."""
    data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise QAError(f"{json_path}: expected a JSON list at the top level, got {type(data).__name__}")
    video_dir, out = Path(video_dir).resolve(), Path(out)
    out_dir = out.resolve().parent
    lines, skipped, seen = [], collections.Counter(), set()
    for i, e in enumerate(data):
        if not isinstance(e, Mapping):
            skipped["not_an_object"] += 1
            continue
        vid = next((e[k] for k in ("video", "video_name", "video_id") if e.get(k) not in (None, "")), None)
        q, a = e.get("question"), e.get("answer")
        if vid is None or not isinstance(q, str) or not q.strip() or a is None or not str(a).strip():
            skipped["missing_fields"] += 1
            continue
        name = f"video{vid}" if isinstance(vid, int) else str(vid)
        file = find_video(video_dir, name)
        if file is None:
            if check_files:
                skipped["missing_video_file"] += 1
                continue
            file = video_dir / (name if Path(name).suffix else name + ".mp4")
        qid = str(e.get("id", e.get("question_id", i)))
        if qid in seen:
            qid = f"{qid}-{i}"
        seen.add(qid)
        lines.append({"id": qid, "video": os.path.relpath(file, out_dir), "question": q.strip(),
                      "answer": str(a).strip()})
    write_jsonl(out, lines)
    if skipped:
        _log.warning("from_msrvtt_qa: skipped %s", dict(skipped))
    return len(lines)


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def _self_ask(model, tokenizer, max_new_tokens: int) -> Callable[[str], str]:
    sampling = SamplingConfig(max_new_tokens)

    def ask(prompt: str) -> str:
        r = inference.answer_requests(model, tokenizer, [{"id": "judge", "turns": [{"from": "human", "value": prompt}]}],
                                 sampling=sampling, batch_size=1, progress=False)[0]
        if "error" in r:
            raise JudgeError(r["error"])
        return r["answer"]

    return ask


def main(argv=None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "convert":
        cp = argparse.ArgumentParser(prog="python -m g4v_jax.eval.qa convert")
        cp.add_argument("input")
        cp.add_argument("video_dir")
        cp.add_argument("output")
        cp.add_argument("--no-check-files", action="store_true")
        a = cp.parse_args(argv[1:])
        n = from_msrvtt_qa(a.input, a.video_dir, a.output, check_files=not a.no_check_files)
        print(f"wrote {n} questions to {a.output}")
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--judge-url", default=None)
    ap.add_argument("--judge-model", default=None)
    ap.add_argument("--judge-key-file", default=None,
                    help="file holding the judge's API key (default: $OPENAI_API_KEY); a key is never taken from the "
                         "command line, where the process list shows it")
    ap.add_argument("--judge-cache", default=None, help="default: OUT/judge_cache")
    ap.add_argument("--judge-workers", type=int, default=4)
    ap.add_argument("--judge-self", action="store_true", help="judge with the evaluated model itself")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    if args.judge_self and (args.judge_url or args.judge_model):
        ap.error("--judge-self excludes --judge-url/--judge-model")
    if bool(args.judge_url) != bool(args.judge_model):
        ap.error("--judge-url and --judge-model go together")
    try:
        judge = None
        if args.judge_url:  # before any work: a bad URL or key file is an error now, not after answering
            cache = args.judge_cache or str(Path(args.out) / "judge_cache")
            judge = OpenAIJudge(args.judge_url, args.judge_model, read_key_file(args.judge_key_file), cache_dir=cache)
        items = read_qa(args.data)
        model = g4v_jax.load(args.ckpt, args.overrides)
        tokenizer = load_tokenizer(args.tokenizer or args.ckpt)
        answers, errors = answer_items(model, tokenizer, items, sampling=SamplingConfig(args.max_new_tokens),
                                       batch_size=args.batch_size)
        judgements = judge_info = None
        if judge is not None:
            judge_info = {"kind": "openai", "url": judge.url, "model": args.judge_model, "cache": cache}
            judgements = judge_items(items, answers, judge, workers=args.judge_workers)
            judge_info["http_calls"] = judge.calls
        elif args.judge_self:
            judge_info = {"kind": "self", "model": str(args.ckpt)}
            judgements = judge_items(items, answers, ModelJudge(_self_ask(model, tokenizer, 32)))
    except (ValueError, OSError) as e:
        fail("g4v_jax.eval.qa", str(e))
    report = build_report(checkpoint=args.ckpt, data=args.data, items=items, answers=answers, errors=errors,
                          judgements=judgements, judge_info=judge_info)
    print(write_report(report, args.out, Path(args.ckpt).name))


if __name__ == "__main__":
    main()
