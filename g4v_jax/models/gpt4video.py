"""GPT4Video's video understanding module (paper §3.1): frames -> CLIP ViT -> video abstractor -> LLM-width tokens.

The language side (LLaMA + LoRA and the splicing of video tokens into the text) joins this file in the LLM issue.
"""

from __future__ import annotations

import jax
from flax import nnx

from g4v_jax.config import ModelConfig
from g4v_jax.models.abstractor import VideoAbstractor
from g4v_jax.models.clip_vit import CLIPVisionTower
from g4v_jax.models.layers import dtype_of


class VideoEncoder(nnx.Module):
    """Frames (B, T, H, W, 3) uint8/float + frame mask (B, T) -> video tokens (B, Nv, D_llm).

    Nv is 65 for the ``mplug_owl_video`` abstractor (64 queries + ``vit_eos``) and 64 for the ``paper`` one.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        kw = dict(param_dtype=dtype_of(cfg.param_dtype), dtype=dtype_of(cfg.compute_dtype),
                  attention_impl=cfg.attention_impl, rngs=rngs)
        self.cfg = cfg
        self.vision_model = CLIPVisionTower(cfg.vision, **kw)
        self.abstractor = VideoAbstractor(cfg.abstractor, cfg.llm_hidden_size, **kw)

    def __call__(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        features = self.vision_model(frames, frame_mask).last_hidden_state
        return self.abstractor(features, frame_mask)


def build_model(cfg: ModelConfig, seed: int = 0) -> VideoEncoder:
    """A freshly initialised model (random weights) for ``cfg``."""
    return VideoEncoder(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> VideoEncoder:
    """The model with ShapeDtypeStruct leaves (no memory, no compute): a target for loading weights."""
    return nnx.eval_shape(lambda: build_model(cfg))
