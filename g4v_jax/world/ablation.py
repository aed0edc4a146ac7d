"""The paper's Table 5 on the world: which video abstractor aligns best, every other part held fixed.

    python -m g4v_jax.world.ablation [--out runs/ablation] [--seeds 0,1] [--variants 0,1,2,3,4] [--steps 400]
                                     [--eval-split test|val] [--quick]

Per seed, the world (data, tokenizer, vision tower pre-training, stage 0) is made once, exactly as the world demo
makes it (``OUT/seed<N>`` has the demo's layout, so ``--out`` pointing at a finished demo's folder reuses its tower
and stage-0 LLM). Then stage 1 runs once per variant from that same stage-0 LLM and tower, with the same data, seed,
batch and step count; only ``model.abstractor`` differs (and ``data.seq_len``, by the variant's extra video tokens):

    #0  the paper's abstractor, Qs + Qt (eqs. 1-3; the world's own, configs/world/model.yaml)
    #1  #0 without the temporal (enhance) tokens Qt
    #2  BLIP-2's Q-Former with as many queries as #0 has (the paper: 64)
    #3  the Q-Former with twice as many (the paper: 128)
    #4  Video-ChatGPT's spatio-temporal pooling (frame slots + patches tokens)

Each stage-1 model is judged on the held-out videos (``--eval-split``; choose settings on ``val``, report ``test``):
video-QA exact match per question type, and "Describe the video." captions scored with the eval harness's scorer
(BLEU-4 and METEOR of ``g4v_jax.eval.caption``, METEOR needs Java) against each video's own caption. Also reported:
stage-1 step time (median over 20 steps after compilation, every variant timed back to back), the abstractor's parameters and its video tokens.
``OUT/ablation.md`` holds the table per seed and the mean over seeds; ``OUT/ablation.json`` everything.

``--quick`` (CI, about two minutes) runs every variant on the demo's quick world, its tower and stage 0 barely
trained, for a few steps: it checks the machinery, not the ranking.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

import g4v_jax
from g4v_jax.config import load_config
from g4v_jax.data.tokenizer import load_tokenizer
from g4v_jax.eval.caption import CaptionItem, caption_videos, score_captions
from g4v_jax.eval.qa import read_qa
from g4v_jax.models.gpt4video import build_model
from g4v_jax.train.metrics import read_metrics
from g4v_jax.train import Interrupted
from g4v_jax.weights import assign_params, load, load_model_config, named_params, param_shapes, save_pretrained
from g4v_jax.world.demo import FULL, QUICK, RunSize, make_world, pretrain_vision, train_stage, vision_feature_cache
from g4v_jax.world.evaluation import eval_qa, sampling, split_files, video_captions
from g4v_jax.world.language import DESCRIBE_INSTRUCTION, SYSTEM_PROMPT

# the world's abstractor has 32 queries (configs/world/model.yaml); the paper's, 64. Table 5's Q-Formers have 1x and
# 2x the paper's count, so here 32 and 64.
WORLD_QUERIES = 32
# A Q-Former sized like the world's abstractor (width 96, heads 4, MLP 128): 4 BERT layers with BLIP-2's cross-attention
# every other layer, so it reads the video twice, as the paper's 2-layer abstractor does per stream.
QFORMER = ("model.abstractor.variant=qformer", "model.abstractor.num_layers=4",
           "model.abstractor.cross_attention_frequency=2", "model.abstractor.norm_eps=1e-12")
# --quick checks the machinery in CI's minutes: the quick world, its tower and stage 0 barely trained, few steps and
# items judged. Its figures rank nothing.
QUICK_SIZE = dataclasses.replace(QUICK, vision_steps=10, stage0_steps=10, max_eval=8)
QUICK_STEPS = 6
# Stage 1 of the ablation: 400 steps (the demo's FULL run takes 600; its video QA at 400 is within 0.02 of 600's)
STAGE1_STEPS = 400
# the back-to-back timing runs (time_steps): compilation, then 20 timed steps
TIMING_STEPS = 23
# stage 1's rows hold up to two videos (demo.train_stage); the world config's seq_len fits two videos of 32 tokens
STAGE1_VIDEOS_PER_ROW = 2


@dataclasses.dataclass(frozen=True)
class Variant:
    index: int  # the row of the paper's Table 5
    name: str
    overrides: tuple[str, ...]


VARIANTS = (
    Variant(0, "GPT4Video abstractor, Qs + Qt (eqs. 1-3)", ()),
    Variant(1, "#0 without temporal tokens Qt", ("model.abstractor.num_temporal_tokens=0",)),
    Variant(2, f"Q-Former, {WORLD_QUERIES} queries", (*QFORMER, f"model.abstractor.num_query_tokens={WORLD_QUERIES}")),
    Variant(3, f"Q-Former, {2 * WORLD_QUERIES} queries",
            (*QFORMER, f"model.abstractor.num_query_tokens={2 * WORLD_QUERIES}")),
    Variant(4, "Spatio-temporal pooling (Video-ChatGPT)", ("model.abstractor.variant=st_pool",)),
)


def stage1_seq_len(base_seq_len: int, base_tokens: int, tokens: int) -> int:
    """The world's stage-1 ``data.seq_len`` grown by a variant's extra video tokens (two videos a row), to a
    multiple of 8."""
    need = base_seq_len + STAGE1_VIDEOS_PER_ROW * max(0, tokens - base_tokens)
    return -(-need // 8) * 8


def variant_init(stage0: Path, variant: Variant, dst: Path, seed: int) -> Path:
    """A model directory for ``variant``'s stage 1: the stage-0 directory's tower and LLM, a fresh abstractor."""
    if (dst / "config.yaml").is_file():
        return dst
    cfg = load_model_config(stage0, list(variant.overrides))
    model = build_model(cfg.model, seed=seed)
    params = {k: np.asarray(v) for k, v in named_params(model).items()}
    trained = named_params(load(stage0))
    params.update({k: np.asarray(v) for k, v in trained.items() if not k.startswith("abstractor.")})
    save_pretrained(assign_params(model, params, str(stage0)), cfg, dst)
    return dst


def step_seconds(metrics_file: Path, skip: int = 3) -> float:
    """Median seconds per optimizer step, the first ``skip`` steps (compilation) left out."""
    rows = read_metrics(metrics_file)
    times = [r["tokens"] / r["tokens_per_s"] for r in rows[skip:] if r.get("tokens_per_s")]
    return float(np.median(times)) if times else float("nan")


def caption_items(qa_file: Path, catalogue: Path, limit: int):
    """One ``CaptionItem`` per video of ``qa_file`` (at most ``limit``), its reference its own caption."""
    captions = video_captions(catalogue)
    videos = list(dict.fromkeys(it.video for it in read_qa(qa_file)))[:limit]
    return [CaptionItem(Path(v).stem, v, (captions[str(Path(v))],)) for v in videos]


def evaluate(model, tokenizer, qa_file: Path, catalogue: Path, limit: int, progress: bool) -> dict:
    qa = eval_qa(model, tokenizer, qa_file, limit, progress)
    items = caption_items(qa_file, catalogue, limit)
    captions, errors = caption_videos(model, tokenizer, items, instruction=DESCRIBE_INSTRUCTION,
                                      sampling=sampling(48), batch_size=32, progress=progress,
                                      system_prompt=SYSTEM_PROMPT)
    scores = score_captions(captions, {it.id: list(it.captions) for it in items})
    examples = [{"video": it.video, "reference": it.captions[0], "caption": captions.get(it.id)} for it in items[:3]]
    return {"qa": qa["exact_match"], "qa_by_type": qa["exact_match_by_type"], "bleu4": scores["bleu4"],
            "meteor": scores["meteor"], "captions": len(items), "caption_errors": len(errors), "examples": examples}


def run_seed(out: Path, seed: int, variants: Sequence[Variant], *, size: RunSize, steps: int, eval_split: str,
             progress: bool, timing_steps: int = 0) -> list[dict]:
    """Every variant's stage 1 (``steps`` steps) and evaluation for one seed (module docstring), the world and its
    stage-0 models made at ``size`` (the demo's ``FULL``, or ``QUICK_SIZE``); a finished variant is kept. Step
    times come from back-to-back runs of ``timing_steps`` steps (``time_steps``), or with 0 from each variant's own
    training log."""
    world_cfg = load_config("world")
    world, tok_dir = make_world(out, size, seed)
    tokenizer = load_tokenizer(tok_dir)
    print("vision tower and stage 0 (kept when already trained under this folder)")
    pretrain_vision(world, world_cfg, out, size.vision_steps, size.vision_clips, seed, progress)
    train_stage(0, out, world.stage0, tok_dir, size.stage0_steps, out / "vision" / "final", seed, progress,
                size.batch_size)
    stage0 = out / "stage0" / "final"
    cache = vision_feature_cache(stage0, world.stage1, out / "vision_cache", progress)
    files = split_files(world, eval_split)
    base = world_cfg.model.num_video_tokens
    runs = {}  # index -> (its init directory, its stage-1 overrides), for the timing runs too
    rows = []
    for v in variants:
        vdir = out / "ablation" / f"v{v.index}"
        init = variant_init(stage0, v, vdir / "init", seed)
        cfg = load_model_config(init).model
        seq_len = stage1_seq_len(world_cfg.data.seq_len, base, cfg.num_video_tokens)
        runs[v.index] = (init, [f"data.vision_cache={cache}", f"data.seq_len={seq_len}", *v.overrides])
        result_file = vdir / f"result_{eval_split}.json"
        if result_file.is_file():
            rows.append(json.loads(result_file.read_text()))
            continue
        print(f"#{v.index} {v.name}: stage 1, {steps} steps")
        t0 = time.perf_counter()
        train = train_stage(1, vdir, world.stage1, tok_dir, steps, init, seed, progress, size.batch_size,
                            runs[v.index][1])
        seconds = time.perf_counter() - t0
        model = g4v_jax.load(vdir / "stage1" / "final")
        params = sum(int(np.prod(s)) for k, (s, _) in param_shapes(model).items() if k.startswith("abstractor."))
        row = {"index": v.index, "name": v.name, "overrides": list(v.overrides), "seed": seed, "steps": steps,
               "video_tokens": cfg.num_video_tokens, "seq_len": seq_len, "abstractor_params": params,
               "train_step_seconds": step_seconds(vdir / "stage1" / "metrics.jsonl"), "stage1_seconds": seconds,
               "first_loss": train["first_loss"], "last_loss": train["last_loss"], "eval_split": eval_split,
               **evaluate(model, tokenizer, files["qa"], world.catalogue, size.max_eval, progress)}
        result_file.write_text(json.dumps(row, indent=1))
        rows.append(row)
    if not timing_steps:
        return [{**r, "step_seconds": r["train_step_seconds"]} for r in rows]
    timing = time_steps(out / "ablation", world.stage1, tok_dir, runs, seed, size.batch_size, timing_steps)
    return [{**r, "step_seconds": timing[r["index"]]} for r in rows]


def time_steps(root: Path, manifest: Path, tok_dir: Path, runs: dict, seed: int, batch_size: int, steps: int
               ) -> dict[int, float]:
    """Median stage-1 step seconds of every variant, measured back to back in short runs of ``steps`` steps: a
    variant's training shares the machine with whatever else ran during its minutes, so its own log times it
    poorly against the others'. Kept in ``root/timing.json`` (remeasured when a variant is missing)."""
    timing_file = root / "timing.json"
    timing = {int(k): v for k, v in json.loads(timing_file.read_text()).items()} if timing_file.is_file() else {}
    if all(i in timing for i in runs):
        return timing
    timing = {}
    for index, (init, extra) in runs.items():
        tmp = root / f"v{index}" / "timing"
        shutil.rmtree(tmp, ignore_errors=True)
        train_stage(1, tmp, manifest, tok_dir, steps, init, seed, False, batch_size,
                    [*extra, "train.save_every=1000000"])
        timing[index] = step_seconds(tmp / "stage1" / "metrics.jsonl")
        shutil.rmtree(tmp)
    timing_file.write_text(json.dumps(timing))
    return timing


QA_TYPES = ("What colour", "What shape", "How does", "What is")
# The paper's Table 5 (MSR-VTT captioning, BLEU-4 and METEOR), row by row
PAPER_TABLE5 = {0: (0.587, 0.391), 1: (0.568, 0.358), 2: (0.572, 0.369), 3: (0.583, 0.389), 4: (0.581, 0.388)}


def ranking(rows: Sequence[dict], key) -> list[int]:
    """Row indices, best first."""
    return [r["index"] for r in sorted(rows, key=key, reverse=True)]


def spearman(a: Sequence[int], b: Sequence[int]) -> float:
    """Spearman's rank correlation of two orderings of the same rows (1: same order, -1: reversed)."""
    n = len(a)
    if n < 2:
        return float("nan")
    pos = {x: i for i, x in enumerate(b)}
    d2 = sum((i - pos[x]) ** 2 for i, x in enumerate(a))
    return 1.0 - 6.0 * d2 / (n * (n * n - 1))


def ranking_lines(rows: Sequence[dict]) -> list[str]:
    """How the world's order of the rows compares with the paper's, by METEOR and by BLEU-4."""
    rows = [r for r in rows if r["index"] in PAPER_TABLE5]
    lines = []
    for k, metric in ((1, "meteor"), (0, "bleu4")):
        paper = ranking([{"index": r["index"]} for r in rows], key=lambda r: PAPER_TABLE5[r["index"]][k])
        world = ranking(rows, key=lambda r: r[metric])
        name = "METEOR" if metric == "meteor" else "BLEU-4"
        lines.append(f"- {name}: the paper ranks {' > '.join(f'#{i}' for i in paper)}; the world "
                     f"{' > '.join(f'#{i}' for i in world)} (Spearman {spearman(paper, world):+.2f})")
    qa = ranking(rows, key=lambda r: r["qa"])
    lines.append(f"- Video QA on the world: {' > '.join(f'#{i}' for i in qa)}")
    return lines


def _table(rows: Sequence[dict], title: str) -> str:
    head = ("| # | Abstractor | Video tokens | Params | Step (s) | Video QA | " + " | ".join(QA_TYPES)
            + " | BLEU-4 | METEOR | Stage-1 loss |")
    lines = [f"### {title}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        types = " | ".join(f"{100 * r['qa_by_type'][t]:.1f}" if t in r["qa_by_type"] else "-" for t in QA_TYPES)
        lines.append(f"| {r['index']} | {r['name']} | {r['video_tokens']} | {r['abstractor_params']:,} | "
                     f"{r['step_seconds']:.3f} | {100 * r['qa']:.1f} | {types} | {100 * r['bleu4']:.1f} | "
                     f"{100 * r['meteor']:.1f} | {r['last_loss']:.3f} |")
    return "\n".join(lines)


def mean_rows(per_seed: Sequence[Sequence[dict]]) -> list[dict]:
    """Each variant's figures averaged over the seeds (rows matched by index)."""
    out = []
    for rows in zip(*per_seed):
        first = rows[0]
        avg = lambda key: float(np.mean([r[key] for r in rows]))
        types = {t: float(np.mean([r["qa_by_type"].get(t, np.nan) for r in rows])) for t in first["qa_by_type"]}
        out.append({**first, "qa": avg("qa"), "bleu4": avg("bleu4"), "meteor": avg("meteor"),
                    "step_seconds": avg("step_seconds"), "last_loss": avg("last_loss"), "qa_by_type": types})
    return out


def markdown_report(per_seed: dict[int, list[dict]]) -> str:
    seeds = sorted(per_seed)
    any_row = per_seed[seeds[0]][0]
    parts = [
        "# The paper's Table 5 on the world: video abstractors",
        "",
        f"Stage 1 ({any_row['steps']} steps) from one stage-0 LLM and vision tower per seed; judged on the "
        f"{any_row['eval_split']} split: video-QA exact match (%, overall and per question type) and \"Describe the "
        "video.\" captions against each video's own caption (BLEU-4 and METEOR, %). Step: median seconds per "
        "stage-1 step on this machine, the variants timed back to back (--quick: during training). Params: the "
        "abstractor's.",
        "",
    ]
    summary = mean_rows([per_seed[s] for s in seeds]) if len(seeds) > 1 else per_seed[seeds[0]]
    paper = " | ".join(f"#{i} {b:.3f} / {m:.3f}" for i, (b, m) in PAPER_TABLE5.items())
    parts += ["Ranking (" + ("mean over seeds" if len(seeds) > 1 else f"seed {seeds[0]}") + "; the paper's Table 5, "
              f"BLEU-4 / METEOR on MSR-VTT: {paper}):", "", *ranking_lines(summary), ""]
    if len(seeds) > 1:
        parts += [_table(summary, f"Mean over seeds {', '.join(map(str, seeds))}"), ""]
    parts += [part for s in seeds for part in (_table(per_seed[s], f"Seed {s}"), "")]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (each under OUT/seed<N>), e.g. 0,1")
    ap.add_argument("--variants", default="0,1,2,3,4", help="Table 5 rows to run, e.g. 0,4")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"stage-1 steps per variant (default {STAGE1_STEPS}; --quick {QUICK_STEPS})")
    ap.add_argument("--eval-split", choices=("test", "val"), default="test")
    ap.add_argument("--quick", action="store_true", help="the quick world, a few steps: checks the machinery (CI)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        chosen = sorted({int(i) for i in args.variants.split(",")})
    except ValueError:
        ap.error("--seeds and --variants take comma-separated integers, e.g. 0,1")
    unknown = [i for i in chosen if i not in range(len(VARIANTS))]
    if unknown:
        ap.error(f"--variants: no row {unknown[0]} (rows are 0-{len(VARIANTS) - 1})")
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be >= 1")
    steps = args.steps or (QUICK_STEPS if args.quick else STAGE1_STEPS)
    out = Path(args.out)
    t0 = time.perf_counter()
    try:
        per_seed = {s: run_seed(out / f"seed{s}", s, [VARIANTS[i] for i in chosen],
                                size=QUICK_SIZE if args.quick else FULL, steps=steps, eval_split=args.eval_split,
                                progress=not args.no_progress, timing_steps=0 if args.quick else TIMING_STEPS)
                    for s in seeds}
    except Interrupted as e:
        print(f"{e} (the ablation: run the same command again; finished variants are kept)", file=sys.stderr)
        return 130
    report = markdown_report(per_seed)
    (out / "ablation.md").write_text(report)
    (out / "ablation.json").write_text(json.dumps({"seconds": time.perf_counter() - t0, "seeds": per_seed}, indent=1))
    print(report)
    print(f"wrote {out / 'ablation.md'} and {out / 'ablation.json'} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
