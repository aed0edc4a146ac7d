"""The route from a CLIP and a LLaMA to a trained GPT4Video: tiny HF CLIP + tiny HF LLaMA -> convert.assemble ->
stage 1 (two steps) -> stage 2 (two steps) -> convert.export_hf -> transformers + PEFT give our logits."""

import numpy as np
import pytest

import g4v_jax
from g4v_jax.config import load_config
from g4v_jax.train import fit

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hf_llama_with_tokenizer(train_data, tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(train_data / "tokenizer")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("hf_llama")
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _train(dst, stage, init_from, train_data, out, lr):
    cfg = load_config(dst / "config.yaml", [
        f"train=train/{stage}.yaml", f"train.init_from={init_from}",
        f"data.train_manifest={train_data / 'train.jsonl'}",
        f"train.output_dir={out}", "train.max_steps=2", "train.global_batch_size=2", "data.seq_len=96",
        f"train.learning_rate={lr}", "train.warmup_ratio=0", "train.tensorboard=false", "train.plot=false",
        "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
    return fit(cfg, progress=False)


def test_clip_plus_llama_to_a_trained_gpt4video_and_back_to_peft(tiny_hf_clip_vision, hf_llama_with_tokenizer,
                                                                   train_data, tmp_path):
    import peft
    from transformers import LlamaForCausalLM

    from g4v_jax.convert.assemble import main
    from g4v_jax.convert.export_hf import main as export_main

    clip_dir, _ = tiny_hf_clip_vision
    dst = tmp_path / "g4v"
    main(["--vision", str(clip_dir), "--llm", str(hf_llama_with_tokenizer), str(dst),
          "model.abstractor.num_layers=1", "model.abstractor.num_query_tokens=8",
          "model.abstractor.num_temporal_tokens=8", "model.lora.targets=[q_proj, v_proj]", "model.lora.rank=4"])
    cfg = g4v_jax.weights.load_model_config(dst).model
    assert cfg.kind == "gpt4video" and cfg.abstractor.hidden_size == 32 and cfg.llm_hidden_size == 64
    assert (dst / "tokenizer.json").is_file() or (dst / "tokenizer_config.json").is_file()
    # the assembled LLM is the HF LLaMA, untouched (adapters start at B = 0)
    ids = np.array([[1, 17, 42, 99, 7, 3]])
    hf = LlamaForCausalLM.from_pretrained(hf_llama_with_tokenizer).eval()
    with torch.no_grad():
        hf_logits = hf(torch.from_numpy(ids)).logits.numpy()
    ours = g4v_jax.load(dst)
    np.testing.assert_allclose(np.asarray(ours.language_model(ids)[0]), hf_logits, atol=1e-4)

    s1 = _train(dst, "stage1", dst, train_data, tmp_path / "s1", 1e-3)
    assert s1["steps"] == 2
    s2 = _train(dst, "stage2", tmp_path / "s1" / "final", train_data, tmp_path / "s2", 1e-2)
    trained = g4v_jax.load(s2["final"])
    lora_b = [np.abs(np.asarray(v)).max() for k, v in g4v_jax.weights.named_params(trained).items() if "lora_b" in k]
    assert max(lora_b) > 0  # stage 2 moved the adapters, so the comparison below is not vacuous

    export_main([str(tmp_path / "s2" / "final"), str(tmp_path / "hf"), "--with-base"])
    base = LlamaForCausalLM.from_pretrained(tmp_path / "hf" / "base").eval()
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter").eval()
    with torch.no_grad():
        peft_logits = with_adapter(torch.from_numpy(ids)).logits.numpy()
    ours_logits = np.asarray(trained.language_model(ids)[0])
    np.testing.assert_allclose(peft_logits, ours_logits, atol=1e-4)
    assert np.abs(peft_logits - hf_logits).max() > 1e-3  # and they differ from the untrained LLaMA
