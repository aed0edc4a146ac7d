"""Our LLaMA + LoRA -> HF merged checkpoint and PEFT adapter, checked against transformers and peft themselves (fp32,
CPU): logits, PEFT's own key names, merge_and_unload, tied embeddings and RoPE scaling, adapters back into our model,
the CLI end to end, and lora.merge/unmerge exactness."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import g4v_jax
from g4v_jax.convert.export_hf import export_merged_hf, export_peft_adapter, hf_llama_config, load_peft_adapter, main
from g4v_jax.convert.hf_llama import llama_config_from_hf, load_hf_llama
from g4v_jax.config import LlamaConfig as OurLlamaConfig
from g4v_jax.config import RopeScaling, load_config
from g4v_jax.models.gpt4video import build_model
from g4v_jax.models.lora import lora_layers, merge, unmerge
from g4v_jax.weights import named_params, read_safetensors

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# peft 0.21 calls a transformers 5 method that warns about its own deprecation
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
VOCAB = 96
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {
    "default": [],  # the GPT4Video release: q_proj, v_proj; r=16, alpha=16 (scaling 1)
    "all7": [f"model.lora.targets=[{','.join(ALL7)}]", "model.lora.rank=8", "model.lora.alpha=32"],  # scaling 4
}
HF_VARIANTS = {
    "untied": {},
    "tied": {"tie_word_embeddings": True},
    "llama3_rope": {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}},
}
IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 24))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tiny random HF LlamaForCausalLM checkpoints (save_pretrained), one per variant."""
    out = {}
    for i, (name, overrides) in enumerate(HF_VARIANTS.items()):
        torch.manual_seed(i)
        kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
        model = LlamaForCausalLM(LlamaConfig(**{**kw, **overrides})).eval()
        with torch.no_grad():  # RMSNorm weights away from 1 so that a norm mix-up shows
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.add_(0.1 * torch.randn_like(p))
        path = tmp_path_factory.mktemp(f"hf_{name}")
        model.save_pretrained(path)
        out[name] = path
    return out


def _hf(path):
    return LlamaForCausalLM.from_pretrained(path).eval()


def _hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids))).logits.float().numpy()


def _ours(path, lora="default"):
    cfg, model = load_hf_llama(path, LORA[lora])
    model.eval()  # LoRA dropout off
    return cfg, model


def _logits(model, ids=IDS):
    return np.asarray(model(ids)[0])


def _randomize_lora(model, seed=0):
    """Non-zero A and B everywhere, large enough that the adapters change the logits by O(1)."""
    rng = np.random.default_rng(seed)
    for layer in lora_layers(model):
        for var in (layer.lora_a, layer.lora_b):
            var[...] = rng.normal(0.0, 0.2, var[...].shape).astype(np.float32)
    return model


def _diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _peft_config(lora):
    if lora == "all7":
        return peft.LoraConfig(r=8, lora_alpha=32, target_modules=ALL7, lora_dropout=0.1, task_type="CAUSAL_LM")
    return peft.LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.1,
                           task_type="CAUSAL_LM")


