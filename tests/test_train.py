"""The train step on tiny configs: what trains, loss falls, accumulation, checkpoint resume, non-finite loss,
and the same losses on 8 fake CPU devices under the dp / fsdp / fsdp x tensor meshes."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from scipy.special import logsumexp

from g4v_jax.config import load_config
from g4v_jax.train.checkpoint import Checkpointer
from g4v_jax.train import TrainingError, build_trainer
from g4v_jax.weights import named_params

ROOT = Path(__file__).resolve().parents[1]


def synthetic_batch(cfg, batch=4, length=48, seed=0, videos=False):
    """Token ids with answers in the second half; with videos, one video per row at a fixed slot."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.llm.vocab_size, (batch, length)).astype(np.int32)
    labels = ids.copy()
    labels[:, : length // 2] = -100
    out = {"input_ids": ids, "labels": labels, "attention_mask": np.ones((batch, length), bool)}
    if videos:
        k = cfg.num_video_tokens
        ids[:, 2:2 + k] = -1
        labels[:, 2:2 + k] = -100
        out["videos"] = rng.integers(0, 256, (batch, 1, cfg.num_frames, 56, 56, 3), dtype=np.uint8)
        out["frame_mask"] = np.ones((batch, 1, cfg.num_frames), bool)
    return out


def _cfg(*overrides):
    return load_config("tiny", ["train.global_batch_size=4", "train.warmup_ratio=0", *overrides])


def _snapshot(trainer):
    return {k: np.asarray(v) for k, v in named_params(trainer.model()).items()}


@pytest.mark.parametrize("stage, prefix, lr, extra", [
    ("stage1", ("abstractor.",), 3e-3, []),
    ("stage1", ("abstractor.", "vision_model."), 3e-3, ["train.train_vision_tower=true"]),
    ("stage2", ("language_model.",), 3e-2, [])])
def test_loss_falls_and_only_the_stage_trains(stage, prefix, lr, extra):
    cfg = _cfg(f"train.stage={stage}", f"train.learning_rate={lr}", *extra)
    trainer = build_trainer(cfg, total_steps=100)
    before = _snapshot(trainer)
    batch = synthetic_batch(cfg.model, videos=stage == "stage1")
    losses = [m["loss"] for m in trainer.train_steps(iter([batch] * 8), 8)]
    print(f"{stage} losses on a repeated batch: {[round(x, 4) for x in losses]}")
    assert losses[-1] < losses[0] - 0.01
    after = _snapshot(trainer)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(k.startswith(prefix) for k in changed)
    assert all(any(k.startswith(p) for k in changed) for p in prefix)  # every listed module trained
    assert trainer.step_fn._cache_size() == 1  # the first step's state and every later one's compile alike
    if stage == "stage2":
        assert all(".lora_" in k for k in changed)  # frozen base weights are bit-identical


def test_lora_tuning_a_plain_llm():
    """``model.kind=llm`` (a LLaMA alone, no vision) LoRA-tunes: the step takes no video inputs."""
    cfg = _cfg("model.kind=llm", "train.stage=stage2", "train.learning_rate=3e-2")
    trainer = build_trainer(cfg, total_steps=100)
    before = _snapshot(trainer)
    losses = [m["loss"] for m in trainer.train_steps(iter([synthetic_batch(cfg.model)] * 6), 6)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.01
    after = _snapshot(trainer)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)


def test_distill_rows_train_toward_the_llm_with_adapters_off():
    """``train.distill_weight``: rows marked ``distill`` leave the answer loss and pull toward the LLM's own
    predictions. At init (LoRA B = 0) the tuned model is the LLM, so a batch of distill rows has KL 0 and moves
    nothing; after training on answers, the step's KL is the one computed from two forward passes."""
    lora = ("model.kind=llm", "train.stage=stage2", "train.learning_rate=3e-2", "model.lora.dropout=0.0")
    cfg = _cfg(*lora, "train.distill_weight=1.0")
    batch = synthetic_batch(cfg.model)
    distill = np.zeros_like(batch["attention_mask"])
    distill[2:] = True  # rows 2 and 3
    marked = {**batch, "distill": distill}
    fresh = build_trainer(cfg, total_steps=100)
    (m,) = fresh.train_steps(iter([{**batch, "distill": np.ones_like(distill)}]), 1)
    assert abs(m["distill_kl"]) < 1e-6 and m["distill_tokens"] == distill.size and m["tokens"] == 0
    assert m["grad_norm"] < 1e-6  # nothing to move toward (rounding only: Adam would scale it up to a full step)
    # the answer loss is that of the unmarked rows alone: as a run without distillation on those rows' labels
    trainer = build_trainer(cfg, total_steps=100)
    plain = build_trainer(_cfg(*lora), total_steps=100)
    (m,) = trainer.train_steps(iter([marked]), 1)
    (ref,) = plain.train_steps(iter([{**batch, "labels": np.where(distill, -100, batch["labels"])}]), 1)
    assert m["loss"] == pytest.approx(ref["loss"], rel=1e-6) and m["tokens"] == ref["tokens"]
    # each term is a mean over its own tokens: the marked rows (KL 0 here) do not shrink the unmarked rows' gradient
    assert m["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    trainer.train_steps(iter([marked] * 4), 4)
    model = trainer.model()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    tuned = np.asarray(model(ids, attention_mask=mask)[0], np.float64)
    base = np.asarray(model(ids, attention_mask=mask, adapter_mask=np.zeros_like(mask))[0], np.float64)
    log_q, log_p = (x - logsumexp(x, axis=-1, keepdims=True) for x in (tuned, base))
    want = (np.exp(log_p) * (log_p - log_q)).sum(-1)[distill].mean()
    (m,) = trainer.train_steps(iter([marked]), 1)  # metrics are of the weights before this step's update
    assert want > 1e-4, "the adapters learnt nothing: this KL cannot tell the terms apart"
    assert m["distill_kl"] == pytest.approx(want, rel=1e-4)
    # the means are over the whole batch, whatever its micro-batches (row 0 answers, rows 1-3 distil: uneven halves)
    uneven = {**marked, "distill": np.arange(4)[:, None].repeat(distill.shape[1], 1) > 0}
    runs = []
    # and whatever their order: rows 1 and 3 distil, so with the distilling rows put first, a micro-batch of two
    # holds both and the other (rows 0 and 2) skips the teacher's pass; one row each is the same
    interleaved = {**marked, "distill": (np.arange(4) % 2 == 1)[:, None].repeat(distill.shape[1], 1)}
    for batch_, accums in ((uneven, (1, 2)), (interleaved, (1, 2, 4))):
        runs = []
        for accum in accums:
            t = build_trainer(_cfg(*lora, "train.distill_weight=1.0", f"train.grad_accum_steps={accum}"),
                              total_steps=100)
            runs.append([(m["loss"], m["distill_kl"], m["grad_norm"]) for m in t.train_steps(iter([batch_] * 3), 3)])
        for other in runs[1:]:
            np.testing.assert_allclose(runs[0], other, rtol=1e-4, atol=1e-7)


def test_distilling_rows_go_first_and_travel_whole():
    from g4v_jax.train.step import distilling_rows_first

    distill = np.zeros((5, 3), bool)
    distill[[1, 4], 2] = True
    batch = {"input_ids": np.arange(15).reshape(5, 3), "distill": distill, "videos": np.arange(5)[:, None, None]}
    out = distilling_rows_first(batch)
    assert out["videos"].ravel().tolist() == [1, 4, 0, 2, 3]  # distilling rows first, each group in its order
    np.testing.assert_array_equal(out["input_ids"], batch["input_ids"][[1, 4, 0, 2, 3]])
    np.testing.assert_array_equal(out["distill"], distill[[1, 4, 0, 2, 3]])
    plain = {"input_ids": batch["input_ids"]}
    assert distilling_rows_first(plain)["input_ids"] is plain["input_ids"]


def test_gradient_accumulation_equals_one_big_batch():
    batch = synthetic_batch(_cfg().model, batch=4)
    results = []
    for accum in (1, 2):
        cfg = _cfg("train.stage=stage2", "train.learning_rate=1e-2", f"train.grad_accum_steps={accum}",
                   "model.lora.dropout=0.0")
        trainer = build_trainer(cfg, total_steps=10)
        losses = [m["loss"] for m in trainer.train_steps(iter([batch] * 3), 3)]
        results.append((losses, _snapshot(trainer)))
    (l1, p1), (l2, p2) = results
    print(f"accum 1 x 4: {l1}; accum 2 x 2: {l2}")
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    assert max(np.abs(p1[k] - p2[k]).max() for k in p1) <= 1e-5


def test_resume_from_checkpoint_gives_the_same_run(tmp_path):
    cfg = _cfg("train.stage=stage2", "train.learning_rate=1e-2", "train.async_checkpointing=true")
    batches = [synthetic_batch(cfg.model, seed=i) for i in range(6)]

    straight = build_trainer(cfg, total_steps=6)
    full = [m["loss"] for m in straight.train_steps(iter(batches), 6)]

    first = build_trainer(cfg, total_steps=6)
    part1 = [m["loss"] for m in first.train_steps(iter(batches[:3]), 3)]
    ckpt = Checkpointer(tmp_path / "ckpt", cfg.train)
    ckpt.save(first.step, first.state, {"next_batch": 3})
    ckpt.close()
    del first  # the "killed" process

    second = build_trainer(cfg, total_steps=6)
    ckpt = Checkpointer(tmp_path / "ckpt", cfg.train)
    second.state, data_state = ckpt.restore(second.state)
    ckpt.close()
    assert second.step == 3 and data_state == {"next_batch": 3}
    part2 = [m["loss"] for m in second.train_steps(iter(batches[data_state["next_batch"]:]), 3)]
    print(f"uninterrupted: {full}\nresumed:       {part1 + part2}")
    assert part1 + part2 == full  # bit-identical losses
    a, b = _snapshot(straight), _snapshot(second)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_state():
    cfg = _cfg("train.stage=stage2")
    trainer = build_trainer(cfg, total_steps=10)
    batch = synthetic_batch(cfg.model)
    trainer.train_steps(iter([batch]), 1)
    good = _snapshot(trainer)
    # poison a frozen weight: every loss from here on is NaN
    scale = trainer.frozen["language_model"]["norm"]["scale"]
    scale.set_value(scale.get_value() * np.nan)
    with pytest.raises(TrainingError, match="non-finite loss/gradients at step 2"):
        trainer.train_steps(iter([dict(batch, example_ids=np.array(["a", "b", "c", "d"]))]), 1)
    assert trainer.step == 1
    after = {k: v for k, v in _snapshot(trainer).items() if ".lora_" in k}
    assert all(np.array_equal(good[k], after[k]) for k in after)


MESH_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys
    sys.path.insert(0, "tests")
    from test_train import synthetic_batch
    from g4v_jax.config import load_config
    from g4v_jax.train import build_trainer

    results = {}
    for mesh in ["single", "dp8", "fsdp8", "fsdp_tp"]:
        # stage 2 keeps the compile small; the video path's sharding is covered by test_sharding.py
        cfg = load_config("tiny", ["train.stage=stage2", "train.global_batch_size=8", "train.learning_rate=1e-2",
                                   "train.warmup_ratio=0"])
        cfg = dataclasses.replace(cfg, mesh=load_config({"mesh": f"mesh/{mesh}.yaml"}).mesh)
        trainer = build_trainer(cfg, total_steps=10)
        batches = [synthetic_batch(cfg.model, batch=8, seed=i) for i in range(3)]
        results[mesh] = [m["loss"] for m in trainer.train_steps(iter(batches), 3)]
        print(mesh, dict(trainer.mesh.shape), results[mesh])
    print("RESULT", json.dumps(results))
    """
)


def test_same_losses_on_dp_fsdp_and_fsdp_tensor_meshes():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stdout)
    import json

    results = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for mesh in ("dp8", "fsdp8", "fsdp_tp"):
        np.testing.assert_allclose(results[mesh], results["single"], rtol=2e-5, err_msg=mesh)


def test_remat_policies_train_like_no_remat():
    """``model.remat`` full/dots recompute in the backward pass and give the same steps (it failed inside the
    trainer's grad + accumulation scan before: nnx.remat wrote state across traces)."""
    results = {}
    for remat in ("none", "full", "dots"):
        cfg = _cfg("train.stage=stage2", "train.learning_rate=1e-2", "model.lora.dropout=0.0", f"model.remat={remat}")
        trainer = build_trainer(cfg, total_steps=10)
        batch = synthetic_batch(cfg.model, videos=True)
        results[remat] = [(m["loss"], m["grad_norm"]) for m in trainer.train_steps(iter([batch] * 2), 2)]
    np.testing.assert_allclose(results["full"], results["none"], rtol=1e-5)
    np.testing.assert_allclose(results["dots"], results["none"], rtol=1e-5)


def test_bf16_base_trains_like_fp32():
    """bf16 weights and compute with fp32 adapters (the GPU setting): the stage-2 losses stay within 0.2% of fp32's
    over the first steps on the same weights and batch."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = _cfg("model.kind=llm", "train.stage=stage2", "train.learning_rate=1e-2", "model.lora.dropout=0.0",
                   f"model.param_dtype={dtype}", f"model.compute_dtype={dtype}", "model.scan_layers=true")
        trainer = build_trainer(cfg, total_steps=10)
        losses[dtype] = [m["loss"] for m in trainer.train_steps(iter([synthetic_batch(cfg.model)] * 4), 4)]
    print(losses)
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-3)
    assert losses["bfloat16"][-1] < losses["bfloat16"][0]
