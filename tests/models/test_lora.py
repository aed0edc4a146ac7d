"""LoRA adapters on the tiny LLaMA: identity at init, dtypes, dropout only in training, merge survives save/load."""

import numpy as np
import pytest
from flax import nnx

import g4v_jax
from g4v_jax.config import ConfigError, load_config
from g4v_jax.models.gpt4video import abstract_model, build_model
from g4v_jax.models.lora import LoRAParam, fresh_lora_arrays, lora_layers, merge, unmerge
from g4v_jax.weights import assign_params, named_params


@nnx.jit
def _logits(model, ids):
    return model(ids)[0]


def _llm(overrides=()):
    cfg = load_config("tiny", ["model.kind=llm", *overrides]).model
    return cfg, build_model(cfg, seed=0)


def _randomize_adapters(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in lora_layers(model):
        for p in (layer.lora_a, layer.lora_b):
            p[...] = 0.1 * rng.normal(size=p.shape).astype(np.float32)


IDS = np.random.default_rng(0).integers(3, 500, (2, 16))


def test_fresh_adapters_change_nothing():
    cfg, _ = _llm()
    _, plain = _llm(["model.lora.enabled=false"])
    # the same base weights with fresh adapters (PEFT-style A, B = 0) on top
    target = abstract_model(cfg)
    model = assign_params(target, {**named_params(plain), **fresh_lora_arrays(target)})
    np.testing.assert_array_equal(np.asarray(_logits(model, IDS)), np.asarray(_logits(plain, IDS)))
    assert len(lora_layers(model)) == 2 * cfg.llm.num_layers  # q_proj and v_proj per layer
    assert all(isinstance(layer.lora_b, LoRAParam) and not np.asarray(layer.lora_b[...]).any()
               for layer in lora_layers(model))


def test_bf16_base_with_fp32_adapters():
    all_targets = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
    _, model = _llm(["model.param_dtype=bfloat16", f"model.lora.targets={all_targets}"])
    q = model.layers[0].self_attn.q_proj
    assert str(q.kernel[...].dtype) == "bfloat16" and str(q.lora_a[...].dtype) == "float32"
    assert len(lora_layers(model)) == 7 * 2


def test_dropout_only_in_training():
    _, model = _llm()
    _randomize_adapters(model)
    a, b = np.asarray(model(IDS)[0]), np.asarray(model(IDS)[0])
    np.testing.assert_array_equal(a, b)  # eval mode (what build_model and g4v_jax.load return)
    model.train()
    assert np.abs(np.asarray(model(IDS)[0]) - np.asarray(model(IDS)[0])).max() > 1e-4
    model.eval()


def test_merge_unmerge_and_saving_a_merged_model(tmp_path):
    cfg, model = _llm()
    _randomize_adapters(model)
    ref = np.asarray(_logits(model, IDS))
    kernel = np.asarray(model.layers[0].self_attn.q_proj.kernel[...])
    merge(model)
    assert np.abs(np.asarray(_logits(model, IDS)) - ref).max() <= 1e-5
    g4v_jax.save_pretrained(model, g4v_jax.Config(model=cfg), tmp_path / "merged")
    loaded = g4v_jax.load(tmp_path / "merged")  # stored unmerged: adapters apply exactly once
    assert np.abs(np.asarray(_logits(loaded, IDS)) - ref).max() <= 1e-5
    unmerge(model)
    np.testing.assert_allclose(np.asarray(model.layers[0].self_attn.q_proj.kernel[...]), kernel, atol=1e-6)


def test_bad_lora_config():
    with pytest.raises(ConfigError, match="lora.targets \\['qkv'\\] unknown"):
        load_config("tiny", ["model.lora.targets=[qkv]"])
