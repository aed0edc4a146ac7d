"""Stable Diffusion's NSFW safety checker in JAX, and GPT4Video's per-video rule on top of it.

Port of diffusers' ``StableDiffusionSafetyChecker`` (``diffusers/pipelines/stable_diffusion/safety_checker.py``), the
checker GPT4Video runs on the frames of every generated video. The model is a CLIP ViT (HF conventions: post-LN on
the pooled CLS only) + ``visual_projection`` (no bias) and four frozen tensors: 17 concept embeddings with 17
thresholds and 3 "special care" embeddings with 3 thresholds.

Decision rule, exactly as diffusers' ``forward`` (what the pipelines call; ``forward_onnx`` differs, see below), per
image::

    image_embeds = visual_projection(pooled)
    special_cos  = cosine(image_embeds, special_care_embeds)            # (3,)
    concept_cos  = cosine(image_embeds, concept_embeds)                 # (17,)
    adjustment = 0.0
    for k in 0..2:                                                      # in order: the adjustment applies to the
        special[k] = round(special_cos[k] - special_w[k] + adjustment, 3)   # special scores after the first hit
        if special[k] > 0: adjustment = 0.01
    concept = round(concept_cos - concept_w + adjustment, 3)            # (17,)
    flagged = any(concept > 0)

``round`` is NumPy's (round half to even of ``x * 1000``, then ``/ 1000``) on float32 values, and the arithmetic is
float32 throughout (NumPy >= 2 keeps ``float32 - python float`` in float32). The scoring therefore runs on the host in
NumPy, on the cosines the jitted model returns: XLA rewrites ``x / 1000`` as ``x * 0.001``, which moves about half of
the rounded scores by one ulp (the flags would not change, the reported scores would). ``forward_onnx`` rounds
nothing and applies the 0.01 to concepts only; flags agree with ``forward`` except within 5e-4 of a threshold.

Preprocessing is CLIP's (``normalize_frames``) on images already at the checker's size (224 for the released
checker): diffusers' pipelines resize the short side to 224 (bicubic) and center-crop, which
``g4v_jax.data.video.resize_center_crop`` reproduces bit-exactly; ``flag_video`` applies it when frames have another
size.

The model runs with fp32 matmuls at full precision (``jax.default_matmul_precision("highest")``): a filter decides on
scores 5e-4 from a threshold, so TF32 on GPUs is not welcome here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g4v_jax.config import VisionConfig
from g4v_jax.data.video import resize_center_crop
from g4v_jax.models.clip_vit import CLIPVisionTower
from g4v_jax.models.layers import Dense, normal_init, ones_init, param
from g4v_jax.weights import assign_params, named_params, read_safetensors, write_safetensors

NUM_CONCEPTS = 17
NUM_SPECIAL = 3
SPECIAL_ADJUSTMENT = 0.01  # diffusers: added to every concept score once a special-care concept fires
WEIGHTS_FILE = "safety_checker.safetensors"
CONFIG_FILE = "safety_checker.json"
FORMAT = "g4v_jax.safety_checker"


class SafetyChecker(nnx.Module):
    """diffusers' ``StableDiffusionSafetyChecker``; attribute names mirror its state-dict keys."""

    def __init__(self, vision_cfg: VisionConfig, projection_dim: int, *, num_concepts: int = NUM_CONCEPTS,
                 num_special: int = NUM_SPECIAL, param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
        if vision_cfg.temporal_adapter or vision_cfg.post_layernorm_all_tokens:
            raise ValueError("the safety checker's vision tower is a plain HF CLIP ViT: temporal_adapter and "
                             "post_layernorm_all_tokens must be off")
        self.vision_cfg = vision_cfg
        self.projection_dim = projection_dim
        self.vision_model = CLIPVisionTower(vision_cfg, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.visual_projection = Dense(vision_cfg.hidden_size, projection_dim, ("embed", None), use_bias=False,
                                       param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        # frozen tensors, kept as nnx.Param so that one save/load/assign path covers them; the real values come from
        # the checkpoint. Fresh: random embeddings, thresholds 1 (cosines <= 1, so a fresh checker flags nothing).
        self.concept_embeds = param(rngs, normal_init(1.0), (num_concepts, projection_dim), (None, None),
                                    jnp.float32)
        self.special_care_embeds = param(rngs, normal_init(1.0), (num_special, projection_dim), (None, None),
                                         jnp.float32)
        self.concept_embeds_weights = param(rngs, ones_init, (num_concepts,), (None,), jnp.float32)
        self.special_care_embeds_weights = param(rngs, ones_init, (num_special,), (None,), jnp.float32)

    @property
    def image_size(self) -> int:
        return self.vision_cfg.image_size

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(N, S, S, 3) uint8 or float [0, 1] -> (special_cos (N, 3), concept_cos (N, 17)), float32. Traceable."""
        pooled = self.vision_model(images[:, None]).pooled[:, 0]
        embeds = self.visual_projection(pooled).astype(jnp.float32)
        return (cosine_distance(embeds, self.special_care_embeds[...]),
                cosine_distance(embeds, self.concept_embeds[...]))

    def scores(self, images, *, batch_size: int = 16) -> dict[str, np.ndarray]:
        """Score (N, S, S, 3) images (uint8, or float in [0, 1]) at the checker's image size.

        Returns NumPy arrays: ``concept_scores`` (N, 17) and ``special_scores`` (N, 3) as diffusers computes them
        (rounded to 3 decimals, adjustment included), ``flagged`` (N,) bool (diffusers' ``has_nsfw_concepts``), and
        the unrounded cosines ``concept_cos`` / ``special_cos``. Runs jitted in chunks of ``min(N, batch_size)``
        images, the last chunk zero-padded: one compiled program per chunk size.
        """
        images = _validated_images(images, self.image_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = images.shape[0]
        chunk = min(n, batch_size)
        special, concept = [], []
        for start in range(0, n, chunk):
            part = images[start:start + chunk]
            real = part.shape[0]
            if real < chunk:
                part = np.concatenate([part, np.zeros((chunk - real, *part.shape[1:]), part.dtype)])
            with jax.default_matmul_precision("highest"):
                s, c = _cosines(self, jnp.asarray(part))
            special.append(np.asarray(s)[:real])
            concept.append(np.asarray(c)[:real])
        special_cos, concept_cos = np.concatenate(special), np.concatenate(concept)
        out = safety_scores(special_cos, concept_cos, np.asarray(self.special_care_embeds_weights[...]),
                            np.asarray(self.concept_embeds_weights[...]))
        return {**out, "special_cos": special_cos, "concept_cos": concept_cos}


@nnx.jit
def _cosines(checker: SafetyChecker, images: jax.Array):
    return checker(images)


def cosine_distance(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """diffusers' ``cosine_distance`` (which is a cosine similarity): rows L2-normalised as
    ``torch.nn.functional.normalize`` does (norm clamped at 1e-12), then ``a @ b.T``."""
    def normalize(x):
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    return jnp.dot(normalize(image_embeds), normalize(text_embeds).T, precision=jax.lax.Precision.HIGHEST)


def safety_scores(special_cos: np.ndarray, concept_cos: np.ndarray, special_weights: np.ndarray,
                  concept_weights: np.ndarray) -> dict[str, np.ndarray]:
    """diffusers' ``StableDiffusionSafetyChecker.forward`` decision on given cosines, vectorised over images, in the
    same float32 NumPy arithmetic (see the module docstring)."""
    special_cos = np.asarray(special_cos, np.float32)
    concept_cos = np.asarray(concept_cos, np.float32)
    special_weights = np.asarray(special_weights, np.float32)
    concept_weights = np.asarray(concept_weights, np.float32)
    adjustment = np.zeros(special_cos.shape[0], np.float32)
    special = np.empty_like(special_cos)
    for k in range(special_cos.shape[1]):  # sequential: a hit raises the adjustment for the special scores after it
        special[:, k] = np.round(special_cos[:, k] - special_weights[k] + adjustment, 3)
        adjustment = np.where(special[:, k] > 0, np.float32(SPECIAL_ADJUSTMENT), adjustment)
    concept = np.round(concept_cos - concept_weights + adjustment[:, None], 3)
    return {"concept_scores": concept, "special_scores": special, "flagged": np.any(concept > 0, axis=1)}


def _validated_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 as is; finite float in [0, 1] as float32; anything else a ValueError that says what is wrong."""
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    finite = np.isfinite(images)
    if not finite.all():
        bad = np.unique(np.nonzero(~finite)[0])
        raise ValueError(f"images contain NaN or inf (image indices {bad.tolist()[:10]}); refusing to score "
                         "corrupt frames")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"float images must lie in [0, 1], got values in [{lo:g}, {hi:g}] (uint8 frames are "
                         "taken as [0, 255])")
    return images.astype(np.float32)


def _check_shape(images: np.ndarray, what: str) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{what} must be (N, H, W, 3) RGB, got shape {images.shape}")
    if 0 in images.shape:
        raise ValueError(f"no {what} to check: shape {images.shape}")


def _validated_images(images, size: int) -> np.ndarray:
    """(N, size, size, 3) uint8 or finite float in [0, 1]."""
    images = np.asarray(images)
    _check_shape(images, "images")
    if images.shape[1:3] != (size, size):
        raise ValueError(f"images are {images.shape[1]}x{images.shape[2]} but the safety checker expects "
                         f"{size}x{size}; resize and center-crop them with g4v_jax.data.video.resize_center_crop "
                         "(flag_video does this itself)")
    return _validated_pixels(images)


# ----------------------------------------------------------------------------------------------------------------------
# GPT4Video's per-video rule
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VideoVerdict:
    flagged: bool  # the video is unsafe: flagged_frames > max_flagged_fraction * total
    flagged_frames: int
    total: int
    frame_flags: tuple[bool, ...] = ()  # per frame, in input order


def flag_video(checker: SafetyChecker, frames, *, max_flagged_fraction: float = 0.4,
               batch_size: int = 16) -> VideoVerdict:
    """Check every frame of a (T, H, W, 3) video (uint8, or float in [0, 1]); flag the video when *more than*
    ``max_flagged_fraction`` of its frames are flagged.

    GPT4Video's release samples 10 frames of a generated video, runs the SD safety checker on them and calls the
    video unsafe when ``sum(has_nsfw_concept) > 4``, i.e. 5 or more of 10: ``count > 0.4 * total`` here. Sampling is
    the caller's (pass the 10 frames). Frames not at the checker's size are resized (short side, bicubic) and
    center-cropped as CLIP's image processor does.
    """
    if not 0.0 <= max_flagged_fraction < 1.0:
        raise ValueError(f"max_flagged_fraction must be in [0, 1), got {max_flagged_fraction}")
    frames = np.asarray(frames)
    _check_shape(frames, "frames")
    frames = _validated_pixels(frames)
    size = checker.image_size
    if frames.shape[1:3] != (size, size):
        if frames.dtype != np.uint8:  # quantise as the image processor does (PIL images are uint8)
            frames = np.round(frames * 255.0).astype(np.uint8)
        frames = np.stack([resize_center_crop(f, size) for f in frames])
    flags = checker.scores(frames, batch_size=batch_size)["flagged"]
    count, total = int(flags.sum()), int(flags.shape[0])
    return VideoVerdict(flagged=count > max_flagged_fraction * total, flagged_frames=count, total=total,
                        frame_flags=tuple(bool(f) for f in flags))


# ----------------------------------------------------------------------------------------------------------------------
# our directory format: safety_checker.safetensors + safety_checker.json
# ----------------------------------------------------------------------------------------------------------------------


def save_safety_checker(checker: SafetyChecker, directory: str | Path, *, source: str | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = named_params(checker)
    meta = {
        "format": FORMAT,
        "vision": dataclasses.asdict(checker.vision_cfg),
        "projection_dim": checker.projection_dim,
        "num_concepts": int(params["concept_embeds"].shape[0]),
        "num_special": int(params["special_care_embeds"].shape[0]),
    }
    if source is not None:
        meta["source"] = source
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    write_safetensors(directory / WEIGHTS_FILE, {k: np.asarray(v) for k, v in params.items()},
                      metadata={"format": FORMAT})
    return directory


def load_safety_checker(path: str | Path) -> SafetyChecker:
    """A converted checker directory (``python -m convert.sd_safety_checker SRC DST``) -> ``SafetyChecker`` (fp32)."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: convert a diffusers safety checker with "
                                    "`python -m convert.sd_safety_checker SRC DST` first")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_file} is not a g4v_jax safety checker config (format {meta.get('format')!r})")
    vision_cfg = VisionConfig(**meta["vision"])
    target = nnx.eval_shape(lambda: SafetyChecker(vision_cfg, meta["projection_dim"],
                                                  num_concepts=meta.get("num_concepts", NUM_CONCEPTS),
                                                  num_special=meta.get("num_special", NUM_SPECIAL),
                                                  rngs=nnx.Rngs(0)))
    return assign_params(target, read_safetensors(weights), str(weights))
