"""Where a generated scene's foreign attributes come from, after a question about a video in the same chat.

    python -m g4v_jax.world.leakage [--run runs/world] [--split test|val] [--limit 200]

A request that follows a video question sometimes gets a scene with an attribute of the video instead of the
requested one (``evaluation.attribute_leakage``). Two things in the chat carry the video's attributes: the video's
tokens, and the question and answer written about it. The trained stage-2 model of a finished demo run answers each
held-out generation request in five chats, and the leak rate is counted against the attributes each chat shows:

- ``request alone``: no video, no exchange (the baseline: what it invents by itself);
- ``video, then request``: the video only;
- ``video, exchange, request``: the demo's after-video chat (the video, its question and true answer);
- ``other video, exchange, request``: another held-out video, with the first video's question and answer: a leak that
  follows the video's tokens counts against the other video, one that follows the text against the exchange's video;
- ``exchange in text, request``: the first video's caption in tags instead of its tokens (what stage 2 trains on).

Prints a table and writes ``RUN/report/leakage.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import g4v_jax
from g4v_jax.data.io import iter_jsonl
from g4v_jax.data.tokenizer import load_tokenizer
from g4v_jax.eval.qa import read_qa
from g4v_jax.inference import answer_requests
from g4v_jax.world.evaluation import attribute_leakage, leakage_summary, sampling, video_captions
from g4v_jax.world.language import SYSTEM_PROMPT

VARIANTS = ("request alone", "video, then request", "video, exchange, request", "other video, exchange, request",
            "exchange in text, request")


def chats(rows: Sequence[dict], items, captions: dict[str, str]) -> dict[str, list[tuple[dict, str]]]:
    """Per variant: (chat request, caption of the video whose attributes count as leaked) for every row."""
    out: dict[str, list[tuple[dict, str]]] = {v: [] for v in VARIANTS}
    for i, row in enumerate(rows):
        it, other = items[i % len(items)], items[(i + len(items) // 2) % len(items)]
        exchange = [{"from": "human", "value": it.question}, {"from": "ai", "value": it.answer}]
        ask = {"from": "human", "value": row["request"]}
        video, other_video = captions[it.video], captions[other.video]
        out["request alone"].append(({"id": row["id"], "turns": [ask]}, video))
        out["video, then request"].append(
            ({"id": row["id"], "videos": [it.video], "turns": [{"from": "human", "video": 0}, ask]}, video))
        out["video, exchange, request"].append(
            ({"id": row["id"], "videos": [it.video], "turns": [{"from": "human", "video": 0}, *exchange, ask]}, video))
        out["other video, exchange, request"].append(
            ({"id": row["id"], "videos": [other.video], "turns": [{"from": "human", "video": 0}, *exchange, ask]},
             other_video))
        out["exchange in text, request"].append(
            ({"id": row["id"], "turns": [{"from": "human", "value": f"<video>{video}</video>"}, *exchange, ask]},
             video))
    return out


def measure(model, tokenizer, generation_file: Path, qa_file: Path, catalogue: Path, limit: int,
            progress: bool = False) -> dict:
    """``leakage_summary`` per variant; for the swapped video, also the leak rate against the exchange's video."""
    rows = [row for _, row in iter_jsonl(generation_file)][:limit]
    items, captions = read_qa(qa_file), video_captions(catalogue)
    result = {}
    for name, pairs in chats(rows, items, captions).items():
        answers = answer_requests(model, tokenizer, [c for c, _ in pairs], sampling=sampling(48), batch_size=32,
                                  system_prompt=SYSTEM_PROMPT, progress=progress)
        judged = [attribute_leakage(row["caption"], shown, a.get("answer", ""))
                  for row, (_, shown), a in zip(rows, pairs, answers)]
        result[name] = leakage_summary(judged)
        if name == "other video, exchange, request":
            exchange_video = [captions[items[i % len(items)].video] for i in range(len(rows))]
            result[name]["leak_rate_against_the_exchange"] = leakage_summary(
                [attribute_leakage(row["caption"], shown, a.get("answer", ""))
                 for row, shown, a in zip(rows, exchange_video, answers)])["leak_rate"]
    return result


def table(result: dict) -> str:
    lines = ["| chat before the request | leak rate | requested values kept | leaked kinds |", "|---|---|---|---|"]
    for name, r in result.items():
        extra = (f" ({100 * r['leak_rate_against_the_exchange']:.1f} against the exchange's video)"
                 if "leak_rate_against_the_exchange" in r else "")
        lines.append(f"| {name} | {100 * r['leak_rate']:.1f}{extra} | {100 * r['requested_kept']:.1f} | "
                     f"{', '.join(f'{k} {v}' for k, v in r['leaked_by_kind'].items()) or '-'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/world", help="a finished demo run's folder")
    ap.add_argument("--split", choices=("test", "val"), default="test")
    ap.add_argument("--limit", type=int, default=200)
    args = ap.parse_args(argv)
    run = Path(args.run)
    data = run / "data"
    if not (run / "stage2" / "final").is_dir():
        ap.error(f"no trained stage-2 model in {run / 'stage2' / 'final'}: run python -m g4v_jax.world.demo first")
    model = g4v_jax.load(run / "stage2" / "final")
    result = measure(model, load_tokenizer(run / "tokenizer"), data / f"{args.split}_generation.jsonl",
                     data / f"{args.split}_qa.jsonl", data / "catalogue.jsonl", args.limit)
    (run / "report").mkdir(exist_ok=True)
    (run / "report" / "leakage.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
