"""GPT4Video rows, ours only (the peer would be mPLUG-Owl's own training and serving code, not installed here): the
stage-1 step and one video question through the engine, each in a fresh process."""

from __future__ import annotations

import dataclasses
import statistics

import numpy as np

from common import OURS_TRAIN, Context, Suite, in_child, our_dtypes, peak_memory_gib, timed, timed_result

ORDER = 60  # where the group's rows stand in the table


def rows(ctx: Context) -> list[dict]:
    return gpt4video_rows(ctx.suite, ctx.suite_args) if ctx.suite.gpt4video else []



def random_gpt4video(suite: Suite):
    """The suite's GPT4Video with random weights drawn on the device (a host draw of 7B values takes minutes; the
    figures below do not depend on the values)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from g4v_jax.config import load_config
    from g4v_jax.models.gpt4video import abstract_model
    from g4v_jax.weights import materialize

    cfg = load_config(suite.gpt4video, [*OURS_TRAIN, *our_dtypes(suite)]).model
    graphdef, params, rest = nnx.split(abstract_model(cfg), nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    leaves = [(0.02 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype) for k, x in zip(keys, leaves)]
    return cfg, nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), jax.tree.map(materialize, rest))


def video_batch(cfg, batch: int, text: int, seed: int = 0) -> dict:
    """``batch`` rows of ``text`` tokens around one video each (the answer half labelled)."""
    rng = np.random.default_rng(seed)
    k, t, s = cfg.num_video_tokens, cfg.num_frames, cfg.vision.image_size
    ids = rng.integers(3, cfg.llm.vocab_size, (batch, text + k)).astype(np.int32)
    ids[:, 4:4 + k] = -1
    labels = ids.copy()
    labels[:, : (text + k) // 2] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids, bool),
            "videos": rng.integers(0, 256, (batch, 1, t, s, s, 3), dtype=np.uint8),
            "frame_mask": np.ones((batch, 1, t), bool)}


def child_stage1(suite: Suite, src: str) -> dict:
    """Our stage-1 step (the abstractor trained, the towers frozen) on ``stage1`` = (batch, text) with one video of
    T frames per row."""
    import jax

    from g4v_jax.config import load_config
    from g4v_jax.train import build_trainer

    model_cfg, model = random_gpt4video(suite)
    batch_size, text = suite.stage1
    cfg = load_config("tiny", ["train.stage=stage1", f"train.global_batch_size={batch_size}", "train.warmup_ratio=0"])
    trainer = build_trainer(dataclasses.replace(cfg, model=model_cfg), total_steps=100, model=model)
    del model
    batch = video_batch(model_cfg, batch_size, text)
    first = timed(lambda: trainer.train_steps(iter([batch]), 1))
    times = [timed(lambda: trainer.train_steps(iter([batch]), 1)) for _ in range(3)]
    jax.effects_barrier()
    return {"step_s": statistics.median(times), "first_step_s": first, "peak_gib": peak_memory_gib(suite, "ours"),
            "tokens": batch["input_ids"].size, "frames": batch_size * model_cfg.num_frames}


def child_video_question(suite: Suite, src: str) -> dict:
    """One question about one video through the engine (what the server does per request): a 48-token question
    around the video, 64 new tokens, greedy; seconds to the first token and to the last, after a warm-up."""
    from g4v_jax.config import EngineConfig
    from g4v_jax.inference.engine import Engine, EngineRequest
    from g4v_jax.inference.generate import SamplingConfig

    model_cfg, model = random_gpt4video(suite)
    batch = video_batch(model_cfg, 1, 48)
    video = (batch["videos"][0, 0], batch["frame_mask"][0, 0])
    engine = Engine(model, None, EngineConfig(num_slots=1, max_length=512, max_videos=1), eos_id=-1)
    first = timed(engine.warmup)

    def ask():
        handle = engine.submit(EngineRequest(batch["input_ids"][0], [video], SamplingConfig(64), id=0))
        engine.run()
        return handle.result()

    ask()
    runs = [timed_result(ask) for _ in range(3)]
    return {"total_s": statistics.median(t for t, _ in runs), "ttft_s": statistics.median(r.ttft for _, r in runs),
            "first_call_s": first}


def gpt4video_rows(suite: Suite, suite_args: list[str]) -> list[dict]:
    """Ours only: the peer would be mPLUG-Owl's own training and serving code, which is not installed here."""
    s1 = in_child("stage1-ours", suite_args, "")
    qa = in_child("video-question-ours", suite_args, "")
    batch, _ = suite.stage1
    return [{"work": f"stage-1 step ({suite.gpt4video}), batch {batch} × 1 video of "
                     f"{s1['frames'] // batch} frames, {s1['tokens'] // batch} tokens", "unit": "frames/s",
             "ours": s1["frames"] / s1["step_s"], "peer": None, "first_call_s": s1["first_step_s"],
             "peak_gib": (s1["peak_gib"], None), "tokens_per_s": s1["tokens"] / s1["step_s"]},
            {"work": f"one video question ({suite.gpt4video}), 64 new tokens, end to end through the engine",
             "unit": "s", "ours": qa["total_s"], "peer": None, "ttft_s": qa["ttft_s"],
             "first_call_s": qa["first_call_s"]}]


CHILDREN = {"stage1-ours": child_stage1, "video-question-ours": child_video_question}
