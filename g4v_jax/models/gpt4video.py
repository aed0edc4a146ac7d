"""GPT4Video (paper §3): frames -> CLIP ViT -> video abstractor -> video tokens spliced into LLaMA's embeddings.

Video slots: ``input_ids`` holds ``VIDEO_PLACEHOLDER_ID`` (any negative id) wherever a video token goes (the template
in ``g4v_jax/data/template.py`` writes ``<video>`` + K slots + ``</video>``). The videos of a batch come flattened,
(N, T, H, W, 3) in order of appearance, row by row; the k-th slot of the batch (row-major) receives the k-th of the
N·K video tokens. So a batch may mix text-only rows and rows with several videos, and a text-only batch
(``videos=None``) does no vision work at all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g4v_jax.config import ModelConfig
from g4v_jax.models.abstractor import VideoAbstractor
from g4v_jax.models.clip_vit import CLIPVisionTower
from g4v_jax.models.layers import dtype_of
from g4v_jax.models.llama import KVCache, LlamaForCausalLM


def _module_kwargs(cfg: ModelConfig, rngs: nnx.Rngs) -> dict:
    return dict(param_dtype=dtype_of(cfg.param_dtype), dtype=dtype_of(cfg.compute_dtype),
                attention_impl=cfg.attention_impl, rngs=rngs)


class VideoEncoder(nnx.Module):
    """Frames (N, T, H, W, 3) uint8/float + frame mask (N, T) -> video tokens (N, K, D_llm).

    K is 65 for the ``mplug_owl_video`` abstractor (64 queries + ``vit_eos``) and 64 for the ``paper`` one.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        kw = _module_kwargs(cfg, rngs)
        self.cfg = cfg
        self.vision_model = CLIPVisionTower(cfg.vision, **kw)
        self.abstractor = VideoAbstractor(cfg.abstractor, cfg.llm_hidden_size, **kw)

    def encode_videos(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        features = self.vision_model(frames, frame_mask).last_hidden_state
        return self.abstractor(features, frame_mask)

    def __call__(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        return self.encode_videos(frames, frame_mask)


def splice_video_tokens(text_embeds: jax.Array, input_ids: jax.Array, video_tokens: jax.Array) -> jax.Array:
    """Put video tokens (N, K, D) into the slots (negative ids) of text embeddings (B, L, D), row-major order."""
    slots = input_ids < 0
    flat = video_tokens.reshape(-1, video_tokens.shape[-1]).astype(text_embeds.dtype)
    order = jnp.cumsum(slots.reshape(-1)).reshape(slots.shape) - 1
    gathered = jnp.take(flat, jnp.clip(order, 0, flat.shape[0] - 1), axis=0)
    return jnp.where(slots[..., None], gathered, text_embeds)


class GPT4Video(VideoEncoder):
    """The whole model: ``logits, cache = model(input_ids, videos=..., frame_mask=..., attention_mask=...)``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.language_model = LlamaForCausalLM(cfg.llm, cfg.lora, **_module_kwargs(cfg, rngs))

    def embed(self, input_ids: jax.Array, videos: jax.Array | None = None,
              frame_mask: jax.Array | None = None) -> jax.Array:
        """(B, L) ids with video slots + (N, T, H, W, 3) videos -> (B, L, D) input embeddings."""
        if videos is None and isinstance(input_ids, np.ndarray) and (input_ids < 0).any():
            raise ValueError("input_ids contain video slots but no videos were given")
        if videos is not None and isinstance(input_ids, np.ndarray):
            want = int((input_ids < 0).sum())
            have = videos.shape[0] * self.abstractor.num_output_tokens
            if want != have:
                raise ValueError(f"input_ids have {want} video slots but {videos.shape[0]} videos give {have} tokens")
        text = self.language_model.embed(jnp.where(input_ids < 0, 0, input_ids))
        if videos is None:
            return text
        return splice_video_tokens(text, input_ids, self.encode_videos(videos, frame_mask))

    def __call__(self, input_ids: jax.Array, *, videos: jax.Array | None = None,
                 frame_mask: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: KVCache | None = None):
        embeds = self.embed(input_ids, videos, frame_mask)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, positions=positions,
                                   cache=cache)


def _construct(cfg: ModelConfig, seed: int) -> nnx.Module:
    rngs = nnx.Rngs(params=seed, dropout=seed)
    if cfg.kind == "video_encoder":
        return VideoEncoder(cfg, rngs=rngs)
    if cfg.kind == "llm":
        return LlamaForCausalLM(cfg.llm, cfg.lora, **_module_kwargs(cfg, rngs))
    return GPT4Video(cfg, rngs=rngs)


def build_model(cfg: ModelConfig, seed: int = 0) -> nnx.Module:
    """A freshly initialised model of ``cfg.kind`` (random weights), in eval mode (LoRA dropout off); training code
    calls ``model.train()``."""
    model = _construct(cfg, seed)
    model.eval()
    return model


def abstract_model(cfg: ModelConfig) -> nnx.Module:
    """The model with ShapeDtypeStruct leaves (no memory, no compute): a target for loading weights."""
    return nnx.eval_shape(lambda: _construct(cfg, 0))
