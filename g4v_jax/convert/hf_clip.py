"""HF CLIP vision tower -> g4v_jax.

    python -m convert.hf_clip SRC DST [--abstractor paper|mplug_owl_video|qformer|st_pool] [--llm-hidden-size 4096]
                                      [key=value ...]

SRC is an HF ``CLIPVisionModel`` or full ``CLIPModel`` directory (``config.json`` + safetensors, sharded or not, or
``pytorch_model.bin``; the text tower is skipped). DST receives our model directory: the converted vision tower plus
a freshly initialised video abstractor (stage 1 trains it), loadable with ``g4v_jax.load(DST)``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from g4v_jax.convert.common import (Rule, convert_checkpoint, layernorm, linear, module_name, open_checkpoint,
                            print_load_hint, read_hf_config, run_converter)
from g4v_jax.config import ABSTRACTOR_VARIANTS, AbstractorConfig, Config, VisionConfig, load_config
from g4v_jax.models.clip_vit import CLIPVisionTower
from g4v_jax.models.layers import dtype_of
from g4v_jax.models.gpt4video import build_model
from g4v_jax.weights import assign_params, named_params, param_shapes, save_pretrained

from flax import nnx


def _patch_rule(ours: str, theirs: str) -> Rule:
    # torch Conv2d weight (D, 3, P, P) -> our (3*P*P, D) patch matmul kernel, rows in (channel, row, col) order
    def to_theirs(k):
        p = int(round((k.shape[0] / 3) ** 0.5))
        return (k.T.reshape(k.shape[1], 3, p, p),)

    return Rule((ours,), (theirs,), lambda w: (w.reshape(w.shape[0], -1).T,), to_theirs)


def clip_vision_rules(ours: str = "", theirs: str = "vision_model.") -> list[Rule]:
    """Key map of HF ``CLIPVisionModel`` (prefix ``theirs``) onto our ``CLIPVisionTower`` (prefix ``ours``)."""
    layer, hf_layer = f"{ours}layers.{{i}}", f"{theirs}encoder.layers.{{i}}"
    rules = [
        Rule((f"{ours}embeddings.class_embedding",), (f"{theirs}embeddings.class_embedding",),
             lambda a: (a,), lambda a: (a,)),
        _patch_rule(f"{ours}embeddings.patch_embedding", f"{theirs}embeddings.patch_embedding.weight"),
        Rule((f"{ours}embeddings.position_embedding",), (f"{theirs}embeddings.position_embedding.weight",),
             lambda a: (a,), lambda a: (a,)),
        *layernorm(f"{ours}pre_layernorm", f"{theirs}pre_layrnorm"),
        *layernorm(f"{ours}post_layernorm", f"{theirs}post_layernorm"),
        *layernorm(f"{layer}.layer_norm1", f"{hf_layer}.layer_norm1"),
        *layernorm(f"{layer}.layer_norm2", f"{hf_layer}.layer_norm2"),
        *linear(f"{layer}.mlp.fc1", f"{hf_layer}.mlp.fc1"),
        *linear(f"{layer}.mlp.fc2", f"{hf_layer}.mlp.fc2"),
    ]
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += linear(f"{layer}.self_attn.{proj}", f"{hf_layer}.self_attn.{proj}")
    return rules


# buffers and the other towers of a full CLIPModel, skipped on purpose
CLIP_IGNORE = (r"position_ids$", r"^text_model\.", r"^text_projection\.", r"^visual_projection\.", r"^logit_scale$")


def _vision_prefix(tensors) -> str:
    # CLIPModel and transformers-4 CLIPVisionModel files say "vision_model.embeddings..."; transformers 5 saves a
    # CLIPVisionModel as "embeddings..."
    return "vision_model." if any(k.startswith("vision_model.") for k in tensors) else ""


def vision_config_from_hf(hf: dict) -> VisionConfig:
    v = hf.get("vision_config", hf)
    act = v.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise ValueError(f"CLIP vision tower with hidden_act={act!r}: only quick_gelu (OpenAI CLIP) is supported")
    absent = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if k not in v]
    if absent:
        raise ValueError(f"config.json is not a CLIP (vision) config: it lacks {', '.join(absent)}")
    # defaults are CLIPVisionConfig's own
    return VisionConfig(
        image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32), hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"], num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"], layer_norm_eps=v.get("layer_norm_eps", 1e-5),
        temporal_adapter=False, post_layernorm_all_tokens=False,
    )


def load_hf_clip_vision(src: str | Path, *, progress: bool = False, dtype: str = "float32"
                        ) -> tuple[VisionConfig, CLIPVisionTower]:
    """Convert an HF CLIP checkpoint's vision tower into a ready ``CLIPVisionTower`` (weights and compute in
    ``dtype``)."""
    tensors = open_checkpoint(src)
    cfg = vision_config_from_hf(read_hf_config(src))
    dt = dtype_of(dtype)
    target = nnx.eval_shape(lambda: CLIPVisionTower(cfg, param_dtype=dt, dtype=dt, rngs=nnx.Rngs(0)))
    shapes = {k: s for k, (s, _) in param_shapes(target).items()}
    arrays = convert_checkpoint(tensors, clip_vision_rules(theirs=_vision_prefix(tensors)), shapes, source=str(src),
                                ignore=CLIP_IGNORE, progress=progress)
    return cfg, assign_params(target, arrays, str(src))


def abstractor_for_tower(abstractor: AbstractorConfig, tower: VisionConfig, overrides=()) -> AbstractorConfig:
    """A fresh abstractor as wide as the tower it reads (the preset is sized for ViT-L's 1024): its width, heads and
    MLP ratio follow the tower unless ``model.abstractor.*`` overrides set them. Its projection is sized by
    ``model.llm_hidden_size``."""
    fixed = {o.split("=", 1)[0].removeprefix("model.abstractor.") for o in overrides
             if o.startswith("model.abstractor.")}
    sized = {"hidden_size": tower.hidden_size, "num_heads": tower.num_heads,
             "intermediate_size": int(round(abstractor.intermediate_size * tower.hidden_size
                                            / abstractor.hidden_size))}
    return dataclasses.replace(abstractor, **{k: v for k, v in sized.items() if k not in fixed})


def convert(src: str | Path, dst: str | Path, *, abstractor: str = "paper", llm_hidden_size: int = 4096,
            overrides=(), seed: int = 0) -> Path:
    """Write our model directory with the CLIP vision tower of ``src`` and a fresh abstractor."""
    vision_cfg, tower = load_hf_clip_vision(src, progress=True)
    # the clip_vit_l14 preset carries the abstractor settings a plain CLIP tower needs (frame embeddings)
    base = load_config({"model": "model/clip_vit_l14.yaml"},
                       ["model.kind=video_encoder", f"model.abstractor.variant={abstractor}",
                        f"model.llm_hidden_size={llm_hidden_size}",
                        # store full precision; g4v_jax.load(dir, ["model.param_dtype=bfloat16"]) casts later
                        "model.param_dtype=float32", "model.compute_dtype=float32", *overrides])
    # CLIP's own preprocessing: frames resized on the short side and centre-cropped (model.video defaults)
    model_cfg = dataclasses.replace(base.model, vision=vision_cfg,
                                    abstractor=abstractor_for_tower(base.model.abstractor, vision_cfg, overrides))
    model = build_model(model_cfg, seed=seed)
    params = named_params(model)
    params.update({f"vision_model.{k}": v for k, v in named_params(tower).items()})
    model = assign_params(model, {k: np.asarray(v) for k, v in params.items()}, str(src))
    print(f"vision tower converted from {src}; abstractor ({abstractor}) freshly initialised with seed {seed}")
    return save_pretrained(model, Config(model=model_cfg), dst)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog=f"python -m {module_name(convert)}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--abstractor", default="paper", choices=list(ABSTRACTOR_VARIANTS))
    ap.add_argument("--llm-hidden-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="config overrides such as model.param_dtype=bfloat16")
    args = ap.parse_intermixed_args(argv)
    dst = run_converter(module_name(convert), convert, args.src, args.dst, abstractor=args.abstractor,
                        llm_hidden_size=args.llm_hidden_size, overrides=args.overrides, seed=args.seed)
    print_load_hint(Path(dst))


if __name__ == "__main__":
    main()
