"""HF CLIP (text tower, or the full two-tower ``CLIPModel``) -> g4v_jax, for the text-to-video metrics.

``load_hf_clip(SRC)`` reads an HF ``CLIPModel`` directory (``config.json`` + safetensors, sharded or not, or
``pytorch_model.bin``): ``text_model.*``, ``vision_model.*``, ``text_projection.weight``, ``visual_projection.weight``
and ``logit_scale``, into our ``g4v_jax.models.clip_text.CLIPModel``. ``load_hf_clip_text(SRC)`` reads only the text
tower, from a ``CLIPModel`` or a ``CLIPTextModel`` directory (transformers 5 saves the latter without the
``text_model.`` prefix; transformers 4 and every ``CLIPModel`` with it). Mismatches are reported all at once, in the
checkpoint's own names, by ``convert.common.convert_checkpoint``.
"""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from g4v_jax.convert.common import (Rule, convert_checkpoint, layernorm, linear, open_checkpoint, read_hf_config,
                                    rename)
from g4v_jax.convert.hf_clip import clip_vision_rules, vision_config_from_hf
from g4v_jax.models.clip_text import CLIPModel, CLIPTextTower, TextConfig
from g4v_jax.weights import assign_params, param_shapes

# buffers, skipped on purpose
_BUFFERS = (r"position_ids$",)
# everything but the text tower of a CLIPModel, when only the text tower is wanted
_NOT_TEXT = (r"^vision_model\.", r"^text_projection\.", r"^visual_projection\.", r"^logit_scale$")


def clip_text_rules(ours: str = "", theirs: str = "text_model.") -> list[Rule]:
    """Key map of HF ``CLIPTextModel`` (prefix ``theirs``) onto our ``CLIPTextTower`` (prefix ``ours``)."""
    layer, hf_layer = f"{ours}layers.{{i}}", f"{theirs}encoder.layers.{{i}}"
    rules = [
        rename(f"{ours}embeddings.token_embedding", f"{theirs}embeddings.token_embedding.weight"),
        rename(f"{ours}embeddings.position_embedding", f"{theirs}embeddings.position_embedding.weight"),
        *layernorm(f"{ours}final_layer_norm", f"{theirs}final_layer_norm"),
        *layernorm(f"{layer}.layer_norm1", f"{hf_layer}.layer_norm1"),
        *layernorm(f"{layer}.layer_norm2", f"{hf_layer}.layer_norm2"),
        *linear(f"{layer}.mlp.fc1", f"{hf_layer}.mlp.fc1"),
        *linear(f"{layer}.mlp.fc2", f"{hf_layer}.mlp.fc2"),
    ]
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += linear(f"{layer}.self_attn.{proj}", f"{hf_layer}.self_attn.{proj}")
    return rules


def clip_model_rules() -> list[Rule]:
    """Key map of HF ``CLIPModel`` onto our ``CLIPModel`` (same top-level names)."""
    return [
        *clip_text_rules("text_model.", "text_model."),
        *clip_vision_rules("vision_model.", "vision_model."),
        *linear("text_projection", "text_projection", bias=False),
        *linear("visual_projection", "visual_projection", bias=False),
        rename("logit_scale", "logit_scale"),
    ]


def text_config_from_hf(hf: dict) -> TextConfig:
    t = hf.get("text_config", hf)
    act = t.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise ValueError(f"CLIP text tower with hidden_act={act!r}: only quick_gelu (OpenAI CLIP) is supported")
    absent = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if k not in t]
    if absent:
        raise ValueError(f"config.json is not a CLIP (text) config: it lacks {', '.join(absent)}")
    # defaults are CLIPTextConfig's own (transformers 5)
    return TextConfig(
        vocab_size=t.get("vocab_size", 49408), hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
        num_layers=t["num_hidden_layers"], num_heads=t["num_attention_heads"],
        max_position_embeddings=t.get("max_position_embeddings", 77), layer_norm_eps=t.get("layer_norm_eps", 1e-5),
        eos_token_id=t.get("eos_token_id", 49407),
    )


def _text_prefix(tensors) -> str:
    return "text_model." if any(k.startswith("text_model.") for k in tensors) else ""


def load_hf_clip_text(src: str | Path, *, progress: bool = False) -> tuple[TextConfig, CLIPTextTower]:
    """Convert the text tower of an HF ``CLIPModel`` / ``CLIPTextModel`` checkpoint into a ``CLIPTextTower`` (fp32)."""
    tensors = open_checkpoint(src)
    cfg = text_config_from_hf(read_hf_config(src))
    target = nnx.eval_shape(lambda: CLIPTextTower(cfg, rngs=nnx.Rngs(0)))
    shapes = {k: s for k, (s, _) in param_shapes(target).items()}
    arrays = convert_checkpoint(tensors, clip_text_rules(theirs=_text_prefix(tensors)), shapes, source=str(src),
                                ignore=_BUFFERS + _NOT_TEXT, progress=progress)
    return cfg, assign_params(target, arrays, str(src))


def load_hf_clip(src: str | Path, *, progress: bool = False) -> CLIPModel:
    """Convert a full HF ``CLIPModel`` checkpoint (both towers, projections, logit scale) into our ``CLIPModel``."""
    tensors = open_checkpoint(src)
    hf = read_hf_config(src)
    if "text_config" not in hf or "vision_config" not in hf:
        raise ValueError(f"{src} is not a CLIPModel checkpoint: its config.json lacks text_config/vision_config "
                         "(CLIPSIM needs both towers and the projections)")
    text_cfg, vision_cfg = text_config_from_hf(hf), vision_config_from_hf(hf)
    proj = hf.get("projection_dim", 512)
    target = nnx.eval_shape(lambda: CLIPModel(text_cfg, vision_cfg, proj, rngs=nnx.Rngs(0)))
    shapes = {k: s for k, (s, _) in param_shapes(target).items()}
    arrays = convert_checkpoint(tensors, clip_model_rules(), shapes, source=str(src), ignore=_BUFFERS,
                                progress=progress)
    return assign_params(target, arrays, str(src))
