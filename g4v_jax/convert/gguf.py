"""GGUF (llama.cpp) LLaMA-architecture file -> g4v_jax.

    python -m convert.gguf FILE.gguf DST [key=value ...]

FILE is a GGUF file whose ``general.architecture`` is ``llama`` (LLaMA 1/2, SmolLM2, TinyLlama, ...). DST receives
the same ``kind: llm`` model directory as ``convert.hf_llama`` writes (``g4v_jax.load(DST)``), LoRA adapters fresh,
and the tokenizer the file carries.

- **Config** from the ``llama.*`` metadata (``gguf_hf_config``); a file without ``output.weight`` ties the head to
  the embedding, as llama.cpp does.
- **Tensors** are dequantised to float32 by the ``gguf`` package (``SUPPORTED_TYPES``: F32, F16, BF16, Q8_0, Q4_0,
  Q4_1, Q5_0, Q5_1 and the k-quants Q2_K-Q6_K); any other type stops the conversion naming the tensor and its type.
  Quantisation is not kept: the model computes what the dequantised weights compute, at 4-8x the file's size.
- **q/k rows**: llama.cpp's converter interleaves each head's RoPE pairs (Meta's order); they go back to the
  rotate-half order our RoPE uses (``hf_llama.permute_meta_qk``), with the KV heads' count for k.
- **Tokenizer**: transformers rebuilds it from GGUF's vocabulary, merges and special ids (and keeps its
  ``tokenizer.chat_template``); no other file is needed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from g4v_jax.config import Config
from g4v_jax.convert.common import converter_main
from g4v_jax.convert.hf_llama import build_llama, llama_config_from_hf, model_config_for_llm, permute_meta_qk
from g4v_jax.weights import save_pretrained

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
TOP_LEVEL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
PER_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


class GGUFError(ValueError):
    """A GGUF file this converter cannot read as a LLaMA: the message names the file and the field or tensor."""


def hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None for a name of no LLaMA tensor."""
    if gguf_name in TOP_LEVEL:
        return TOP_LEVEL[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in PER_LAYER:
        return f"model.layers.{parts[1]}.{PER_LAYER[parts[2]]}.{parts[3]}"
    return None


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` of ``path`` (memory-mapped); a missing or corrupt file is a ``GGUFError``."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading GGUF files needs the gguf package: pip install 'g4v_jax[torch]' or "
                          "pip install gguf") from e
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct errors or IndexError on a damaged file
        raise GGUFError(f"{path} is not a readable GGUF file: {e}") from None


def metadata(reader, path: str | Path) -> dict:
    """Every metadata field of ``reader`` as Python values, except the tokenizer's long arrays."""
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    out = {}
    for key, field in reader.fields.items():
        if key in skip:
            out[key] = len(field.data)
            continue
        try:
            out[key] = field.contents()
        except Exception as e:
            raise GGUFError(f"{path}: metadata field {key} cannot be read: {e}") from None
    return out


def gguf_hf_config(meta: Mapping, tensor_names: set[str], path: str | Path) -> dict:
    """An HF ``LlamaConfig`` dict from GGUF metadata (llama.cpp's key names)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files convert")

    def need(key: str):
        if key not in meta:
            raise GGUFError(f"{path}: metadata field {key} is missing")
        return meta[key]

    def uniform(key: str, value):
        if isinstance(value, list):  # some files give a per-layer list; ours has one value for all layers
            if len(set(value)) != 1:
                raise GGUFError(f"{path}: {key} differs between layers ({sorted(set(value))}); not supported")
            value = value[0]
        return int(value)

    heads = uniform("llama.attention.head_count", need("llama.attention.head_count"))
    kv_heads = uniform("llama.attention.head_count_kv", meta.get("llama.attention.head_count_kv", heads))
    hidden = int(need("llama.embedding_length"))
    head_dim = int(meta.get("llama.attention.key_length", meta.get("llama.rope.dimension_count", hidden // heads)))
    if int(meta.get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise GGUFError(f"{path}: partial rotary embeddings (llama.rope.dimension_count "
                        f"{meta['llama.rope.dimension_count']} of a head's {head_dim}) are not supported")
    scaling = meta.get("llama.rope.scaling.type", "none")
    rope_scaling = None
    if scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(need("llama.rope.scaling.factor"))}
    elif scaling != "none":
        raise GGUFError(f"{path}: llama.rope.scaling.type {scaling!r} is not supported (none or linear)")
    if "rope_freqs.weight" in tensor_names:
        raise GGUFError(f"{path}: holds rope_freqs.weight (Llama 3.1's frequency factors), which this converter "
                        "does not read; convert the HF checkpoint with convert.hf_llama instead")
    n_vocab = meta.get("llama.vocab_size", meta.get("tokenizer.ggml.tokens"))
    if n_vocab is None:
        raise GGUFError(f"{path}: neither llama.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
    return {
        "model_type": "llama", "vocab_size": int(n_vocab), "hidden_size": hidden,
        "intermediate_size": uniform("llama.feed_forward_length", need("llama.feed_forward_length")),
        "num_hidden_layers": int(need("llama.block_count")), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "rms_norm_eps": float(need("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)), "rope_scaling": rope_scaling,
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }


class GGUFTensors(Mapping):
    """A GGUF file's LLaMA tensors under HF's names, dequantised to float32 (q/k rows in rotate-half order) when
    read; tensors of no LLaMA weight are left out."""

    def __init__(self, reader, hf: Mapping, path: str | Path):
        self._path = path
        self._heads = {"q_proj": hf["num_attention_heads"], "k_proj": hf["num_key_value_heads"]}
        self._tensors = {}
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is not None:
                self._tensors[name] = t

    def __getitem__(self, key: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self._tensors[key]
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise GGUFError(f"{self._path}: tensor {t.name} is stored as {kind}, which this converter does not "
                            f"dequantise (supported: {', '.join(SUPPORTED_TYPES)})")
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except Exception as e:
            raise GGUFError(f"{self._path}: tensor {t.name} ({kind}, shape {shape}) cannot be read: {e}") from None
        proj = key.rsplit(".", 2)[-2]
        if proj in self._heads:
            w = permute_meta_qk(w, self._heads[proj])
        return w

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def load_gguf_llama(path: str | Path, overrides=(), *, progress: bool = False):
    """Convert a LLaMA GGUF file into ``(ModelConfig, LlamaForCausalLM)`` (LoRA adapters freshly initialised)."""
    reader = open_gguf(path)
    names = {t.name for t in reader.tensors}
    hf = gguf_hf_config(metadata(reader, path), names, path)
    cfg = model_config_for_llm(llama_config_from_hf(hf), overrides)
    return cfg, build_llama(cfg, GGUFTensors(reader, hf, path), source=str(path), prefix="model.", progress=progress)


def save_gguf_tokenizer(path: str | Path, dst: str | Path) -> None:
    """The tokenizer transformers builds from the file's vocabulary and merges, saved into ``dst``."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (KeyError, ValueError, NotImplementedError) as e:
        raise GGUFError(f"{path}: transformers cannot build a tokenizer from its metadata: {e}") from None
    tokenizer.save_pretrained(dst)


def convert(src: str | Path, dst: str | Path, overrides=(), progress: bool = True) -> Path:
    cfg, model = load_gguf_llama(src, overrides, progress=progress)
    out = save_pretrained(model, Config(model=cfg), dst)
    save_gguf_tokenizer(src, out)
    print("tokenizer: rebuilt from the file's vocabulary and merges")
    return out


def main(argv=None) -> None:
    converter_main(__doc__, convert, "config overrides such as model.lora.rank=8", argv)


if __name__ == "__main__":
    main()
