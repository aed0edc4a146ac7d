"""What training would skip of a manifest, and why, by the checks training itself runs.

    python -m g4v_jax.data.check MANIFEST [--config CFG] [key=value ...]

With ``--config`` (a training config whose ``train.tokenizer`` or ``train.init_from`` names a tokenizer) every check
of ``pipeline.count_problems`` runs, token lengths included, with that config's ``data.*``, ``model.*`` and
``train.stage``; without it only the videos are read (as stage 1 would) and the report says what was not checked.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from g4v_jax.config import load_config
from g4v_jax.data import pipeline
from g4v_jax.data.io import resolve_video_path
from g4v_jax.data.manifest import Example, read_manifest
from g4v_jax.data.pipeline import SKIP_REASONS
from g4v_jax.data.tokenizer import load_tokenizer
from g4v_jax.data.video import VideoReadError, load_video


def check_for_training(manifest: str | os.PathLike, config: str | None = None, overrides: Sequence[str] = ()) -> str:
    """What training would skip of the ``manifest``'s examples and why, by the code training runs
    (``pipeline.count_problems``), as lines of text. With ``config`` (a training config naming a tokenizer) the
    token lengths are checked too."""
    examples = read_manifest(manifest)
    cfg = load_config(config or "tiny", [*overrides, f"data.train_manifest={manifest}"])
    data_cfg = pipeline.pipeline_config(cfg)
    tok_dir = cfg.train.tokenizer or cfg.train.init_from
    if config and tok_dir:
        report = pipeline.count_problems(examples, load_tokenizer(tok_dir), data_cfg, Path(manifest).parent)
        note = f"training ({cfg.train.stage}, data.seq_len={data_cfg.seq_len})"
    else:
        report = _video_problems(examples, data_cfg, Path(manifest).parent)
        note = ("training (videos only: token lengths need --config with train.tokenizer or train.init_from; video "
                "counts and reading as in stage 1)")
    lines = [f"for {note}: {pipeline.describe_problems(report)}"]
    lines += [f"  {p['id']}: {p['reason'].replace('_', ' ')}: {p['detail']}" for p in report["problems"]]
    return "\n".join(lines)


def _video_problems(examples: Sequence[Example], data_cfg, manifest_dir: Path) -> dict:
    problems = []
    for ex in examples:
        if len(ex.videos) > data_cfg.max_videos_per_example:
            problems.append({"id": ex.id, "reason": "too_many_videos",
                             "detail": f"{len(ex.videos)} videos, data.max_videos_per_example is "
                                       f"{data_cfg.max_videos_per_example}"})
            continue
        for video in ex.videos:
            try:
                load_video(resolve_video_path(video, manifest_dir), num_frames=data_cfg.num_frames,
                           size=data_cfg.image_size, sampling=data_cfg.video_sampling, resize=data_cfg.video_resize)
            except VideoReadError as e:
                problems.append({"id": ex.id, "reason": "unreadable_video", "detail": str(e)})
                break
    reasons = [p["reason"] for p in problems]
    return {"examples": len(examples), "ok": len(examples) - len(problems), "skipped": len(problems),
            **{r: reasons.count(r) for r in SKIP_REASONS}, "problems": problems}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m g4v_jax.data.check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest")
    ap.add_argument("--config", default=None, help="the training config (names the tokenizer)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.stage=stage2 data.seq_len=1024")
    args = ap.parse_intermixed_args(argv)
    try:
        print(check_for_training(args.manifest, args.config, args.overrides))
    except (ValueError, OSError) as e:  # ManifestError, ConfigError, a tokenizer that does not load
        print(f"g4v_jax.data.check: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
