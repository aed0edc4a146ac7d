"""The world's data: training manifests for the three stages, test sets and safety cases (``build_world``).

    python -m g4v_jax.world.tasks OUT_DIR [--quick] [--seed 0] [--n-train-videos N] [--n-test-videos N]
                                          [--n-text N] [--n-val-videos N] [--n-stage0-text N]
                                          [--num-frames 8] [--size 64] [--workers W]

writes, under OUT_DIR (videos under ``OUT_DIR/videos/``, H.264 4:4:4 mp4 at 8 fps; manifests pass ``read_manifest``)::

    stage0.jsonl           text only (no "videos"): each video written as its caption between <video> tags, then
                           QA turns and "Describe the video." -> caption; noun phrase -> caption rewrites; plain
                           sentences. Teaches the language, the QA skills and copying.
    stage1.jsonl           rendered training videos with "captions": video turn, 1-3 QA turns, then the description
                           (questions first, so no answer can be copied from a caption said earlier); and
                           ``TWO_VIDEO_FRACTION`` more examples pairing two of these videos with
                           ``TWO_VIDEO_QUESTION`` (stage 0's text has the same share, as captions).
    stage2.jsonl           text, tags again: count QA (the transfer skill), generation requests (also after a
                           question about a captioned video), harmful requests answered with refusals (safety
                           "harmful"), look-alike requests answered with a video (safety "safe"), and ordinary
                           QA/descriptions so the old skills are kept; plus generation requests after a stage-1
                           video (real with data.stage2_keep_videos, else its caption; never a count question).
    test_qa.jsonl          eval.qa format on held-out videos: questions about the held-out object or the background.
    test_count.jsonl       eval.qa format: COUNT_QUESTION on every held-out QA video.
    test_generation.jsonl  {"id", "request", "caption"}: requests for held-out scenes; caption = the canonical one.
    test_two_video.jsonl   {"id", "videos": [a, b], "question", "answer"}: ``TWO_VIDEO_QUESTION`` about two held-out
                           test videos (0 and 1, 2 and 3, ...).
    val_qa.jsonl, val_count.jsonl, val_generation.jsonl, val_two_video.jsonl, val_safety_cases.jsonl
                           the same for the validation videos and requests (held-out pairs, other draws; the
                           safety cases from the ``*_VAL`` pools): choose settings on these, report on the test
                           files.
    safety_cases.jsonl     eval.safety format: VU = hazard test videos (harmful) and held-out test videos (safe) with
                           a question; VG = test-only harmful requests (harmful), test-only look-alike requests and
                           plain generation requests (safe). Within each task harmful and safe cases alternate,
                           so an evaluation of the first N cases is balanced.
    detector_train.jsonl   {"video", "harmful"}: training videos with the hazard (true) and without (false),
                           alternating; read with ``detector_examples``.
    catalogue.jsonl        {"video", "caption", "hazard", "split", "seed"} for every rendered video: with
                           ``scene.render_scene`` the seed gives back the ground truth behind each frame (the
                           vision pre-training's targets).

Splits and what each stage may see
    - Held-out pairs (``scene.HELD_OUT_PAIRS``) occur in no training video and no stage-1 or stage-2 example, and
      in every test video, test generation request and VG look-alike case (exactly one held-out pair per test
      scene). Only stage 0's text (the LLM's pre-training, standing in for LLaMA's) uses every pair.
    - ``COUNT_QUESTION`` occurs only in stage 2 (text): counting real videos is learned by transfer.
    - Harmful and look-alike wording: training uses ``HARMFUL_TEMPLATES_TRAIN`` x ``HARMFUL_CONTENT_TRAIN`` and
      ``LOOKALIKE_TEMPLATES_TRAIN``; the safety cases use ``*_TEST`` pools (the validation cases ``*_VAL``), whose
      templates and content phrases never occur in training or in the other held-out split (the content phrases
      reuse training's charged words in new phrases, so a model that learnt the words, not the sentences, can still
      recognise them). Plain generation templates are shared: there the
      test is the held-out pair.
    - A harmful request never describes a world scene; a look-alike request always does (it is a world generation
      request with a charged word used harmlessly), and its answer is the normal generation answer.

Sizes
    Full (defaults): 2,000 training videos, 200 held-out test videos (and n_test/2 validation videos), 4,000 text
    examples in each of stage 0 and stage 2 (``n_stage0_text`` sets stage 0's apart), plus n_train/8 hazard videos
    for the detector, n_test/4 hazard videos for the VU cases and n_val/2 for the validation ones.
    ``quick=True``: 120 / 40 / 400 / 400 (215 videos). Explicit sizes override either. Stage 2 is mixed as
    ``STAGE2_MIX`` (plus ``STAGE2_VIDEO_FRACTION`` of n_text examples that keep a stage-1 video before a
    generation request, ``stage2_video_examples``): 20% count QA, 15% generation, 15% generation after a video (a
    caption, a question about it, then the request; half of them a span of random caption words and the request),
    15% harmful, 15% look-alike, 20% ordinary QA; 30% of the harmful and look-alike requests come in a chat's second
    turn (``STAGE2_REQUEST_AFTER_EXCHANGE``).
    Measured on the 2-core dev machine: full build 14.7 s with 2 threads (26.6 s with one; 24-31 s with 2 threads
    while other jobs loaded the machine to ~5), 2,500 videos, mostly H.264 encoding (5-8 ms a video) and rendering
    (~3 ms); quick build 1.2-3 s.

Everything is a function of ``seed``: each part draws from its own generator (``_rng(seed, part)``), so changing one
size does not reshuffle the other parts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from g4v_jax.data.manifest import Example, write_manifest
from g4v_jax.data.io import write_jsonl
from g4v_jax.data.template import AI_PREFIX, HUMAN_PREFIX, SYSTEM_PROMPT
from g4v_jax.data.video import write_video
from g4v_jax.safety.refusal import POLITE_REFUSAL
from g4v_jax.world.scene import COLOURS, HELD_OUT_PAIRS, MOTIONS, SHAPES, Scene, caption, random_scene, render
from g4v_jax.world.language import (
    BACKGROUND_QUESTION, COLOUR_QUESTION, COUNT_QUESTION, COUNT_WORDS, DESCRIBE_INSTRUCTION, FPS, FULL_SIZES,
    GENERATION_TEMPLATES, LOOKALIKE_TEMPLATES, LOOKALIKE_TEMPLATES_TEST, LOOKALIKE_TEMPLATES_TRAIN, MOTION_QUESTION,
    QUICK_SIZES, REFUSALS, SHAPE_QUESTION, TWO_VIDEO_QUESTION, count_answer, fill_request, generation_answer,
    harmful_requests, harmful_training_requests, ordinary_questions, two_video_answer, video_text
)
from g4v_jax.world.examples import (
    REWRITE_INSTRUCTION, STAGE2_TWO_VIDEO_FRACTION, STAGE2_VIDEO_FRACTION, TWO_VIDEO_FRACTION, _pick, _rng,
    held_out_questions, held_out_scene, stage0_examples, stage0_two_video_examples, stage1_example, stage1_two_video_examples, stage2_examples,
    stage2_two_video_examples, stage2_video_examples
)



# --------------------------------------------------------------------------------------------------------------------
# Rendering the videos
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _VideoJob:
    path: str  # absolute
    scene: Scene
    seed: int


def _write_jobs(jobs: Sequence[_VideoJob], num_frames: int, size: int) -> None:
    for job in jobs:
        # full chroma: at 48 px, 4:2:0 blurs the outline of a green shape on gray (nearly equal brightness);
        # lossless: the decoded frames are the rendered ones in every run (lossy x264 output varies by process)
        write_video(job.path, render(job.scene, num_frames=num_frames, size=size, seed=job.seed), fps=FPS,
                    full_chroma=True, lossless=True)


def _render_all(jobs: Sequence[_VideoJob], num_frames: int, size: int, workers: int) -> None:
    """Render and encode every job in ``workers`` threads (1: in the calling thread). Threads, not processes: NumPy
    and PyAV's encoder release the GIL for most of the work (about 1.6x faster on 2 cores), and a thread needs
    neither the ``if __name__ == "__main__"`` guard that spawned processes impose on the caller's script nor a
    fork of a process that may already run JAX's threads."""
    if workers <= 1:
        _write_jobs(jobs, num_frames, size)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(_write_jobs, jobs[k::workers], num_frames, size) for k in range(workers)]:
            f.result()


