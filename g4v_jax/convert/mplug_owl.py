"""mPLUG-Owl(-video) checkpoint -> g4v_jax GPT4Video (vision tower + video abstractor + LLaMA, LoRA adapters fresh).

    python -m convert.mplug_owl SRC DST [key=value ...]

SRC is an mPLUG-Owl or mPLUG-Owl-video directory (``config.json`` with ``vision_config``,
``visual_abstractor_config``, ``text_config``, ``num_query_tokens``; weights as safetensors or ``.bin``, sharded or
not). GPT4Video starts from this checkpoint. A checkpoint without ``language_model.*`` tensors converts to a
``kind: video_encoder`` directory (vision tower + abstractor only). The image-only mPLUG-Owl (no temporal adapter,
no temporal query tokens) is not a supported source: its missing
tensors are reported by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from g4v_jax.convert.common import (
    Rule, convert_checkpoint, export_params, layernorm, linear, open_checkpoint,
    pointwise_conv, converter_main, save_converted,
    read_hf_config, rename, reshaped,
)
from g4v_jax.config import AbstractorConfig, ModelConfig, VideoConfig, VisionConfig, from_dict, parse_overrides, to_dict
from g4v_jax.convert.hf_llama import llama_config_from_hf, llama_rules
from g4v_jax.models.gpt4video import GPT4Video, VideoEncoder, abstract_model
from g4v_jax.models.lora import fresh_lora_arrays

from flax import nnx
from g4v_jax.weights import assign_params, named_params, param_shapes


def _fused_qkv_rules(ours: str, theirs: str, num_heads: int) -> list[Rule]:
    """mPLUG-Owl's ``query_key_value`` is interleaved per head: rows ordered (head, {q,k,v}, head_dim)."""

    def split_w(w):
        d = w.shape[1]
        w = w.reshape(num_heads, 3, -1, d)
        return tuple(w[:, j].reshape(-1, d).T for j in range(3))

    def split_b(b):
        b = b.reshape(num_heads, 3, -1)
        return tuple(b[:, j].reshape(-1) for j in range(3))

    def join_w(q, k, v):
        d = q.shape[0]
        return (np.stack([x.T.reshape(num_heads, -1, d) for x in (q, k, v)], axis=1).reshape(-1, d),)

    def join_b(q, k, v):
        return (np.stack([x.reshape(num_heads, -1) for x in (q, k, v)], axis=1).reshape(-1),)

    names = [f"{ours}.{p}_proj" for p in ("q", "k", "v")]
    return [
        Rule(tuple(f"{n}.kernel" for n in names), (f"{theirs}.weight",), split_w, join_w),
        Rule(tuple(f"{n}.bias" for n in names), (f"{theirs}.bias",), split_b, join_b),
    ]


def _flat(a):
    return a.reshape(-1)


