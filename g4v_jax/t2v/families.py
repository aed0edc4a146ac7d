"""Text-to-video model families as data: each diffusers pipeline's call conventions, read from its own code and docs.

The paper's §3.2 claim is that any text-to-video model renders what the LLM writes. In practice each family has its
own rules, and breaking one crashes deep inside diffusers or silently returns another shape. ``Family`` holds them:

| family | pipeline | frames | size multiple | defaults (frames, HxW, steps, CFG, fps) |
|---|---|---|---|---|
| zeroscope | ``TextToVideoSDPipeline`` (ZeroScope v2, ModelScope) | any | 8 | 24, 320x576, 40, 9.0, 8 |
| animatediff | ``AnimateDiffPipeline`` (SD 1.5 + a motion adapter) | <= 32 | 8 | 16, 512x512, 25, 7.5, 8 |
| wan | ``WanPipeline`` (Wan 2.1 / 2.2 T2V) | 4k+1 | 16 | 81, 480x832, 50, 5.0, 16 |
| ltx | ``LTXPipeline`` (LTX-Video) | 8k+1 | 32 | 161, 480x704, 50, 3.0, 24 |
| cogvideox | ``CogVideoXPipeline`` (CogVideoX-2B / 5B) | 8k+1 | 16 | 49, 480x720, 50, 6.0, 8 |

Where each rule comes from (diffusers 0.42.1):
- Wan: ``num_frames % vae_scale_factor_temporal != 1`` is rounded down with a warning; ``height % 16`` (8x VAE, 2x2
  patches) raises.
- LTX-Video: ``height % 32`` raises; the latent has ``(F - 1) // 8 + 1`` frames, so any other count silently comes
  back as the 8k+1 below it (12 requested, 9 returned).
- CogVideoX: ``check_inputs`` asks only ``% 8``, but the transformer's 2x2 patches need 16 (24x24 fails inside the
  patch embedding); the VAE decodes latent frames two at a time after the first, so only 8k+1 frames come back as
  asked (21 requested, 24 returned). Trained at 49 (2B, 5B); CogVideoX 1.5 (81 frames, 768x1360) is the same class.
- AnimateDiff: frames beyond the motion module's positional table fail inside the UNet; ``height % 8`` raises.
- ZeroScope: ``height % 8`` raises (``TextToVideoSDPipeline`` is in ``pipelines/deprecated`` since 0.33; it works).
The frame step and the size the model's structure needs are read from the loaded pipeline (``frame_step_from``,
``size_from``: products of attributes), so a checkpoint with another VAE gets its own numbers; the size rule is the
least common multiple of that and the multiple the pipeline's own ``check_inputs`` demands (``size_multiple``).

Prompts: the release's LLM writes short captions; CogVideoX, Wan and LTX-Video were trained on long descriptive ones.
``PromptTemplate`` (prefix, suffix, a token budget in the model's own tokenizer) adapts one answer to each model
without retraining the LLM; truncation is reported, never silent. The defaults add nothing: a template is a choice
(README shows one), and the paper's ZeroScope takes the caption as written.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from g4v_jax.t2v.base import T2VSettings

__all__ = ["FAMILIES", "GENERIC", "Family", "PromptTemplate", "Rules", "family_for_pipeline", "fit_settings",
           "read_rules"]


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """``prefix + caption + suffix``, at most ``max_tokens`` tokens of the model's tokenizer (special tokens counted;
    None: the pipeline's own text length). Over budget, whole words are dropped from the caption's end."""

    prefix: str = ""
    suffix: str = ""
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        for field in ("prefix", "suffix"):
            if not isinstance(getattr(self, field), str):
                raise TypeError(f"PromptTemplate.{field} must be a str, got {getattr(self, field)!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"PromptTemplate.max_tokens must be an int >= 1 or None, got {self.max_tokens!r}")

    def apply(self, caption: str) -> str:
        return f"{self.prefix}{caption}{self.suffix}"


@dataclasses.dataclass(frozen=True)
class Family:
    """One text-to-video family's conventions (module docstring).

    ``frame_step``: valid frame counts are ``frame_step * k + 1`` (1: any count); ``size_multiple``: what the
    pipeline's ``check_inputs`` demands of height and width. ``*_from`` name attributes of the loaded pipeline
    (dotted, ``config`` included; a tuple value counts by its last entry) whose product is the number the model's
    structure needs: it replaces the documented frame step and is combined (lcm) with ``size_multiple``.
    ``text_length`` is passed as ``max_sequence_length`` (T5 families: an int, or an attribute path when the
    transformer fixes it); None: the tokenizer's own length (CLIP, 77). ``fps_argument``: the call
    argument that tells the model its frame rate. ``keep_fp32``: components kept in float32 whatever the dtype.
    """

    name: str
    title: str
    pipelines: tuple[str, ...]
    settings: T2VSettings
    fps: int
    frame_step: int = 1
    frame_step_from: tuple[str, ...] = ()
    size_multiple: int = 8
    size_from: tuple[str, ...] = ()
    max_frames_from: str | None = None
    text_length: int | str | None = None
    fps_argument: str | None = None
    cuda_dtype: str = "float16"
    keep_fp32: tuple[str, ...] = ()
    prompt: PromptTemplate = PromptTemplate()


WAN_NEGATIVE = ("Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
                "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra "
                "fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused "
                "fingers, still picture, messy background, three legs, many people in the background, walking "
                "backwards")  # the negative prompt of diffusers' WanPipeline example (Wan's own, translated)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("zeroscope", "ZeroScope v2 / ModelScope (the paper's renderer)", ("TextToVideoSDPipeline",),
           T2VSettings(num_frames=24, height=320, width=576, steps=40, guidance_scale=9.0), fps=8,
           size_from=("vae_scale_factor",)),
    Family("animatediff", "AnimateDiff (a Stable Diffusion 1.5 checkpoint + a motion adapter)",
           ("AnimateDiffPipeline",),
           T2VSettings(num_frames=16, height=512, width=512, steps=25, guidance_scale=7.5,
                       negative_prompt="bad quality, worse quality"), fps=8,
           size_from=("vae_scale_factor",), max_frames_from="unet.config.motion_max_seq_length"),
    Family("wan", "Wan 2.1 / 2.2 text-to-video (1.3B, 14B)", ("WanPipeline",),
           T2VSettings(num_frames=81, height=480, width=832, steps=50, guidance_scale=5.0,
                       negative_prompt=WAN_NEGATIVE), fps=16,
           frame_step=4, frame_step_from=("vae_scale_factor_temporal",),
           size_multiple=16, size_from=("vae_scale_factor_spatial", "transformer.config.patch_size"),
           text_length=512, cuda_dtype="bfloat16", keep_fp32=("vae",)),
    Family("ltx", "LTX-Video", ("LTXPipeline",),
           T2VSettings(num_frames=161, height=480, width=704, steps=50, guidance_scale=3.0,
                       negative_prompt="worst quality, inconsistent motion, blurry, jittery, distorted"), fps=24,
           frame_step=8, frame_step_from=("vae_temporal_compression_ratio", "transformer_temporal_patch_size"),
           size_multiple=32, size_from=("vae_spatial_compression_ratio", "transformer_spatial_patch_size"),
           text_length=128, fps_argument="frame_rate", cuda_dtype="bfloat16"),
    Family("cogvideox", "CogVideoX-2B / 5B (and 1.5)", ("CogVideoXPipeline",),
           T2VSettings(num_frames=49, height=480, width=720, steps=50, guidance_scale=6.0), fps=8,
           frame_step=8, frame_step_from=("vae_scale_factor_temporal", "vae.num_latent_frames_batch_size"),
           size_from=("vae_scale_factor_spatial", "transformer.config.patch_size"),
           text_length="transformer.config.max_text_seq_length", cuda_dtype="bfloat16"),
)}

# Any other diffusers text-to-video pipeline: no rule is known, so nothing is adjusted and diffusers' own checks speak.
GENERIC = Family("generic", "another diffusers text-to-video pipeline", (), T2VSettings(), fps=8, size_multiple=1)


def family_for_pipeline(class_name: str) -> Family:
    """The family whose pipeline class is ``class_name`` (from ``model_index.json``), or ``GENERIC``."""
    for family in FAMILIES.values():
        if class_name in family.pipelines:
            return family
    return GENERIC


def probe(obj: Any, path: str) -> int | None:
    """The int at the dotted attribute ``path`` of ``obj`` (a tuple counts by its last entry), or None if absent."""
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    if isinstance(obj, (tuple, list)) and obj:
        obj = obj[-1]
    return obj if isinstance(obj, int) and not isinstance(obj, bool) and obj > 0 else None


def product(obj: Any, paths: tuple[str, ...], default: int) -> int:
    """The product of the ints at ``paths`` (the documented ``default`` when any is absent or no path is given)."""
    values = [probe(obj, p) for p in paths]
    if not paths or any(v is None for v in values):
        return default
    out = 1
    for v in values:
        out *= v
    return out


@dataclasses.dataclass(frozen=True)
class Rules:
    """A loaded pipeline's rules: frames ``frame_step * k + 1`` (at most ``max_frames``), sides multiples of
    ``size_multiple``."""

    family: str
    frame_step: int = 1
    size_multiple: int = 1
    max_frames: int | None = None

    def describe(self) -> str:
        frames = "any frame count" if self.frame_step == 1 else f"{self.frame_step}k+1 frames"
        if self.max_frames is not None:
            frames += f" (at most {self.max_frames})"
        return f"{self.family}: {frames}, height and width multiples of {self.size_multiple}"


def read_rules(family: Family, pipeline: Any) -> Rules:
    """``family``'s rules with the numbers the loaded ``pipeline`` itself uses where it exposes them."""
    max_frames = probe(pipeline, family.max_frames_from) if family.max_frames_from else None
    needed = product(pipeline, family.size_from, family.size_multiple)
    return Rules(family.name, product(pipeline, family.frame_step_from, family.frame_step),
                 math.lcm(family.size_multiple, needed), max_frames)