def test_fresh_adapters_leave_hf_logits(hf_dirs, lora="all7"):
    _, ours = _ours(hf_dirs["untied"], lora)
    assert all(not np.asarray(layer.lora_b[...]).any() for layer in lora_layers(ours))
    diff = _diff(_logits(ours), _hf_logits(_hf(hf_dirs["untied"])))
    print(f"fresh adapters ({lora}) vs HF: max|diff| {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("lora", ["default", "all7"])
def test_adapter_and_merged_exports_match_peft_and_hf(hf_dirs, tmp_path, lora):
    src = hf_dirs["untied"]
    cfg, ours = _ours(src, lora)
    _randomize_lora(ours)
    ref = _logits(ours)
    assert _diff(ref, _hf_logits(_hf(src))) > 1e-1  # the adapters matter: the comparisons below are not vacuous
    before = {k: np.asarray(v).copy() for k, v in named_params(ours).items()}

    adapter = export_peft_adapter(ours, tmp_path / "adapter")
    merged = export_merged_hf(ours, tmp_path / "merged")

    # PEFT's own names and shapes, from a real PeftModel.save_pretrained with the same LoraConfig
    peft.get_peft_model(_hf(src), _peft_config(lora)).save_pretrained(tmp_path / "real_peft")
    real = read_safetensors(tmp_path / "real_peft" / "adapter_model.safetensors")
    mine = read_safetensors(adapter / "adapter_model.safetensors")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in real.items()}
    real_cfg = json.loads((tmp_path / "real_peft" / "adapter_config.json").read_text())
    mine_cfg = json.loads((adapter / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "fan_in_fan_out", "use_dora",
                "use_rslora"):
        assert mine_cfg[key] == real_cfg[key], key
    assert sorted(mine_cfg["target_modules"]) == sorted(real_cfg["target_modules"])

    peft_model = peft.PeftModel.from_pretrained(_hf(src), adapter).eval()
    d_peft = _diff(_hf_logits(peft_model), ref)
    hf_merged = _hf(merged)
    d_merged = _diff(_hf_logits(hf_merged), ref)
    d_unload = _diff(_hf_logits(peft_model.merge_and_unload()), _hf_logits(hf_merged))
    print(f"[{lora}] PEFT adapter vs ours {d_peft:.2e}; merged HF vs ours {d_merged:.2e}; "
          f"PEFT merge_and_unload vs merged HF {d_unload:.2e}")
    assert d_peft <= 1e-4 and d_merged <= 1e-4 and d_unload <= 1e-4

    assert llama_config_from_hf(json.loads((merged / "config.json").read_text())) == cfg.llm
    # exporting does not touch the model
    assert not any(layer.merged for layer in lora_layers(ours))
    assert all(np.array_equal(before[k], np.asarray(v)) for k, v in named_params(ours).items())


@pytest.mark.parametrize("variant", ["tied", "llama3_rope"])
def test_merged_export_of_tied_and_rope_scaled_models(hf_dirs, tmp_path, variant):
    cfg, ours = _ours(hf_dirs[variant], "all7")
    _randomize_lora(ours)
    merged = export_merged_hf(ours, tmp_path / "merged")
    hf_cfg = json.loads((merged / "config.json").read_text())
    assert llama_config_from_hf(hf_cfg) == cfg.llm
    hf_merged = _hf(merged)
    diff = _diff(_hf_logits(hf_merged), _logits(ours))
    print(f"[{variant}] merged HF vs ours: max|diff| {diff:.2e}")
    assert diff <= 1e-4
    if variant == "tied":
        assert "lm_head.weight" not in read_safetensors(merged / "model.safetensors")
        assert hf_merged.lm_head.weight.data_ptr() == hf_merged.model.embed_tokens.weight.data_ptr()
    else:
        assert hf_cfg["rope_scaling"]["rope_type"] == HF_VARIANTS[variant]["rope_scaling"]["rope_type"]


@pytest.mark.parametrize("rope", [RopeScaling(), RopeScaling("linear", factor=2.0),
                                  RopeScaling("llama3", factor=8.0, original_max_position_embeddings=16)])
def test_config_json_round_trips_and_transformers_reads_it(tmp_path, rope):
    ours = OurLlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=32, rope_theta=5e5, rope_scaling=rope, tie_word_embeddings=True,
                          bos_token_id=3, eos_token_id=4, pad_token_id=5, max_position_embeddings=64)
    hf_json = hf_llama_config(ours)
    assert llama_config_from_hf(hf_json) == ours
    (tmp_path / "config.json").write_text(json.dumps(hf_json))
    hf = LlamaConfig.from_pretrained(tmp_path)
    assert (hf.head_dim, hf.num_key_value_heads, hf.tie_word_embeddings, hf.pad_token_id) == (32, 2, True, 5)
    assert hf.rope_parameters["rope_type"] == rope.rope_type and hf.rope_parameters["rope_theta"] == 5e5
    if rope.rope_type != "default":
        assert hf.rope_parameters["factor"] == rope.factor


