"""``model.scan_layers``: the LLM's layers stacked and run under ``jax.lax.scan`` equal the unrolled loop — outputs,
the KV cache, training steps, LoRA merging, saved files and shardings."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from g4v_jax.config import load_config
from g4v_jax.inference.generate import SamplingConfig, generate
from g4v_jax.models.gpt4video import build_model, language_model
from g4v_jax.models.lora import merge, unmerge
from g4v_jax.sharding import make_mesh, state_shardings
from g4v_jax.weights import load, named_params, param_shapes, save_pretrained

TOL = 1e-5  # the two programs fuse differently: equal to fp32 rounding, not bit for bit


def _pair(*overrides):
    cfg = load_config("tiny", list(overrides))
    unrolled = build_model(cfg.model)
    scanned = build_model(dataclasses.replace(cfg.model, scan_layers=True))
    return unrolled, scanned


@nnx.jit
def _forward(model, ids, mask=None, cache=None, logits_at=None):
    return model(ids, attention_mask=mask, cache=cache, logits_at=logits_at)


def _ids(model, shape, seed=0):
    vocab = language_model(model).cfg.vocab_size
    return jnp.asarray(np.random.default_rng(seed).integers(3, vocab, shape), jnp.int32)


def test_same_parameters_under_the_same_names():
    a, b = _pair("model.kind=llm")
    assert isinstance(b.layers, nnx.Module) and not isinstance(b.layers, nnx.List)
    assert b.layers.self_attn.q_proj.kernel[...].shape[0] == a.cfg.num_layers
    assert param_shapes(a) == param_shapes(b)
    pa, pb = named_params(a), named_params(b)
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert "layers.1.self_attn.q_proj.lora_a" in pb


def test_forward_and_cache_equal_the_unrolled_loop():
    a, b = _pair("model.kind=llm")
    ids = _ids(a, (2, 11))
    mask = jnp.ones((2, 11), bool).at[0, :3].set(False)  # a left-padded row
    la, _ = _forward(a, ids, mask)
    lb, _ = _forward(b, ids, mask)
    assert float(jnp.abs(la - lb).max()) <= TOL
    # prefill then decode, one index for the batch, then per-row indices (the engine's form)
    ca, cb = a.init_cache(2, 24), b.init_cache(2, 24)
    la, ca = _forward(a, ids, mask, ca)
    lb, cb = _forward(b, ids, mask, cb)
    assert float(jnp.abs(la - lb).max()) <= TOL and float(jnp.abs(jnp.stack(ca.k) - cb.k).max()) <= TOL
    ca, cb = ca._replace(index=jnp.array([11, 7])), cb._replace(index=jnp.array([11, 7]))
    step = ids[:, :1]
    la, ca = _forward(a, step, None, ca, jnp.zeros((2,), jnp.int32))
    lb, cb = _forward(b, step, None, cb, jnp.zeros((2,), jnp.int32))
    assert float(jnp.abs(la - lb).max()) <= TOL and float(jnp.abs(jnp.stack(ca.v) - cb.v).max()) <= TOL
    assert np.array_equal(ca.index, cb.index) and np.array_equal(ca.valid, cb.valid)


def test_gpt4video_and_generation_equal_the_unrolled_loop():
    a, b = _pair()
    ids = np.array(_ids(a, (1, 6 + a.cfg.num_video_tokens)))
    ids[0, 2:2 + a.cfg.num_video_tokens] = -1
    s = a.cfg.vision.image_size
    videos = np.random.default_rng(1).integers(0, 256, (1, 1, a.cfg.num_frames, s, s, 3), dtype=np.uint8)
    batch = {"input_ids": ids, "attention_mask": np.ones(ids.shape, bool), "videos": videos,
             "frame_mask": np.ones((1, 1, a.cfg.num_frames), bool)}
    ta = generate(a, batch, SamplingConfig(max_new_tokens=6), eos_id=-1)
    tb = generate(b, batch, SamplingConfig(max_new_tokens=6), eos_id=-1)
    assert np.array_equal(ta.tokens, tb.tokens)
    assert float(np.abs(np.asarray(ta.logprobs) - np.asarray(tb.logprobs)).max()) <= TOL


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_training_steps_equal_the_unrolled_loop(remat):
    from tests.test_train import synthetic_batch

    from g4v_jax.train import build_trainer

    results = []
    for scan in (False, True):
        cfg = load_config("tiny", ["model.kind=llm", "train.stage=stage2", "train.global_batch_size=4",
                                   "train.learning_rate=1e-2", "train.warmup_ratio=0", "model.lora.dropout=0.0",
                                   f"model.remat={remat}", f"model.scan_layers={str(scan).lower()}"])
        trainer = build_trainer(cfg, total_steps=10)
        metrics = trainer.train_steps(iter([synthetic_batch(cfg.model)] * 3), 3)
        results.append(([(m["loss"], m["grad_norm"]) for m in metrics], named_params(trainer.model())))
    (m1, p1), (m2, p2) = results
    np.testing.assert_allclose(m1, m2, rtol=1e-5)
    # Adam divides by the gradients' own scale, so fp32-rounding differences in near-zero gradient entries show
    # up as differences of a small fraction of a step (lr = 1e-2 per step), not of 1e-5
    assert max(float(np.abs(p1[k] - p2[k]).max()) for k in p1) <= 0.05 * 1e-2


def test_dropout_is_drawn_per_layer_in_training():
    from tests.test_train import synthetic_batch

    from g4v_jax.train import build_trainer

    cfg = load_config("tiny", ["model.kind=llm", "train.stage=stage2", "train.global_batch_size=4",
                               "model.lora.dropout=0.5", "model.scan_layers=true", "train.learning_rate=1e-2"])
    trainer = build_trainer(cfg, total_steps=10)
    losses = [m["loss"] for m in trainer.train_steps(iter([synthetic_batch(cfg.model)] * 3), 3)]
    assert all(np.isfinite(losses))
    keys = [v for p, v in nnx.to_flat_state(trainer.rest) if isinstance(v, nnx.RngKey)]
    assert keys and keys[0].get_value().shape == (cfg.model.llm.num_layers,)


def test_merge_unmerge_and_files_are_layout_free(tmp_path):
    _, b = _pair("model.kind=llm")
    for p, v in nnx.to_flat_state(nnx.state(b, nnx.Param)):  # non-zero adapters, so that merging matters
        if p[-1] == "lora_b":
            v.set_value(0.1 * jnp.ones_like(v.get_value()))
    ids = _ids(b, (1, 9))
    before, _ = _forward(b, ids)
    merge(b)
    merged, _ = _forward(b, ids)
    assert float(jnp.abs(before - merged).max()) <= 1e-4
    save_pretrained(b, load_config("tiny", ["model.kind=llm", "model.scan_layers=true"]).model, tmp_path / "m")
    unmerge(b)
    # saved by a scanned model, loaded unrolled: the same weights, the same outputs
    unrolled = load(tmp_path / "m", ["model.scan_layers=false"])
    assert isinstance(unrolled.layers, nnx.List)
    pa, pb = named_params(unrolled), named_params(b)
    assert all(float(np.abs(pa[k] - pb[k]).max()) <= 1e-6 for k in pa)
    after, _ = _forward(unrolled, ids)
    assert float(jnp.abs(before - after).max()) <= 1e-4


def test_stacked_parameters_shard_with_a_layers_axis():
    _, b = _pair("model.kind=llm")
    mesh = make_mesh(load_config("tiny").mesh, jax.devices()[:1])
    shardings = state_shardings(nnx.state(b, nnx.Param), mesh)
    spec = shardings["layers"]["self_attn"]["q_proj"]["kernel"].get_value().spec
    assert len(spec) in (0, 3) and (len(spec) == 0 or spec[0] is None)
