"""The embedded default: a jitted forward pass of the video understanding module on a real video file.

    python -m g4v_jax.demo [--config tiny] [--video PATH] [--batch 2] [key=value ...]

Without ``--video`` it first writes a short synthetic mp4 (a moving square) under ``--out``, then decodes it with the
project's video reader (uniform sampling, resize + center-crop), runs vision tower + abstractor under ``jax.jit`` with
random weights (no weights can be downloaded here) and prints the shapes at each stage and the timing. Later issues
replace this with the full train-and-chat demo.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from g4v_jax.config import load_config
from g4v_jax.data.video import load_video, stack_clips, synthetic_frames, write_video
from g4v_jax.models.gpt4video import build_model


def jitted_forward(model):
    """Split the NNX model once and return a plain ``jax.jit`` function of (state, frames, mask)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, frames, frame_mask):
        m = nnx.merge(graphdef, state)
        features = m.vision_model(frames, frame_mask).last_hidden_state
        return features, m.abstractor(features, frame_mask)

    return state, forward


def run(config: str = "tiny", video: str | None = None, out: str = "outputs/demo", batch: int = 2,
        overrides=(), repeats: int = 3) -> dict:
    cfg = load_config(config, overrides).model
    if video is None:
        Path(out).mkdir(parents=True, exist_ok=True)
        video = write_video(str(Path(out) / "synthetic.mp4"), synthetic_frames(24, 96, 128), fps=8)
        print(f"wrote {video} (24 frames, 128x96)")
    clip = load_video(video, num_frames=cfg.num_frames, size=cfg.vision.image_size)
    frames, mask = stack_clips([clip] * batch)
    print(f"decoded {video}: frames {frames.shape} {frames.dtype}, frame mask {mask.shape} ({int(mask.sum())} real)")

    t0 = time.perf_counter()
    model = build_model(cfg)
    state, forward = jitted_forward(model)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    print(f"built {cfg.abstractor.variant} model with {n_params:,} parameters in {time.perf_counter() - t0:.2f}s "
          f"on {jax.devices()[0].platform}")

    t0 = time.perf_counter()
    features, tokens = jax.block_until_ready(forward(state, frames, mask))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(forward(state, frames, mask))
        times.append(time.perf_counter() - t0)
    step_ms = 1e3 * float(np.median(times))
    print(f"vision features {features.shape}  (batch, T, 1 + patches, width)")
    print(f"video tokens    {tokens.shape}  (batch, tokens, LLM width)")
    print(f"first call (compile + run) {compile_s:.2f}s; jitted forward {step_ms:.1f} ms "
          f"(median of {repeats}, batch {batch})")
    if not np.all(np.isfinite(np.asarray(tokens))):
        raise FloatingPointError("the forward pass produced non-finite values")
    return {"features": features.shape, "tokens": tokens.shape, "compile_s": compile_s, "step_ms": step_ms}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", help="config name under configs/ or a YAML path")
    ap.add_argument("--video", default=None, help="a video file or image folder (default: write a synthetic one)")
    ap.add_argument("--out", default="outputs/demo")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.abstractor.variant=paper")
    args = ap.parse_intermixed_args(argv)
    run(args.config, args.video, args.out, args.batch, args.overrides)


if __name__ == "__main__":
    main()