def _nearest_frames(n: int, rules: Rules) -> int:
    step = rules.frame_step
    k = max(0, int((n - 1) / step + 0.5))  # nearest, ties up
    frames = step * k + 1
    if rules.max_frames is not None and frames > rules.max_frames:
        frames = step * ((rules.max_frames - 1) // step) + 1
    return frames


def _nearest_multiple(n: int, m: int) -> int:
    return max(m, int(n / m + 0.5) * m)


def fit_settings(settings: T2VSettings, rules: Rules, *, strict: bool = False) -> tuple[T2VSettings, tuple[str, ...]]:
    """``settings`` with frames and size moved to the nearest values ``rules`` allow, and one note per change.

    ``strict``: a change is a ``ValueError`` naming the rule and the nearest valid values instead.
    """
    frames = _nearest_frames(settings.num_frames, rules)
    height = _nearest_multiple(settings.height, rules.size_multiple)
    width = _nearest_multiple(settings.width, rules.size_multiple)
    notes = []
    if frames != settings.num_frames:
        notes.append(f"num_frames {settings.num_frames} -> {frames}")
    if (height, width) != (settings.height, settings.width):
        notes.append(f"size {settings.height}x{settings.width} -> {height}x{width}")
    if notes and strict:
        raise ValueError(f"{'; '.join(notes)} would be needed ({rules.describe()})")
    notes = [f"{n} ({rules.describe()})" for n in notes]
    return dataclasses.replace(settings, num_frames=frames, height=height, width=width), tuple(notes)
