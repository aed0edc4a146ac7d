"""`python -m g4v_jax.train` end to end on a tiny real dataset: stage 1 on videos, stage 2 from its result,
kill-and-resume through the CLI entry point, and what the user sees (metrics, TensorBoard, curve, errors)."""

import json

import numpy as np
import pytest

import g4v_jax
from g4v_jax.config import load_config
from g4v_jax.train.metrics import read_metrics
from g4v_jax.train import fit, main


@pytest.fixture(scope="module")
def dataset(train_data):
    return train_data


def _cfg(dataset, out, *overrides):
    return load_config("tiny", [
        f"data.train_manifest={dataset / 'train.jsonl'}", "data.seq_len=160", f"train.tokenizer={dataset / 'tokenizer'}",
        f"train.output_dir={out}", "train.global_batch_size=4", "train.epochs=2", "train.save_every=2",
        "train.warmup_ratio=0", "model.llm.vocab_size=512", *overrides])


def test_stage1_then_stage2_and_what_the_user_sees(dataset, tmp_path):
    s1 = fit(_cfg(dataset, tmp_path / "s1", "train.stage=stage1", "train.learning_rate=3e-3"), progress=False)
    assert s1["steps"] == 4  # 8 examples / 4 per batch x 2 epochs
    rows = read_metrics(tmp_path / "s1" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"loss", "tokens_per_s", "step_seconds", "learning_rate", "grad_norm"} <= set(r) for r in rows)
    assert (tmp_path / "s1" / "loss_curve.png").stat().st_size > 1000
    assert list((tmp_path / "s1" / "tensorboard").glob("events.out.tfevents.*"))
    model = g4v_jax.load(tmp_path / "s1" / "final")
    assert type(model).__name__ == "GPT4Video"

    s2 = fit(_cfg(dataset, tmp_path / "s2", "train.stage=stage2", "train.learning_rate=3e-2",
                  f"train.init_from={tmp_path / 's1' / 'final'}"), progress=False)
    stage2 = g4v_jax.load(s2["final"])
    before = g4v_jax.weights.named_params(model)
    after = g4v_jax.weights.named_params(stage2)
    changed = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
    assert changed and all(".lora_" in k for k in changed)  # stage 2 moved only the adapters
    print("stage1 losses", [round(r["loss"], 4) for r in rows])
    print("stage2 losses", [round(r["loss"], 4) for r in read_metrics(tmp_path / "s2" / "metrics.jsonl")])