def test_gpt4video_language_model_exports(tmp_path):
    """A whole GPT4Video: its ``language_model`` goes out; the base without adapters + the adapter equal it too."""
    model = build_model(load_config("tiny").model)
    _randomize_lora(model)
    ids = IDS * 5  # the tiny GPT4Video's vocabulary is 512
    ref = _logits(model.language_model, ids)
    merged = export_merged_hf(model, tmp_path / "merged")
    base = export_merged_hf(model, tmp_path / "base", merge=False)
    adapter = export_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    d_merged = _diff(_hf_logits(_hf(merged), ids), ref)
    d_peft = _diff(_hf_logits(peft.PeftModel.from_pretrained(_hf(base), adapter).eval(), ids), ref)
    print(f"GPT4Video LLM: merged HF vs ours {d_merged:.2e}; base + PEFT adapter vs ours {d_peft:.2e}")
    assert d_merged <= 1e-4 and d_peft <= 1e-4

    fresh = build_model(load_config("tiny").model, seed=1)
    load_peft_adapter(fresh, adapter)
    got, want = named_params(fresh.language_model), named_params(model.language_model)
    assert all(np.array_equal(got[k], want[k]) for k in want if ".lora_" in k)


def test_load_peft_adapter_round_trip_and_real_peft_adapter(hf_dirs, tmp_path):
    src = hf_dirs["untied"]
    _, ours = _ours(src, "all7")
    _randomize_lora(ours)
    adapter = export_peft_adapter(ours, tmp_path / "adapter")
    _, fresh = _ours(src, "all7")
    load_peft_adapter(fresh, adapter)
    want, got = named_params(ours), named_params(fresh)
    lora_keys = [k for k in want if ".lora_" in k]
    assert len(lora_keys) == 2 * 7 * 2
    assert all(np.array_equal(np.asarray(got[k]), np.asarray(want[k])) for k in lora_keys)

    # an adapter trained with PEFT itself (random A and B), read into our model
    real = peft.get_peft_model(_hf(src), peft.LoraConfig(r=8, lora_alpha=32, target_modules=ALL7,
                                                         init_lora_weights=False, task_type="CAUSAL_LM"))
    real.save_pretrained(tmp_path / "real_peft")
    _, mine = _ours(src, "all7")
    load_peft_adapter(mine, tmp_path / "real_peft")
    diff = _diff(_logits(mine), _hf_logits(real.eval()))
    print(f"PEFT-trained adapter loaded into ours vs PEFT: max|diff| {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("overrides, message", [
    (["model.lora.rank=4", "model.lora.alpha=16"], r"adapter r=8 but the model's LoRA rank is 4"),
    ([f"model.lora.targets=[{','.join(ALL7)}]", "model.lora.rank=8", "model.lora.alpha=8"],
     r"lora_alpha=32 .*\(model.lora.alpha=32\)"),
    (["model.lora.rank=8", "model.lora.alpha=32"], r"target_modules=.*model has adapters on \['q_proj', 'v_proj'\]"),
])
def test_mismatching_adapter_is_a_clear_error(hf_dirs, tmp_path, overrides, message):
    src = hf_dirs["untied"]
    _, ours = _ours(src, "all7")
    adapter = export_peft_adapter(ours, tmp_path / "adapter")
    _, other = load_hf_llama(src, overrides)
    with pytest.raises(ValueError, match=message):
        load_peft_adapter(other, adapter)