def mplug_owl_rules(vision_heads: int) -> list[Rule]:
    """Key map of mPLUG-Owl(-video) vision tower + abstractor onto our ``VideoEncoder``."""
    v, hv = "vision_model", "vision_model"
    layer, hl = f"{v}.layers.{{i}}", f"{hv}.encoder.layers.{{i}}"
    ab, ha = "abstractor.layers.{i}", "abstractor.encoder.layers.{i}.crossattention"
    rules = [
        reshaped(f"{v}.embeddings.class_embedding", f"{hv}.embeddings.cls_token", lambda a: (-1,),
                 lambda a: (1, 1, -1)),
        Rule((f"{v}.embeddings.patch_embedding",), (f"{hv}.embeddings.patch_embed.weight",),
             lambda w: (w.reshape(w.shape[0], -1).T,),
             lambda k: (k.T.reshape(k.shape[1], 3, int(round((k.shape[0] / 3) ** 0.5)), -1),)),
        reshaped(f"{v}.embeddings.position_embedding", f"{hv}.embeddings.position_embedding",
                 lambda a: a.shape[1:], lambda a: (1, *a.shape)),
        *layernorm(f"{v}.pre_layernorm", f"{hv}.embeddings.pre_layernorm"),
        *layernorm(f"{v}.post_layernorm", f"{hv}.post_layernorm"),
        *layernorm(f"{layer}.layer_norm1", f"{hl}.input_layernorm"),
        *layernorm(f"{layer}.layer_norm2", f"{hl}.post_attention_layernorm"),
        *_fused_qkv_rules(f"{layer}.self_attn", f"{hl}.self_attn.query_key_value", vision_heads),
        *linear(f"{layer}.self_attn.out_proj", f"{hl}.self_attn.dense"),
        *linear(f"{layer}.mlp.fc1", f"{hl}.mlp.fc1"),
        *linear(f"{layer}.mlp.fc2", f"{hl}.mlp.fc2"),
        *layernorm(f"{layer}.temporal.ln", f"{hl}.temporal.ln"),
        *pointwise_conv(f"{layer}.temporal.down_proj", f"{hl}.temporal.down_proj"),
        *pointwise_conv(f"{layer}.temporal.up_proj", f"{hl}.temporal.up_proj"),
        # depthwise Conv3d weight (C, 1, 3, 1, 1) -> our (3, C)
        Rule((f"{layer}.temporal.conv_kernel",), (f"{hl}.temporal.conv.weight",),
             lambda w: (w.reshape(w.shape[0], 3).T,), lambda k: (k.T.reshape(k.shape[1], 1, 3, 1, 1),)),
        rename(f"{layer}.temporal.conv_bias", f"{hl}.temporal.conv.bias"),
        reshaped("abstractor.query_tokens", "query_tokens", lambda a: a.shape[1:], lambda a: (1, *a.shape)),
        reshaped("abstractor.temporal_query_tokens", "temporal_query_tokens", lambda a: a.shape[1:],
                 lambda a: (1, *a.shape)),
        *layernorm(f"{ab}.norm1", f"{ha}.norm1"),
        *layernorm(f"{ab}.normk", f"{ha}.normk"),
        *linear(f"{ab}.attention.query", f"{ha}.attention.query"),
        *linear(f"{ab}.attention.key", f"{ha}.attention.key"),
        *linear(f"{ab}.attention.value", f"{ha}.attention.value"),
        *linear(f"{ab}.out_proj", f"{ha}.output.out_proj"),
        *layernorm(f"{ab}.norm2", f"{ha}.output.norm2"),
        *linear(f"{ab}.mlp.w1", f"{ha}.output.mlp.w1"),
        *linear(f"{ab}.mlp.w2", f"{ha}.output.mlp.w2"),
        *linear(f"{ab}.mlp.w3", f"{ha}.output.mlp.w3"),
        *layernorm(f"{ab}.mlp.ffn_ln", f"{ha}.output.mlp.ffn_ln"),
        *linear("abstractor.visual_fc", "abstractor.visual_fc"),
        *linear("abstractor.temporal_visual_fc", "abstractor.temporal_visual_fc"),
        reshaped("abstractor.vit_eos", "abstractor.vit_eos", lambda a: (-1,), lambda a: (1, 1, -1)),
    ]
    return rules


# position ids and rotary frequencies are buffers, not weights
MPLUG_IGNORE = (r"position_ids$", r"rotary_emb\.inv_freq$")


