"""HF LLaMA checkpoint layouts -> our LLaMA; the CLI end to end through g4v_jax.load."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import g4v_jax
from g4v_jax.convert.hf_llama import load_hf_llama
from g4v_jax.models.llama import LlamaForCausalLM
from g4v_jax.weights import named_params

torch = pytest.importorskip("torch")
from transformers import LlamaConfig, LlamaForCausalLM as HFLlama  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return HFLlama(cfg).eval()


def _base_params(model):
    return {k: np.asarray(v) for k, v in named_params(model).items() if ".lora_" not in k}


def test_sharded_bin_and_bf16_layouts(hf_llama, tmp_path):
    hf_llama.save_pretrained(tmp_path / "single")
    hf_llama.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    (tmp_path / "bin").mkdir()
    torch.save(hf_llama.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    _, ref = load_hf_llama(tmp_path / "single")
    for layout in ("sharded", "bin"):
        _, m = load_hf_llama(tmp_path / layout)
        a, b = _base_params(m), _base_params(ref)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), layout
    import copy

    copy.deepcopy(hf_llama).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    cfg, m = load_hf_llama(tmp_path / "bf16", ["model.param_dtype=bfloat16"])
    kernel = m.layers[0].self_attn.q_proj.kernel[...]
    assert str(kernel.dtype) == "bfloat16"
    assert str(m.layers[0].self_attn.q_proj.lora_a[...].dtype) == "float32"  # adapters stay fp32


def test_cli_then_load(hf_llama, tmp_path):
    from g4v_jax.data.tokenizer import build_bpe_tokenizer, load_tokenizer

    hf_llama.save_pretrained(tmp_path / "src")
    tok = build_bpe_tokenizer(["a tiny corpus for a tiny tokenizer"] * 4, tmp_path / "src", vocab_size=300)
    proc = subprocess.run([sys.executable, "-m", "convert.hf_llama", str(tmp_path / "src"), str(tmp_path / "dst"),
                           "model.lora.rank=8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "g4v_jax.load(" in proc.stdout and "tokenizer: tokenizer.json" in proc.stdout
    assert load_tokenizer(tmp_path / "dst").encode("a tiny corpus") == tok.encode("a tiny corpus")
    model = g4v_jax.load(tmp_path / "dst")
    assert isinstance(model, LlamaForCausalLM)
    assert model.layers[0].self_attn.q_proj.lora_a[...].shape == (64, 8)
    ids = np.random.default_rng(0).integers(0, 96, (1, 10))
    with torch.no_grad():
        ref = hf_llama(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(np.asarray(model(ids)[0]) - ref).max() <= 1e-4