def test_cli_end_to_end(hf_dirs, tmp_path):
    src = hf_dirs["untied"]
    cfg, ours = _ours(src, "all7")
    _randomize_lora(ours)
    ref = _logits(ours)
    g4v_jax.save_pretrained(ours, g4v_jax.Config(model=cfg), tmp_path / "ours")
    (tmp_path / "ours" / "tokenizer_config.json").write_text("{}")  # tokenizer files travel into merged/ and base/
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "convert.export_hf", str(tmp_path / "ours"), str(out), "--with-base"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)
    assert "LlamaForCausalLM.from_pretrained" in proc.stdout and "PeftModel.from_pretrained" in proc.stdout
    assert (out / "merged" / "tokenizer_config.json").is_file() and (out / "base" / "tokenizer_config.json").is_file()
    d_merged = _diff(_hf_logits(_hf(out / "merged")), ref)
    d_peft = _diff(_hf_logits(peft.PeftModel.from_pretrained(_hf(out / "base"), out / "adapter").eval()), ref)
    d_base = _diff(_hf_logits(_hf(out / "base")), _hf_logits(_hf(src)))
    print(f"CLI: merged {d_merged:.2e}, base + adapter {d_peft:.2e}, base vs original HF {d_base:.2e}")
    assert d_merged <= 1e-4 and d_peft <= 1e-4 and d_base <= 1e-5

    main([str(tmp_path / "ours"), str(tmp_path / "only"), "--adapter-only"])
    assert sorted(p.name for p in (tmp_path / "only").iterdir()) == ["adapter"]
    # a model trained with scanned layers (model.scan_layers=true) exports the same adapter
    g4v_jax.save_pretrained(ours, g4v_jax.Config(model=dataclasses.replace(cfg, scan_layers=True)),
                            tmp_path / "scanned")
    main([str(tmp_path / "scanned"), str(tmp_path / "scanned_out"), "--adapter-only"])
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "scanned_out" / adapter).read_bytes() == (tmp_path / "only" / adapter).read_bytes()
    with pytest.raises(ValueError, match="scan_layers=false"):
        export_peft_adapter(g4v_jax.load(tmp_path / "scanned"), tmp_path / "nope")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "ours"), str(tmp_path / "bad"), "--adapter-only", "--merged-only"])


def test_lora_merge_unmerge_exactness(hf_dirs, tmp_path):
    _, ours = _ours(hf_dirs["untied"], "all7")
    _randomize_lora(ours)
    ref = _logits(ours)
    kernels = {k: np.asarray(v).copy() for k, v in named_params(ours).items() if k.endswith(".kernel")}
    export_merged_hf(ours, tmp_path / "before")

    merge(ours)
    assert all(layer.merged for layer in lora_layers(ours))
    d_merge = _diff(_logits(ours), ref)
    # the export knows a merged model's kernels already hold the adapters
    export_merged_hf(ours, tmp_path / "after")
    export_merged_hf(ours, tmp_path / "after_base", merge=False)
    a = read_safetensors(tmp_path / "before" / "model.safetensors")
    b = read_safetensors(tmp_path / "after" / "model.safetensors")
    d_export = max(_diff(a[k], b[k]) for k in a)

    unmerge(ours)
    assert not any(layer.merged for layer in lora_layers(ours))
    after = named_params(ours)
    d_unmerge = max(_diff(after[k], v) for k, v in kernels.items())
    base = read_safetensors(tmp_path / "after_base" / "model.safetensors")
    d_base = max(_diff(base[f"model.{k[:-len('.kernel')]}.weight"].T, v) for k, v in kernels.items())
    d_back = _diff(_logits(ours), ref)
    print(f"merge: logits {d_merge:.2e}; unmerge: kernels {d_unmerge:.2e}, logits {d_back:.2e}; "
          f"merged export before/after merge {d_export:.2e}; base export of a merged model {d_base:.2e}")
    assert d_merge <= 1e-5 and d_unmerge <= 1e-6 and d_back <= 1e-5 and d_export <= 1e-6 and d_base <= 1e-6
