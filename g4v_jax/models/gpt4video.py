"""GPT4Video (paper §3): frames -> CLIP ViT -> video abstractor -> video tokens spliced into LLaMA's embeddings.

Video slots: ``input_ids`` holds ``VIDEO_PLACEHOLDER_ID`` (any negative id) wherever a video token goes (the template
in ``g4v_jax/data/template.py`` writes ``<video>`` + K slots + ``</video>``). Videos come per row,
(B, V, T, H, W, 3) with a frame mask (B, V, T): row b's i-th run of K slots receives the K tokens of ``videos[b, i]``.
Rows with fewer than V videos pad with anything (their frame mask False); the padding is never read. Keeping videos
with their rows means the batch axis shards (and splits into micro-batches) the same way for text and video, a
batch may mix text-only rows and rows with several videos, and a text-only batch (``videos=None``) does no vision
work at all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g4v_jax.config import ModelConfig
from g4v_jax.models.abstractor import VideoAbstractor
from g4v_jax.models.qformer import QFormerAbstractor
from g4v_jax.models.st_pool import SpatioTemporalPool
from g4v_jax.models.clip_vit import CLIPVisionTower
from g4v_jax.models.layers import dtype_of
from g4v_jax.models.llama import KVCache, LlamaForCausalLM


def _module_kwargs(cfg: ModelConfig, rngs: nnx.Rngs) -> dict:
    return dict(param_dtype=dtype_of(cfg.param_dtype), dtype=dtype_of(cfg.compute_dtype),
                attention_impl=cfg.attention_impl, rngs=rngs)


def build_abstractor(cfg: ModelConfig, **kw) -> nnx.Module:
    """The video abstractor ``cfg.abstractor.variant`` names (the paper's Table 5): features (B, T, 1 + N, Dv) and a
    frame mask (B, T) -> (B, cfg.num_video_tokens, D_llm)."""
    a, width, llm = cfg.abstractor, cfg.vision.hidden_size, cfg.llm_hidden_size
    if a.variant == "qformer":
        return QFormerAbstractor(a, width, llm, **kw)
    if a.variant == "st_pool":
        return SpatioTemporalPool(a, width, llm, cfg.pool_frames, cfg.vision.num_patches, **kw)
    return VideoAbstractor(a, llm, **kw)


class VideoEncoder(nnx.Module):
    """Frames (N, T, H, W, 3) uint8/float + frame mask (N, T) -> video tokens (N, K, D_llm).

    K is ``cfg.num_video_tokens``: 65 for the ``mplug_owl_video`` abstractor (64 queries + ``vit_eos``), 64 for the
    ``paper`` one, the query count for ``qformer``, frame slots + patches for ``st_pool``.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        kw = _module_kwargs(cfg, rngs)
        self.cfg = cfg
        self.vision_model = CLIPVisionTower(cfg.vision, **kw)
        self.abstractor = build_abstractor(cfg, **kw)

    def encode_videos(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        features = self.vision_model(frames, frame_mask).last_hidden_state
        return self.abstractor(features, frame_mask)

    def __call__(self, frames: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
        return self.encode_videos(frames, frame_mask)


def splice_video_tokens(text_embeds: jax.Array, input_ids: jax.Array, video_tokens: jax.Array) -> jax.Array:
    """Put each row's video tokens (B, V, K, D) into its slots (negative ids) of text embeddings (B, L, D)."""
    b, v, k, d = video_tokens.shape
    slots = input_ids < 0
    order = jnp.clip(jnp.cumsum(slots, axis=1) - 1, 0, v * k - 1)  # slot's index among its row's slots
    gathered = jnp.take_along_axis(video_tokens.reshape(b, v * k, d), order[..., None], axis=1)
    return jnp.where(slots[..., None], gathered.astype(text_embeds.dtype), text_embeds)


def _check_slots(input_ids: np.ndarray, video_batch: tuple[int, int] | None, tokens_per_video: int) -> None:
    """Every row's slots are whole videos, no more than the (batch, videos per row) given."""
    per_row = (input_ids < 0).sum(axis=1)
    if video_batch is None:
        if per_row.any():
            raise ValueError("input_ids contain video slots but no videos were given")
        return
    batch, per_row_videos = video_batch
    if batch != input_ids.shape[0]:
        raise ValueError(f"videos must be (batch, videos per row, ...) with batch {input_ids.shape[0]}, "
                         f"got batch {batch}")
    bad = [(b, int(n)) for b, n in enumerate(per_row) if n % tokens_per_video or n > per_row_videos * tokens_per_video]
    if bad:
        raise ValueError(f"rows {bad} (row, slots) do not hold whole videos of {tokens_per_video} tokens within the "
                         f"{per_row_videos} videos per row given")


class GPT4Video(VideoEncoder):
    """The whole model: ``logits, cache = model(input_ids, videos=..., frame_mask=..., attention_mask=...)``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.language_model = LlamaForCausalLM(cfg.llm, cfg.lora, remat=cfg.remat, scan_layers=cfg.scan_layers,
                                               **_module_kwargs(cfg, rngs))

    def embed(self, input_ids: jax.Array, videos: jax.Array | None = None, frame_mask: jax.Array | None = None,
              video_features: jax.Array | None = None) -> jax.Array:
        """(B, L) ids with video slots + (B, V, T, H, W, 3) videos, (B, V, T) mask -> (B, L, D) input embeddings.

        ``video_features`` (B, V, T, 1 + N, Dv), the vision tower's cached output, replaces ``videos`` (stage 1 with
        ``data.vision_cache``): only the abstractor runs.
        """
        source = videos if video_features is None else video_features
        if isinstance(input_ids, np.ndarray):  # host-side checks; under jit the data pipeline guarantees them
            want_ndim = 6 if video_features is None else 5
            if source is not None and source.ndim != want_ndim:
                raise ValueError(f"{'videos' if video_features is None else 'video_features'} must have "
                                 f"{want_ndim} dims (batch, videos per row, ...), got shape {source.shape}")
            _check_slots(input_ids, None if source is None else source.shape[:2], self.abstractor.num_output_tokens)
        text = self.language_model.embed(jnp.where(input_ids < 0, 0, input_ids))
        if source is None:
            return text
        b, v = source.shape[:2]
        mask = None if frame_mask is None else frame_mask.reshape(b * v, -1)
        flat = source.reshape(b * v, *source.shape[2:])
        tokens = self.encode_videos(flat, mask) if video_features is None else self.abstractor(flat, mask)
        return splice_video_tokens(text, input_ids, tokens.reshape(b, v, *tokens.shape[1:]))

    def __call__(self, input_ids: jax.Array, *, videos: jax.Array | None = None,
                 frame_mask: jax.Array | None = None, video_features: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: KVCache | None = None,
                 logits_at: jax.Array | None = None, adapter_mask: jax.Array | None = None):
        embeds = self.embed(input_ids, videos, frame_mask, video_features)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, positions=positions,
                                   segment_ids=segment_ids, cache=cache, logits_at=logits_at,
                                   adapter_mask=adapter_mask)


def _construct(cfg: ModelConfig, seed: int) -> nnx.Module:
    rngs = nnx.Rngs(params=seed, dropout=seed)
    if cfg.kind == "video_encoder":
        return VideoEncoder(cfg, rngs=rngs)
    if cfg.kind == "llm":
        return LlamaForCausalLM(cfg.llm, cfg.lora, remat=cfg.remat, scan_layers=cfg.scan_layers,
                                **_module_kwargs(cfg, rngs))
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


def model_kind(model: nnx.Module) -> str:
    """The ``model.kind`` of a loaded model: ``gpt4video``, ``video_encoder`` or ``llm``. The one place that decides
    it (train, export, inference and chat all ask here)."""
    if isinstance(model, GPT4Video):
        return "gpt4video"
    if isinstance(model, VideoEncoder):
        return "video_encoder"
    if isinstance(model, LlamaForCausalLM):
        return "llm"
    raise TypeError(f"{type(model).__name__} is not a g4v_jax model (GPT4Video, VideoEncoder or LlamaForCausalLM)")


def language_model(model: nnx.Module) -> LlamaForCausalLM:
    """The LLaMA of a model: itself for ``llm``, ``.language_model`` for ``gpt4video``; a ``TypeError`` for a
    ``video_encoder``, which has none."""
    kind = model_kind(model)
    if kind == "video_encoder":
        raise TypeError("a video_encoder model has no language model (model.kind must be llm or gpt4video)")
    return model if kind == "llm" else model.language_model
