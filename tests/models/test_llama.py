"""LLaMA vs HF transformers LlamaForCausalLM on the same weights (fp32, CPU); KV cache; padding; bad checkpoints."""

import json

import numpy as np
import pytest
from flax import nnx

from g4v_jax.convert.hf_llama import load_hf_llama, permute_meta_qk
from g4v_jax.models.llama import init_cache
from g4v_jax.weights import CheckpointMismatchError

torch = pytest.importorskip("torch")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 96


@nnx.jit
def _forward(model, ids, mask=None, cache=None):
    # one compiled program per shape; eager NNX would compile every op separately (seconds per new shape on CPU)
    return model(ids, attention_mask=mask, cache=cache)


def _save_hf(tmp_path, name, seed=0, **overrides):
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
    kw.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():  # RMSNorm weights away from 1 so a norm mix-up shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / name)
    return tmp_path / name, model


def _hf_logits(model, ids, mask=None):
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(ids)),
                    attention_mask=None if mask is None else torch.from_numpy(np.asarray(mask).astype(np.int64)))
    return out.logits.numpy()


@pytest.mark.parametrize("variant, overrides", [
    ("gqa", {}),
    ("llama3_rope", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    ("linear_rope_mha", {"num_key_value_heads": 4, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                         "rope_theta": 500000.0}),
    ("tied", {"tie_word_embeddings": True}),
])
def test_logits_match_hf(tmp_path, variant, overrides):
    path, hf = _save_hf(tmp_path, variant, **overrides)
    cfg, ours = load_hf_llama(path)
    ours.eval()
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 40))
    logits, _ = ours(ids)
    diff = np.abs(np.asarray(logits) - _hf_logits(hf, ids)).max()
    print(f"LLaMA parity ({variant}): max|diff| {diff:.2e}")
    assert diff <= 1e-4
    if variant == "tied":
        assert ours.lm_head is None


def test_kv_cache_decoding_equals_full_forward(tmp_path):
    path, _ = _save_hf(tmp_path, "m")
    cfg, ours = load_hf_llama(path)
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 12))
    full, _ = _forward(ours, ids)
    cache = init_cache(cfg.llm, batch=2, max_length=16)
    prefill, cache = _forward(ours, ids[:, :8], cache=cache)
    steps = [prefill]
    for t in range(8, 12):  # one token at a time
        step, cache = _forward(ours, ids[:, t:t + 1], cache=cache)
        steps.append(step)
    diff = np.abs(np.concatenate([np.asarray(s) for s in steps], axis=1) - np.asarray(full)).max()
    print(f"KV cache prefill(8) + 4 single steps vs full forward: {diff:.2e}")
    assert diff <= 1e-5
    assert int(cache.index) == 12


def test_left_and_right_padding_match_unpadded_rows(tmp_path):
    path, hf = _save_hf(tmp_path, "m")
    _, ours = load_hf_llama(path)
    rng = np.random.default_rng(2)
    short, long = rng.integers(3, VOCAB, (1, 5)), rng.integers(3, VOCAB, (1, 9))
    alone = np.asarray(_forward(ours, np.concatenate([short, short]))[0])[0]  # batch 2 keeps one compiled shape
    long_alone = np.asarray(_forward(ours, np.concatenate([long, long]))[0])[0]
    for side in ("left", "right"):
        pad = np.zeros((1, 4), np.int64)
        row = np.concatenate([pad, short], 1) if side == "left" else np.concatenate([short, pad], 1)
        mask = (np.arange(9) >= 4) if side == "left" else (np.arange(9) < 5)
        logits = np.asarray(_forward(ours, np.concatenate([row, long]), np.stack([mask, np.ones(9, bool)]))[0])
        got = logits[0, 4:] if side == "left" else logits[0, :5]
        assert np.abs(got - alone).max() <= 1e-5, side
        np.testing.assert_allclose(logits[1], long_alone, atol=1e-5)
    # HF agrees on the left-padded row (its position ids from the mask, as generate() computes them)
    row = np.concatenate([np.zeros((1, 4), np.int64), short], 1)
    mask = (np.arange(9) >= 4)
    with torch.no_grad():
        ref = hf(torch.from_numpy(row), attention_mask=torch.from_numpy(mask[None].astype(np.int64)),
                 position_ids=torch.from_numpy(np.clip(np.cumsum(mask) - 1, 0, None)[None])).logits.numpy()
    assert np.abs(ref[0, 4:] - alone).max() <= 1e-4


