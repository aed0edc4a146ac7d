"""diffusers ``StableDiffusionSafetyChecker`` -> g4v_jax ``SafetyChecker``.

    python -m convert.sd_safety_checker SRC DST

SRC is a diffusers safety checker directory (e.g. CompVis/stable-diffusion-safety-checker, or the ``safety_checker/``
folder of a Stable Diffusion pipeline; a pipeline root that holds one is accepted too): ``config.json`` (a CLIPConfig
with ``vision_config`` and ``projection_dim``) and ``model.safetensors`` or ``pytorch_model.bin``. DST receives
``safety_checker.safetensors`` + ``safety_checker.json``, loadable with ``g4v_jax.safety.load_safety_checker(DST)``.

Tensor names: ``concept_embeds``, ``special_care_embeds``, ``concept_embeds_weights``,
``special_care_embeds_weights``, ``visual_projection.weight`` and the CLIP vision tower under
``vision_model.vision_model.`` (transformers 4 and the released checkpoints) or ``vision_model.`` (transformers 5 saves
a nested ``CLIPVisionModel`` flattened). Text-tower fields of the config are ignored; the checkpoint has no text tower.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping

import numpy as np
from flax import nnx

from g4v_jax.convert.common import (convert_checkpoint, linear, module_name, open_checkpoint, read_hf_config, rename,
                            run_converter)
from g4v_jax.convert.hf_clip import clip_vision_rules, vision_config_from_hf
from g4v_jax.safety.checker import SafetyChecker, save_safety_checker
from g4v_jax.weights import assign_params, param_shapes

EMBEDDING_KEYS = ("concept_embeds", "special_care_embeds", "concept_embeds_weights", "special_care_embeds_weights")
# buffers, skipped on purpose (older transformers saved the position ids)
SAFETY_IGNORE = (r"position_ids$",)


def safety_checker_rules(vision_prefix: str = "vision_model.vision_model."):
    """Key map of diffusers' ``StableDiffusionSafetyChecker`` onto our ``SafetyChecker`` (same attribute names)."""
    return [
        *clip_vision_rules(ours="vision_model.", theirs=vision_prefix),
        *linear("visual_projection", "visual_projection", bias=False),
        *(rename(k, k) for k in EMBEDDING_KEYS),
    ]


def _vision_prefix(tensors: Mapping[str, np.ndarray]) -> str:
    nested = "vision_model.vision_model."
    return nested if any(k.startswith(nested) for k in tensors) else "vision_model."


def _checker_dir(src: Path) -> Path:
    """SRC itself, or the ``safety_checker/`` folder of a diffusers pipeline directory."""
    if src.is_dir() and not (src / "config.json").is_file() and (src / "safety_checker" / "config.json").is_file():
        return src / "safety_checker"
    return src


def load_sd_safety_checker(src: str | Path, *, progress: bool = False) -> SafetyChecker:
    """Convert a diffusers safety checker directory into a ready ``SafetyChecker`` (fp32)."""
    src = _checker_dir(Path(src))
    if not src.exists():
        raise FileNotFoundError(f"safety checker {src} does not exist")
    hf = read_hf_config(src)
    if "vision_config" not in hf:
        raise ValueError(f"{src}/config.json is not a CLIPConfig (no vision_config): is {src} a diffusers "
                         "safety_checker directory?")
    vision_cfg = vision_config_from_hf(hf)
    projection_dim = hf.get("projection_dim", 512)  # CLIPConfig's default
    tensors = open_checkpoint(src)
    target = nnx.eval_shape(lambda: SafetyChecker(vision_cfg, projection_dim, rngs=nnx.Rngs(0)))
    shapes = {k: s for k, (s, _) in param_shapes(target).items()}
    arrays = convert_checkpoint(tensors, safety_checker_rules(_vision_prefix(tensors)), shapes, source=str(src),
                                ignore=SAFETY_IGNORE, progress=progress)
    return assign_params(target, arrays, str(src))


def convert(src: str | Path, dst: str | Path) -> Path:
    checker = load_sd_safety_checker(src, progress=True)
    return save_safety_checker(checker, dst, source=str(src))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog=f"python -m {module_name(convert)}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="diffusers safety_checker directory (or a pipeline directory that has one)")
    ap.add_argument("dst", help="output directory")
    args = ap.parse_args(argv)
    dst = run_converter(module_name(convert), convert, args.src, args.dst)
    print(f"wrote {dst}. Load it with:\n\n"
          "    from g4v_jax.safety import flag_video, load_safety_checker\n"
          f"    checker = load_safety_checker({str(dst)!r})\n"
          "    verdict = flag_video(checker, frames)   # (T, H, W, 3) uint8 -> VideoVerdict(flagged, ...)\n")


if __name__ == "__main__":
    main()