def test_killed_run_resumes_with_the_same_loss_curve(dataset, tmp_path):
    overrides = ("train.stage=stage2", "train.learning_rate=3e-2")
    fit(_cfg(dataset, tmp_path / "straight", *overrides), progress=False)
    partial = fit(_cfg(dataset, tmp_path / "resumed", *overrides), progress=False, stop_after=2)  # "killed"
    assert partial["steps"] == 2 and not (tmp_path / "resumed" / "final").exists()
    fit(_cfg(dataset, tmp_path / "resumed", *overrides), progress=False)
    a = [r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")]
    print(f"uninterrupted {a}\nresumed       {b}")
    assert a == b and len(a) == 4


def test_cli_errors_are_messages(dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--config", "tiny", f"train.tokenizer={dataset / 'tokenizer'}",
              f"data.train_manifest={tmp_path / 'missing.jsonl'}", f"train.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "g4v_jax.train: error:" in err and "missing.jsonl" in err
    with pytest.raises(SystemExit) as e:
        main(["--config", "tiny", "train.stage=stage3"])
    assert "train.stage must be stage1, stage2 or full" in capsys.readouterr().err


def test_vision_cache_trains_like_decoding_frames(dataset, tmp_path):
    """Stage 1 from precomputed vision features gives the loss curve of stage 1 on decoded frames."""
    from g4v_jax.data.feature_cache import build_feature_cache
    from g4v_jax.data.manifest import read_manifest
    from g4v_jax.models.gpt4video import build_model

    base = tmp_path / "base"
    cfg = _cfg(dataset, tmp_path / "frames", "train.stage=stage1", "train.learning_rate=3e-3")
    g4v_jax.save_pretrained(build_model(cfg.model, seed=0), cfg, base)
    from g4v_jax.data.tokenizer import copy_tokenizer_files

    copy_tokenizer_files(dataset / "tokenizer", base)
    model = g4v_jax.load(base)
    counts = build_feature_cache(model.vision_model, read_manifest(dataset / "train.jsonl"), dataset,
                                 tmp_path / "cache", num_frames=cfg.model.num_frames,
                                 image_size=cfg.model.vision.image_size, progress=False)
    assert counts == {"videos": 8, "computed": 8, "unreadable": 0}
    common = ("train.stage=stage1", "train.learning_rate=3e-3", f"train.init_from={base}", "train.max_steps=2")
    fit(_cfg(dataset, tmp_path / "frames", *common), progress=False)
    fit(_cfg(dataset, tmp_path / "cached", *common, f"data.vision_cache={tmp_path / 'cache'}"), progress=False)
    a = [r["loss"] for r in read_metrics(tmp_path / "frames" / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(tmp_path / "cached" / "metrics.jsonl")]
    print(f"stage 1 on frames {a}\nstage 1 on cache  {b}")
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_init_from_with_another_architecture_is_refused_before_training(dataset, tmp_path):
    """The final checkpoint is written with the run's model section: a run whose model section disagrees with the
    init_from checkpoint's would save weights that its own config.yaml cannot load, so it must not start."""
    from g4v_jax.models.gpt4video import build_model
    from g4v_jax.train import TrainingError

    cfg = _cfg(dataset, tmp_path / "base_run", "train.stage=stage1")
    g4v_jax.save_pretrained(build_model(cfg.model, seed=0), cfg, tmp_path / "base")
    with pytest.raises(TrainingError) as e:
        fit(_cfg(dataset, tmp_path / "run", "train.stage=stage1", f"train.init_from={tmp_path / 'base'}",
                 "model.vision.temporal_adapter=false", "model.lora.rank=8"), progress=False)
    message = str(e.value)
    assert "model.vision.temporal_adapter: True in" in message and "False in this run" in message
    assert "model.lora.rank" in message
    assert not (tmp_path / "run" / "final").exists()


def test_stage2_may_lay_out_new_adapters_over_untrained_ones(dataset, tmp_path):
    """Stage 2's LoRA (rank, alpha, targets) is its own choice: over a directory whose adapters were never trained
    (a stage-1 checkpoint) it starts from fresh adapters of its layout and every other weight of the directory; over
    trained adapters it stops rather than drop them."""
    from g4v_jax.models.gpt4video import build_model
    from g4v_jax.train import TrainingError
    from g4v_jax.weights import assign_params, named_params

    cfg = _cfg(dataset, tmp_path / "base_run", "train.stage=stage1")
    base = build_model(cfg.model, seed=3)
    g4v_jax.save_pretrained(base, cfg, tmp_path / "base")
    layout = ("model.lora.rank=2", "model.lora.alpha=2", "model.lora.targets=[v_proj]")
    s2 = fit(_cfg(dataset, tmp_path / "s2", "train.stage=stage2", "train.learning_rate=3e-2",
                  f"train.init_from={tmp_path / 'base'}", "train.max_steps=2", *layout), progress=False)
    tuned = g4v_jax.load(s2["final"])  # its config.yaml describes the new layout
    before, after = named_params(base), named_params(tuned)
    adapters = {k for k in after if ".lora_" in k}
    assert adapters and all(k.endswith(("v_proj.lora_a", "v_proj.lora_b")) for k in adapters)
    assert all(after[k].shape[-1 if k.endswith("lora_a") else 0] == 2 for k in adapters)
    assert any(np.any(np.asarray(after[k])) for k in adapters if k.endswith("lora_b"))  # stage 2 trained them
    for k in set(after) - adapters:  # the rest is the directory's, untouched
        np.testing.assert_array_equal(np.asarray(after[k]), np.asarray(before[k]), err_msg=k)

    trained = {k: (np.full(w.shape, 0.01, np.float32) if k.endswith(".lora_b") else np.asarray(w))
               for k, w in before.items()}
    g4v_jax.save_pretrained(assign_params(base, trained), cfg, tmp_path / "trained")
    with pytest.raises(TrainingError, match=r"(?s)has trained LoRA adapters .*model\.lora\.rank: 4 in .*, 2 in this run"):
        fit(_cfg(dataset, tmp_path / "refused", "train.stage=stage2", f"train.init_from={tmp_path / 'trained'}",
                 *layout), progress=False)
    assert not (tmp_path / "refused" / "final").exists()