def test_prompt_longer_than_context_is_a_clear_error(tmp_path):
    path, _ = _save_hf(tmp_path, "m", max_position_embeddings=32)
    _, ours = load_hf_llama(path)
    with pytest.raises(ValueError, match="sequence of 40 tokens exceeds the model's context of 32"):
        ours(np.zeros((1, 40), np.int64))


def test_meta_permutation_is_the_inverse_of_hf_conversion():
    """HF's convert_llama_weights_to_hf permutes Meta's interleaved q/k rows to rotate-half order; ours undoes the
    interleaving the same way (checked on HF's own formula)."""
    heads, dim = 4, 32
    w_meta = np.random.default_rng(0).normal(size=(dim, dim)).astype(np.float32)
    hf_formula = w_meta.reshape(heads, dim // heads // 2, 2, dim).transpose(0, 2, 1, 3).reshape(dim, dim)
    np.testing.assert_array_equal(permute_meta_qk(w_meta, heads), hf_formula)
    # rotate-half pairs (i, i + d/2) are Meta's adjacent pairs (2i, 2i + 1)
    half = dim // heads // 2
    np.testing.assert_array_equal(permute_meta_qk(w_meta, heads)[half], w_meta[1])


def test_missing_layer_wrong_shape_and_vocab_are_one_clear_message(tmp_path):
    path, _ = _save_hf(tmp_path, "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(num_hidden_layers=3, vocab_size=VOCAB + 4, intermediate_size=100)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError) as e:
        load_hf_llama(path)
    msg = str(e.value)
    assert "missing keys" in msg and "model.layers.2.self_attn.q_proj.weight" in msg
    assert f"model.embed_tokens.weight: checkpoint ({VOCAB}, 64), model needs ({VOCAB + 4}, 64)" in msg
    assert "model.layers.0.mlp.up_proj.weight: checkpoint (96, 64), model needs (100, 64)" in msg


def test_not_a_llama_config(tmp_path):
    path, _ = _save_hf(tmp_path, "m")
    (path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match="model_type='mistral', expected 'llama'"):
        load_hf_llama(path)


def test_packed_row_equals_its_sequences_alone(tmp_path):
    """Segment ids keep packed sequences apart: each segment's logits are those of the sequence on its own row
    (positions restarting at 0), and the padded tail changes nothing."""
    path, _ = _save_hf(tmp_path, "m")
    _, ours = load_hf_llama(path)
    rng = np.random.default_rng(3)
    a, b = rng.integers(3, VOCAB, (1, 6)), rng.integers(3, VOCAB, (1, 5))

    @nnx.jit
    def packed_forward(model, ids, mask, positions, segment_ids):
        return model(ids, attention_mask=mask, positions=positions, segment_ids=segment_ids)

    row = np.concatenate([a, b, np.zeros((1, 3), np.int64)], 1)
    segments = np.array([[1] * 6 + [2] * 5 + [0] * 3])
    positions = np.array([list(range(6)) + list(range(5)) + [0] * 3])
    logits = np.asarray(packed_forward(ours, row, segments > 0, positions, segments)[0])[0]
    alone_a = np.asarray(_forward(ours, np.concatenate([a, a]))[0])[0]
    alone_b = np.asarray(_forward(ours, np.concatenate([b, b]))[0])[0]
    assert np.abs(logits[:6] - alone_a).max() <= 1e-5
    assert np.abs(logits[6:11] - alone_b).max() <= 1e-5
    unmasked = np.asarray(packed_forward(ours, row, segments > 0, positions, np.minimum(segments, 1))[0])[0]
    assert np.abs(unmasked[6:11] - alone_b).max() > 1e-3  # without segments b would see a: the mask does the work
    with pytest.raises(ValueError, match="not for decoding"):
        ours(row, segment_ids=segments, cache=init_cache(ours.cfg, 1, 16))
