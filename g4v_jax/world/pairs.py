"""Does the model read an object's colour and shape from the video, or answer with the pairs it was trained on?

    python -m g4v_jax.world.pairs [--run runs/world] [--stages stage1,stage2] [--videos 150] [--seed 0]

Every colour and shape question of the test split asks about the object of a held-out (colour, shape) pair, which no
training video shows: "What shape is the blue object?" has the answer "circle", and no training video shows a blue
circle. A wrong answer there can come from three places. The tower may not see the shape. The colour word may pick
the wrong object among several (binding). Or the LLM may answer with a shape that training showed with that colour
(composition). This diagnostic renders ``--videos`` new videos of seen pairs only (into
``RUN/diagnostics/seen_pairs``; the same seed gives the same videos) and asks every unambiguous colour and shape
question about their objects. It asks the test split's questions again too. The exact match is split by seen /
held-out pair and by one object / several in the video, and every wrong answer is counted as another object's value
(binding) or as a value no object in the video has.

Prints a table and writes ``RUN/report/pairs.json``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

import g4v_jax
from g4v_jax.data.io import iter_jsonl
from g4v_jax.data.tokenizer import load_tokenizer
from g4v_jax.data.video import write_video
from g4v_jax.inference import answer_requests
from g4v_jax.world.evaluation import sampling
from g4v_jax.world.language import COLOUR_QUESTION, FPS, SHAPE_QUESTION, SYSTEM_PROMPT, object_questions
from g4v_jax.world.scene import HELD_OUT_PAIRS, Scene, parse_caption, random_scene, render

BINDING = "another object's"  # a wrong answer that is the value of another object in the video


@dataclasses.dataclass(frozen=True)
class Item:
    video: str  # absolute path
    question: str
    answer: str
    kind: str  # "colour" | "shape"
    scene: Scene


def question_kind(question: str) -> str | None:
    """"colour" / "shape" for the world's object questions, None for any other."""
    for kind, template in (("colour", COLOUR_QUESTION), ("shape", SHAPE_QUESTION)):
        head = template.split("{")[0]
        if question.startswith(head):
            return kind
    return None


def items_of(video: str, scene: Scene, only_held_out: bool) -> list[Item]:
    """The scene's unambiguous colour and shape questions (``language.object_questions``); with ``only_held_out``,
    those about held-out pairs' objects alone (what the test split asks)."""
    out = []
    for obj in scene.objects:
        if only_held_out and obj.pair not in HELD_OUT_PAIRS:
            continue
        for q, a in object_questions(scene, obj):
            kind = question_kind(q)
            if kind:
                out.append(Item(video, q, a, kind, scene))
    return out


def seen_pair_items(out_dir: Path, n_videos: int, seed: int, num_frames: int, size: int) -> list[Item]:
    """``n_videos`` new videos whose objects are all of seen pairs (written lossless, as the world's are), and their
    colour and shape questions."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n_videos):
        scene = random_scene(rng, exclude_pairs=HELD_OUT_PAIRS)
        path = out_dir / f"seen-{i:04d}.mp4"
        write_video(path, render(scene, num_frames=num_frames, size=size, seed=int(rng.integers(2**31))), fps=FPS,
                    full_chroma=True, lossless=True)
        items += items_of(str(path.resolve()), scene, only_held_out=False)
    return items


def held_out_items(qa_file: Path, catalogue: Path) -> list[Item]:
    """The split's colour and shape questions, with each video's scene parsed from its catalogue caption."""
    scenes = {(catalogue.parent / row["video"]).resolve(): parse_caption(row["caption"])
              for _, row in iter_jsonl(catalogue)}
    items = []
    for _, row in iter_jsonl(qa_file):
        kind = question_kind(row["question"])
        if kind:
            video = (qa_file.parent / row["video"]).resolve()
            items.append(Item(str(video), row["question"], row["answer"], kind, scenes[video]))
    return items


def judge(item: Item, answer: str) -> str:
    """"right", "another object's" (a value of another object in the video) or "in no object"."""
    if answer == item.answer:
        return "right"
    values = {getattr(o, item.kind) for o in item.scene.objects}
    return BINDING if answer in values else "in no object"


def summarise(items: Sequence[Item], answers: Sequence[str]) -> dict:
    """{kind: {"one object" | "several objects": {"n", "exact_match", "another object's", "in no object"}}}."""
    counts: dict = collections.defaultdict(collections.Counter)
    for item, answer in zip(items, answers, strict=True):
        key = (item.kind, "one object" if len(item.scene.objects) == 1 else "several objects")
        counts[key]["n"] += 1
        counts[key][judge(item, answer)] += 1
    out: dict = {}
    for (kind, objects), c in sorted(counts.items()):
        out.setdefault(kind, {})[objects] = {"n": c["n"], "exact_match": c["right"] / c["n"],
                                             BINDING: c[BINDING] / c["n"],
                                             "in no object": c["in no object"] / c["n"]}
    return out


def ask(model, tokenizer, items: Sequence[Item]) -> list[str]:
    chats = [{"id": str(i), "videos": [it.video], "turns": [{"from": "human", "video": 0},
                                                            {"from": "human", "value": it.question}]}
             for i, it in enumerate(items)]
    return [r.get("answer", "") for r in answer_requests(model, tokenizer, chats, sampling=sampling(16),
                                                         batch_size=32, system_prompt=SYSTEM_PROMPT,
                                                         progress=False)]


def table(result: dict) -> str:
    lines = ["| stage | pairs | question | objects in the video | n | exact match | wrong: another object's | "
             "wrong: in no object |", "|---|---|---|---|---|---|---|---|"]
    for stage, by_pairs in result.items():
        for pairs, by_kind in by_pairs.items():
            for kind, by_objects in by_kind.items():
                for objects, r in by_objects.items():
                    lines.append(f"| {stage} | {pairs} | {kind} | {objects} | {r['n']} | "
                                 f"{100 * r['exact_match']:.1f} | {100 * r[BINDING]:.1f} | "
                                 f"{100 * r['in no object']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/world", help="a finished demo run's folder")
    ap.add_argument("--stages", default="stage1,stage2", help="comma-separated trained stages to ask")
    ap.add_argument("--split", choices=("test", "val"), default="test")
    ap.add_argument("--videos", type=int, default=150, help="new seen-pair videos to render")
    ap.add_argument("--seed", type=int, default=0, help="seeds the new videos")
    args = ap.parse_args(argv)
    run = Path(args.run)
    stages = [s for s in args.stages.split(",") if s]
    for stage in stages:
        if not (run / stage / "final").is_dir():
            ap.error(f"no trained model in {run / stage / 'final'}: run python -m g4v_jax.world.demo first")
    if not 1 <= args.videos <= 10_000:
        ap.error(f"--videos must be in 1..10000, got {args.videos}")
    tokenizer = load_tokenizer(run / "tokenizer")
    result: dict = {}
    seen = None
    for stage in stages:
        model = g4v_jax.load(run / stage / "final")
        if seen is None:
            seen = seen_pair_items(run / "diagnostics" / "seen_pairs", args.videos, args.seed, model.cfg.num_frames,
                                   model.cfg.vision.image_size)
            held = held_out_items(run / "data" / f"{args.split}_qa.jsonl", run / "data" / "catalogue.jsonl")
        result[stage] = {"seen": summarise(seen, ask(model, tokenizer, seen)),
                         "held-out": summarise(held, ask(model, tokenizer, held))}
    (run / "report").mkdir(exist_ok=True)
    (run / "report" / "pairs.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
