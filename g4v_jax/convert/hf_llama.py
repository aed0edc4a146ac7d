"""HF LLaMA checkpoint -> g4v_jax, streaming tensor by tensor.

    python -m convert.hf_llama SRC DST [key=value ...]

SRC is an HF ``LlamaForCausalLM`` directory (``config.json``; ``model.safetensors`` or sharded safetensors with an
index, or ``pytorch_model*.bin``). DST receives a ``kind: llm`` model directory (``g4v_jax.load(DST)`` returns the
``LlamaForCausalLM``), with LoRA adapters per the config (fresh, zero B) unless ``model.lora.enabled=false``.

HF's q_proj/k_proj rows are already in the rotate-half order our RoPE uses (HF's own conversion script permuted
Meta's interleaved weights once), so they are copied as they are; ``permute_meta_qk`` is that permutation, for
weights that come straight from Meta's ``.pth`` files.

Memory: safetensors are memory-mapped, each tensor is transposed as a view and cast once into its parameter, so
peak host memory stays near one copy of the model plus the page cache.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from g4v_jax.convert.common import (
    Rule, convert_checkpoint, export_params, linear, open_checkpoint, converter_main, save_converted,
    read_hf_config, rename,
)
from g4v_jax.config import LlamaConfig, ModelConfig, RopeScaling, from_dict, load_config
from g4v_jax.models.gpt4video import abstract_model
from g4v_jax.models.llama import LlamaForCausalLM
from g4v_jax.models.lora import fresh_lora_arrays
from g4v_jax.weights import assign_params, param_shapes


def llama_rules(ours: str = "", theirs: str = "model.", lm_head: str = "lm_head") -> list[Rule]:
    """HF ``LlamaForCausalLM`` (decoder under ``theirs``, head at ``lm_head``) -> our LLaMA under ``ours``."""
    layer, hl = f"{ours}layers.{{i}}", f"{theirs}layers.{{i}}"
    rules = [
        rename(f"{ours}embed_tokens", f"{theirs}embed_tokens.weight"),
        rename(f"{ours}norm.scale", f"{theirs}norm.weight"),
        Rule((f"{ours}lm_head",), (f"{lm_head}.weight",), lambda w: (w.T,), lambda k: (k.T,)),
        rename(f"{layer}.input_layernorm.scale", f"{hl}.input_layernorm.weight"),
        rename(f"{layer}.post_attention_layernorm.scale", f"{hl}.post_attention_layernorm.weight"),
    ]
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rules += linear(f"{layer}.self_attn.{p}", f"{hl}.self_attn.{p}", bias=False)
    for p in ("gate_proj", "up_proj", "down_proj"):
        rules += linear(f"{layer}.mlp.{p}", f"{hl}.mlp.{p}", bias=False)
    return rules


# rotary buffers some older checkpoints carry; LoRA adapters are not in an HF base checkpoint
LLAMA_IGNORE = (r"rotary_emb\.inv_freq$",)


def permute_meta_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Meta ``.pth`` q/k weight (out, in), interleaved RoPE pairs -> HF rotate-half row order."""
    out, d = w.shape
    return w.reshape(num_heads, out // num_heads // 2, 2, d).transpose(0, 2, 1, 3).reshape(out, d)


def llama_config_from_hf(hf: dict) -> LlamaConfig:
    """Our ``LlamaConfig`` from an HF ``config.json`` (``rope_scaling``/``rope_theta`` of transformers 4 or the
    ``rope_parameters`` of transformers 5)."""
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json has model_type={hf.get('model_type')!r}, expected 'llama'")
    absent = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads") if k not in hf]
    if absent:
        raise ValueError(f"config.json is not a LLaMA config: it lacks {', '.join(absent)}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("LLaMA variants with attention_bias/mlp_bias are not supported")
    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    scaling = RopeScaling(rope_type=rope_type, **{k: v for k, v in rope.items() if k in known})
    return LlamaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=hf.get("head_dim") or 0,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=_first(hf.get("bos_token_id"), 1), eos_token_id=_first(hf.get("eos_token_id"), 2),
        pad_token_id=_first(hf.get("pad_token_id"), None),
    )


def _first(v, default: int | None) -> int | None:
    if isinstance(v, (list, tuple)):
        return int(v[0]) if v else default
    return default if v is None else int(v)


def model_config_for_llm(llm: LlamaConfig, overrides=()) -> ModelConfig:
    """A ``kind: llm`` model config around ``llm``; full precision unless overridden."""
    base = load_config(None, ["model.kind=llm", "model.param_dtype=float32", "model.compute_dtype=float32",
                              *overrides])
    return dataclasses.replace(base.model, llm=llm, llm_hidden_size=llm.hidden_size)


def convert_llm_params(tensors, model_shapes, *, ours: str, theirs: str, lm_head: str, source: str,
                       ignore=LLAMA_IGNORE, progress: bool = True) -> dict[str, np.ndarray]:
    """Checkpoint tensors -> our LLaMA parameters; LoRA adapters (absent from HF checkpoints) are left out."""
    base_shapes = {k: s for k, s in model_shapes.items() if ".lora_" not in k}
    return convert_checkpoint(tensors, llama_rules(ours, theirs, lm_head), base_shapes, source=source,
                              ignore=ignore, progress=progress)


def load_hf_llama(src: str | Path, overrides=(), *, progress: bool = False) -> tuple[ModelConfig, LlamaForCausalLM]:
    """Convert an HF LLaMA checkpoint into a ready ``LlamaForCausalLM`` (LoRA adapters freshly initialised)."""
    tensors = open_checkpoint(src)
    cfg = model_config_for_llm(llama_config_from_hf(read_hf_config(src)), overrides)
    prefix = "model." if any(k.startswith("model.") for k in tensors) else ""
    return cfg, build_llama(cfg, tensors, source=str(src), prefix=prefix, progress=progress)


def build_llama(cfg: ModelConfig, tensors, *, source: str, prefix: str, progress: bool) -> LlamaForCausalLM:
    """The ``LlamaForCausalLM`` of ``cfg`` holding ``tensors`` (HF names, decoder under ``prefix``), LoRA fresh."""
    target = abstract_model(cfg)
    shapes = {k: s for k, (s, _) in param_shapes(target).items()}
    # a tied checkpoint may still carry lm_head.weight (a copy of the embedding)
    ignore = LLAMA_IGNORE + ((r"^lm_head\.weight$",) if cfg.llm.tie_word_embeddings else ())
    arrays = convert_llm_params(tensors, shapes, ours="", theirs=prefix, lm_head="lm_head", source=source,
                                ignore=ignore, progress=progress)
    model = assign_params(target, {**arrays, **fresh_lora_arrays(target)}, source)
    model.eval()  # LoRA dropout off until training asks for it, as g4v_jax.load does
    return model


def export_llama(params: dict[str, np.ndarray], *, ours: str = "", tied: bool = False) -> dict[str, np.ndarray]:
    """Our (merged) LLaMA parameters -> HF ``LlamaForCausalLM`` tensor names."""
    rules = llama_rules(ours, "model.", "lm_head")
    if tied:
        rules = [r for r in rules if r.ours[0] != f"{ours}lm_head"]
    return export_params(params, rules)


def convert(src: str | Path, dst: str | Path, overrides=()) -> Path:
    cfg, model = load_hf_llama(src, overrides, progress=True)
    return save_converted(model, cfg, src, dst)


def main(argv=None) -> None:
    converter_main(__doc__, convert, "config overrides such as model.lora.rank=8", argv)


if __name__ == "__main__":
    main()