def abstractor_mlp_width(intermediate_size: int) -> int:
    """mPLUG-Owl's rule: 2816 is taken as is, any other value goes through LLaMA's 2/3 rounding to 256."""
    if intermediate_size == 2816:
        return 2816
    hidden = int(2 * intermediate_size / 3)
    return 256 * ((hidden + 255) // 256)


def model_config_from_mplug(hf: dict, overrides=(), *, with_llm: bool = False) -> ModelConfig:
    """Our ``ModelConfig`` for an mPLUG-Owl(-video) ``config.json`` (dict), plus ``model.*`` overrides."""
    v, a = hf["vision_config"], hf["visual_abstractor_config"]
    if v.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ValueError(f"unsupported vision hidden_act {v['hidden_act']!r}")
    if a.get("encoder_hidden_size", v["hidden_size"]) != v["hidden_size"]:
        raise ValueError("abstractor encoder_hidden_size differs from the vision width")
    vision = VisionConfig(
        image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 14), hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"], num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"], layer_norm_eps=v.get("layer_norm_eps", 1e-6),
        temporal_adapter=True, post_layernorm_all_tokens=True,
    )
    n_query = hf.get("num_query_tokens", 64)
    abstractor = AbstractorConfig(
        variant="mplug_owl_video", hidden_size=a["hidden_size"], num_layers=a["num_hidden_layers"],
        num_heads=a["num_attention_heads"], intermediate_size=abstractor_mlp_width(a["intermediate_size"]),
        num_query_tokens=n_query, num_temporal_tokens=n_query, ffn_norm_eps=a.get("layer_norm_eps", 1e-6),
    )
    llm_width = hf["text_config"]["hidden_size"]
    # mPLUG-Owl-video reads frames with its get_index and decord's VideoReader(height=224, width=224)
    video = VideoConfig(sampling="mplug_owl", resize="squash")
    if with_llm:
        llm = llama_config_from_hf(hf["text_config"])
        model = ModelConfig(kind="gpt4video", vision=vision, abstractor=abstractor, llm=llm, llm_hidden_size=llm_width,
                            video=video)
    else:
        model = ModelConfig(kind="video_encoder", vision=vision, abstractor=abstractor, llm_hidden_size=llm_width,
                            video=video)
    data = to_dict(model)
    data = _deep_update(data, parse_overrides(overrides).get("model", {}))
    return from_dict(ModelConfig, data, "model.")


def _deep_update(a: dict, b: dict) -> dict:
    for k, val in b.items():
        a[k] = _deep_update(dict(a.get(k, {})), val) if isinstance(val, dict) else val
    return a


def load_mplug_owl(src: str | Path, overrides=(), *, progress: bool = False) -> tuple[ModelConfig, nnx.Module]:
    """Convert an mPLUG-Owl(-video) checkpoint into a ready ``GPT4Video`` (or ``VideoEncoder`` without LLM)."""
    tensors = open_checkpoint(src)
    with_llm = any(k.startswith("language_model.") for k in tensors)
    cfg = model_config_from_mplug(read_hf_config(src), overrides, with_llm=with_llm)
    target = abstract_model(cfg)
    shapes = {k: s for k, (s, _) in param_shapes(target).items() if ".lora_" not in k}
    rules = mplug_owl_rules(cfg.vision.num_heads)
    if with_llm:
        rules += llama_rules("language_model.", "language_model.model.", "language_model.lm_head")
    arrays = convert_checkpoint(tensors, rules, shapes, source=str(src), ignore=MPLUG_IGNORE, progress=progress)
    if progress and not with_llm:
        print("no language_model.* tensors: wrote the video encoder only (kind: video_encoder)")
    model = assign_params(target, {**arrays, **fresh_lora_arrays(target)}, str(src))
    model.eval()  # LoRA dropout off until training asks for it, as g4v_jax.load does
    return cfg, model


def export_mplug_owl(model: VideoEncoder) -> dict[str, np.ndarray]:
    """Our ``VideoEncoder``/``GPT4Video`` -> mPLUG-Owl-video tensor names and layouts (the inverse of
    ``load_mplug_owl``; LoRA adapters are not part of that format: merge them first)."""
    params = {k: np.asarray(val) for k, val in named_params(model).items()}
    rules = mplug_owl_rules(model.cfg.vision.num_heads)
    if isinstance(model, GPT4Video):
        rules += llama_rules("language_model.", "language_model.model.", "language_model.lm_head")
    return export_params(params, rules)


def convert(src: str | Path, dst: str | Path, overrides=()) -> Path:
    cfg, model = load_mplug_owl(src, overrides, progress=True)
    return save_converted(model, cfg, src, dst)


def main(argv=None) -> None:
    converter_main(__doc__, convert, "config overrides such as model.param_dtype=bfloat16", argv)


if __name__ == "__main__":
    main()