# --------------------------------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------------------------------


class _Videos:
    """The videos to render, collected while the examples are made, and their catalogue rows."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.jobs: list[_VideoJob] = []
        self.catalogue: list[dict] = []

    def add(self, name: str, scene: Scene, rng: np.random.Generator, split: str) -> str:
        """Queue ``videos/{name}.mp4`` (positions seeded from ``rng``); returns its path relative to the root."""
        rel = f"videos/{name}.mp4"
        seed = int(rng.integers(2**31))
        self.jobs.append(_VideoJob(str((self.root / rel).resolve()), scene, seed))
        self.catalogue.append({"video": rel, "caption": caption(scene), "hazard": scene.hazard, "split": split,
                               "seed": seed})
        return rel


def _stage1_part(seed: int, n: int, videos: _Videos) -> list[Example]:
    rng = _rng(seed, "stage1")
    out = []
    for i in range(n):
        scene = random_scene(rng, exclude_pairs=HELD_OUT_PAIRS)
        out.append(stage1_example(i, videos.add(f"train-{i:05d}", scene, rng, "train"), scene, rng))
    return out


def _detector_part(seed: int, n: int, stage1: Sequence[Example], videos: _Videos) -> list[dict]:
    """``n`` hazard training videos and as many hazard-free stage-1 videos, alternating."""
    rng = _rng(seed, "detector")
    rows = []
    for i in range(n):
        scene = random_scene(rng, exclude_pairs=HELD_OUT_PAIRS, hazard=True)
        rows.append({"video": videos.add(f"hazard-train-{i:05d}", scene, rng, "detector"), "harmful": True})
        rows.append({"video": stage1[i % len(stage1)].videos[0], "harmful": False})
    return rows


def _id_prefix(split: str) -> str:
    """What starts the row ids (and generator parts) of a held-out split: none for "test", which came first."""
    return "" if split == "test" else f"{split}-"


def _test_part(seed: int, n: int, videos: _Videos, split: str = "test"
               ) -> tuple[list[dict], list[dict], list[tuple[str, Scene]]]:
    """(QA rows, count rows, [(video, scene)]) for ``n`` held-out videos of ``split`` ("test" or "val")."""
    rng = _rng(seed, split)
    prefix = _id_prefix(split)
    qa, count, rendered = [], [], []
    for i in range(n):
        scene = held_out_scene(rng, i)
        video = videos.add(f"{split}-{i:05d}", scene, rng, split)
        rendered.append((video, scene))
        for k, (q, a) in enumerate(held_out_questions(rng, scene)):
            qa.append({"id": f"{prefix}qa-{i:05d}-{k}", "video": video, "question": q, "answer": a})
        count.append({"id": f"{prefix}count-{i:05d}", "video": video, "question": COUNT_QUESTION,
                      "answer": count_answer(scene)})
    return qa, count, rendered


def _two_video_part(held_out_videos: Sequence[tuple[str, Scene]], split: str = "test") -> list[dict]:
    """``TWO_VIDEO_QUESTION`` about consecutive held-out videos of ``split`` (0 and 1, 2 and 3, ...)."""
    prefix = _id_prefix(split)
    pairs = zip(held_out_videos[0::2], held_out_videos[1::2])
    return [{"id": f"{prefix}two-{i:05d}", "videos": [va, vb], "question": TWO_VIDEO_QUESTION,
             "answer": two_video_answer(a, b)} for i, ((va, a), (vb, b)) in enumerate(pairs)]


def _generation_part(seed: int, n: int, split: str = "test") -> list[dict]:
    prefix = _id_prefix(split)
    rng = _rng(seed, f"{prefix}generation")
    rows = []
    for i in range(n):
        scene = held_out_scene(rng, i)
        rows.append({"id": f"{prefix}gen-{i:05d}", "request": fill_request(_pick(rng, GENERATION_TEMPLATES), scene),
                     "caption": caption(scene)})
    return rows


def _any_question(rng: np.random.Generator, scene: Scene) -> str:
    return _pick(rng, [DESCRIBE_INSTRUCTION] + [q for q, _ in ordinary_questions(scene)])


def _safety_part(seed: int, n: int, held_out_videos: Sequence[tuple[str, Scene]], videos: _Videos,
                 split: str = "test") -> list[dict]:
    """VU: ``n`` new hazard videos vs ``n`` held-out videos of ``split``; VG: up to ``n`` harmful requests of the
    split's pool vs ``n`` safe ones (the split's look-alikes and plain requests, alternating). Harmful and safe cases
    alternate within each task, so any prefix of the file (an evaluation limited to its first cases) is balanced."""
    prefix = _id_prefix(split)
    rng = _rng(seed, f"{prefix}safety")
    vu_harmful, vu_safe, vg_harmful, vg_safe = [], [], [], []
    for i in range(n):
        scene = held_out_scene(rng, i, hazard=True)
        vu_harmful.append({"id": f"{prefix}vu-harmful-{i:05d}", "task": "VU",
                           "video": videos.add(f"hazard-{split}-{i:05d}", scene, rng, f"{prefix}safety"),
                           "query": _any_question(rng, scene), "label": "harmful"})
    for i, (video, scene) in enumerate(held_out_videos[:n]):
        vu_safe.append({"id": f"{prefix}vu-safe-{i:05d}", "task": "VU", "video": video,
                        "query": _any_question(rng, scene), "label": "safe"})
    harmful = harmful_requests(split)
    for i, k in enumerate(rng.choice(len(harmful), size=min(n, len(harmful)), replace=False)):
        vg_harmful.append({"id": f"{prefix}vg-harmful-{i:05d}", "task": "VG", "query": harmful[k][1],
                           "label": "harmful"})
    for i in range(n):
        lookalike = i % 2 == 0
        template = _pick(rng, LOOKALIKE_TEMPLATES[split] if lookalike else GENERATION_TEMPLATES)
        vg_safe.append({"id": f"{prefix}vg-{'lookalike' if lookalike else 'plain'}-{i:05d}", "task": "VG",
                        "query": fill_request(template, held_out_scene(rng, i)), "label": "safe"})
    return _alternate(vu_harmful, vu_safe) + _alternate(vg_harmful, vg_safe)


def _alternate(a: Sequence[dict], b: Sequence[dict]) -> list[dict]:
    """a0, b0, a1, b1, ... then the rest of the longer list."""
    out = [x for pair in zip(a, b) for x in pair]
    return out + list(a[len(b):]) + list(b[len(a):])


@dataclasses.dataclass(frozen=True)
class WorldData:
    root: Path
    stage0: Path
    stage1: Path
    stage2: Path
    test_qa: Path
    test_count: Path
    test_generation: Path
    test_two_video: Path
    val_qa: Path
    val_count: Path
    val_generation: Path
    val_two_video: Path
    safety_cases: Path
    val_safety_cases: Path
    detector_train: Path
    catalogue: Path
    counts: Mapping[str, int]  # file stem (or "videos") -> number of lines (videos)
    seconds: float  # wall time of build_world


def build_world(
    out_dir: str | os.PathLike,
    *,
    n_train_videos: int | None = None,
    n_test_videos: int | None = None,
    n_text: int | None = None,
    n_val_videos: int | None = None,
    n_stage0_text: int | None = None,
    seed: int = 0,
    num_frames: int = 8,
    size: int = 64,
    quick: bool = False,
    workers: int | None = None,
) -> WorldData:
    """Write every file of the module docstring under ``out_dir``; sizes default to ``FULL_SIZES`` (or
    ``QUICK_SIZES`` with ``quick``). ``workers`` threads render the videos (default: the CPU count)."""
    t0 = time.perf_counter()
    defaults = QUICK_SIZES if quick else FULL_SIZES
    n_train = defaults["n_train_videos"] if n_train_videos is None else n_train_videos
    n_test = defaults["n_test_videos"] if n_test_videos is None else n_test_videos
    n_text = defaults["n_text"] if n_text is None else n_text
    n_val = max(4, n_test // 2) if n_val_videos is None else n_val_videos
    n_stage0 = defaults["n_stage0_text"] if n_stage0_text is None else n_stage0_text
    for name, value in (("n_train_videos", n_train), ("n_test_videos", n_test), ("n_text", n_text),
                        ("n_val_videos", n_val), ("n_stage0_text", n_stage0)):
        if value < 4:
            raise ValueError(f"{name} must be >= 4, got {value}")
    root = Path(out_dir)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    videos = _Videos(root)
    stage1 = _stage1_part(seed, n_train, videos)
    # The hazard is blatant: a few hundred examples per class are plenty for the detector.
    detector = _detector_part(seed, max(2, n_train // 8), stage1, videos)
    stage2_videos = stage2_video_examples(_rng(seed, "stage2-video"), stage1, round(n_text * STAGE2_VIDEO_FRACTION),
                                          harmful_training_requests())
    stage2_videos += stage2_two_video_examples(_rng(seed, "stage2-two-video"), stage1,
                                               round(n_text * STAGE2_TWO_VIDEO_FRACTION))
    stage1 = stage1 + stage1_two_video_examples(_rng(seed, "stage1-two-video"), stage1,
                                                round(n_train * TWO_VIDEO_FRACTION))
    test_qa, test_count, test_videos = _test_part(seed, n_test, videos)
    val_qa, val_count, val_videos = _test_part(seed, n_val, videos, "val")
    rows = {"test_qa": test_qa, "test_count": test_count, "test_generation": _generation_part(seed, n_test // 2),
            "test_two_video": _two_video_part(test_videos),
            "val_qa": val_qa, "val_count": val_count, "val_generation": _generation_part(seed, n_val // 2, "val"),
            "val_two_video": _two_video_part(val_videos, "val"),
            "safety_cases": _safety_part(seed, max(2, n_test // 4), test_videos, videos),
            "val_safety_cases": _safety_part(seed, max(2, n_val // 2), val_videos, videos, "val"),
            "detector_train": detector, "catalogue": videos.catalogue}
    stage0 = stage0_examples(_rng(seed, "stage0"), n_stage0) + stage0_two_video_examples(
        _rng(seed, "stage0-two-video"), round(n_stage0 * TWO_VIDEO_FRACTION))
    manifests = {"stage0": stage0, "stage1": stage1,
                 "stage2": stage2_examples(_rng(seed, "stage2"), n_text) + stage2_videos}

    _render_all(videos.jobs, num_frames, size, workers or os.cpu_count() or 1)
    paths = {name: root / f"{name}.jsonl" for name in [*manifests, *rows]}
    for name, examples in manifests.items():
        write_manifest(paths[name], examples)
    for name, lines in rows.items():
        write_jsonl(paths[name], lines)
    counts = {"videos": len(videos.jobs), **{name: len(x) for name, x in [*manifests.items(), *rows.items()]}}
    return WorldData(root=root, **paths, counts=counts, seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer corpus
# --------------------------------------------------------------------------------------------------------------------


def world_text(seed: int = 0, n_scenes: int = 300) -> list[str]:
    """Every kind of text the world uses, for training the BPE tokenizer: captions and noun phrases of random
    scenes, all questions and answers, request templates (train and test), harmful requests, refusals, the polite
    refusal and the conversation template's fixed strings. Deterministic given ``seed``."""
    rng = _rng(seed, "tokenizer")
    texts = [SYSTEM_PROMPT, HUMAN_PREFIX, AI_PREFIX, POLITE_REFUSAL, DESCRIBE_INSTRUCTION, COUNT_QUESTION,
             REWRITE_INSTRUCTION.format(np=""),
             BACKGROUND_QUESTION, *COUNT_WORDS, *MOTIONS, *REFUSALS]
    texts += [COLOUR_QUESTION.format(shape=s) for s in SHAPES]
    texts += [SHAPE_QUESTION.format(colour=c) for c in COLOURS]
    texts += [MOTION_QUESTION.format(colour=c, shape=s) for c in COLOURS for s in SHAPES]
    # Fixed as the landed runs' tokenizer was built: the stage-0 LM crosses its threshold narrowly (RunSize), and a
    # corpus that also held the 1,666 stage-2 harmful requests shifted the BPE merges enough that one full run's stage
    # 0 ended at loss 0.227 instead of 0.171 and video QA fell to 0.28. Validation wording is left out for the same
    # reason; byte-level BPE encodes any text.
    texts += [r for split in ("train", "test") for _, r in harmful_requests(split)]
    templates = GENERATION_TEMPLATES + LOOKALIKE_TEMPLATES_TRAIN + LOOKALIKE_TEMPLATES_TEST
    for i in range(n_scenes):
        scene = random_scene(rng, exclude_pairs=HELD_OUT_PAIRS)
        texts += [video_text(scene), generation_answer(scene), fill_request(templates[i % len(templates)], scene)]
        texts += [f"{q} {a}" for q, a in ordinary_questions(scene)]
    return texts


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def summary_table(world: WorldData) -> str:
    rows = ["| file | lines |", "|---|---|"]
    rows += [f"| {name} | {n:,} |" for name, n in world.counts.items()]
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m g4v_jax.world.tasks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--quick", action="store_true", help="about 200 videos (CI)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train-videos", type=int, default=None)
    ap.add_argument("--n-test-videos", type=int, default=None)
    ap.add_argument("--n-text", type=int, default=None)
    ap.add_argument("--n-val-videos", type=int, default=None)
    ap.add_argument("--n-stage0-text", type=int, default=None)
    ap.add_argument("--num-frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="rendering threads (default: CPU count)")
    args = ap.parse_args(argv)
    try:
        world = build_world(args.out_dir, n_train_videos=args.n_train_videos, n_test_videos=args.n_test_videos,
                            n_text=args.n_text, n_val_videos=args.n_val_videos,
                            n_stage0_text=args.n_stage0_text, seed=args.seed,
                            num_frames=args.num_frames, size=args.size,
                            quick=args.quick, workers=args.workers)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# World data in {world.root} (seed {args.seed}, built in {world.seconds:.1f} s)\n")
    print(summary_table(world))
    return 0


if __name__ == "__main__":
    sys.exit(main())
