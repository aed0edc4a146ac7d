"""The embedded default: a jitted forward pass of GPT4Video on a real video file.

    python -m g4v_jax.demo [--config tiny] [--video PATH] [--batch 2] [key=value ...]

Without ``--video`` it first writes a short synthetic mp4 (a moving square) under ``--out``, then decodes it with the
project's video reader (uniform sampling, resize + center-crop), runs vision tower + abstractor under ``jax.jit`` with
random weights (no weights can be downloaded here), then builds the conversation template around the video
(``###Human: <video>…</video> ###Human: What happens in this video? ###AI:``) with a byte-level BPE trained offline on
the template text, and runs the whole model (video tokens spliced into LLaMA's embeddings) under one ``jax.jit``.
It prints the shapes at each stage and the timing. Later issues replace this with the full train-and-chat demo.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from g4v_jax.config import load_config
from g4v_jax.data.template import SYSTEM_PROMPT, Turn, pad_batch, tokenize_conversation
from g4v_jax.data.tokenizer import build_bpe_tokenizer
from g4v_jax.cli import guard
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
    clip = load_video(video, num_frames=cfg.num_frames, size=cfg.vision.image_size, sampling=cfg.video.sampling,
                      resize=cfg.video.resize)
    frames, mask = stack_clips([clip] * batch)
    print(f"decoded {video}: frames {frames.shape} {frames.dtype}, frame mask {mask.shape} ({int(mask.sum())} real)")

    t0 = time.perf_counter()
    model = build_model(cfg)
    state, forward = jitted_forward(model)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    print(f"built {cfg.kind} ({cfg.abstractor.variant} abstractor) with {n_params:,} parameters in "
          f"{time.perf_counter() - t0:.2f}s "
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
    result = {"features": features.shape, "tokens": tokens.shape, "compile_s": compile_s, "step_ms": step_ms}
    if cfg.kind == "gpt4video":
        result["logits"] = _full_model(model, cfg, frames, mask, Path(out))
    return result


DEMO_QUESTION = "What happens in this video?"


def _full_model(model, cfg, frames, mask, out: Path) -> tuple[int, ...]:
    """Template + tokenizer + GPT4Video forward: video tokens spliced into the prompt's embeddings."""
    corpus = [SYSTEM_PROMPT, DEMO_QUESTION, "###Human: <video></video> ###AI: a red square moves to the left"] * 8
    tokenizer = build_bpe_tokenizer(corpus, out / "tokenizer", vocab_size=min(cfg.llm.vocab_size, 400))
    conv = tokenize_conversation(tokenizer, [Turn("human", video=0), Turn("human", DEMO_QUESTION)],
                                 num_video_tokens=cfg.num_video_tokens, add_generation_prompt=True,
                                 max_length=cfg.llm.max_position_embeddings)
    batch = pad_batch([conv] * frames.shape[0], pad_id=tokenizer.pad_token_id, side="left")
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, frames, frame_mask, attention_mask):
        logits, _ = nnx.merge(graphdef, state)(ids, videos=frames, frame_mask=frame_mask,
                                               attention_mask=attention_mask)
        return logits[:, -1]

    t0 = time.perf_counter()
    # one video per row: (B, V=1, T, H, W, 3)
    last = jax.block_until_ready(forward(state, batch["input_ids"], frames[:, None], mask[:, None],
                                         batch["attention_mask"]))
    print(f"prompt          {batch['input_ids'].shape}  ({conv.num_videos} video = {cfg.num_video_tokens} slots "
          f"between <video> and </video>, then the question and '###AI:')")
    print(f"next-token logits {last.shape}  from the whole model in one jit ({time.perf_counter() - t0:.2f}s with "
          f"compile); random weights, so the token itself means nothing: "
          f"{tokenizer.decode([int(np.argmax(last[0]))])!r}")
    return tuple(last.shape)


@guard("g4v_jax.demo")
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m g4v_jax.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", help="config name under configs/ or a YAML path")
    ap.add_argument("--video", default=None, help="a video file or image folder (default: write a synthetic one)")
    ap.add_argument("--out", default="outputs/demo")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.abstractor.variant=paper")
    args = ap.parse_intermixed_args(argv)
    run(args.config, args.video, args.out, args.batch, args.overrides)


if __name__ == "__main__":
    main()
