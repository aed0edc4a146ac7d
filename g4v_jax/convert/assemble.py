"""A CLIP vision tower + a LLaMA -> a GPT4Video model directory, ready for stage 1 (the Video-ChatGPT / LLaVA route).

    python -m convert.assemble --vision CLIP_SRC --llm LLAMA_SRC DST
        [--abstractor paper|mplug_owl_video|qformer|st_pool] [--qformer-from BLIP2_SRC] [--seed 0] [key=value ...]

``CLIP_SRC`` is an HF ``CLIPVisionModel`` / ``CLIPModel`` directory or one of ours (``convert.hf_clip``'s output);
``LLAMA_SRC`` an HF ``LlamaForCausalLM`` directory or one of ours (``convert.hf_llama``'s). DST receives a
``kind: gpt4video`` directory: the tower's and the LLM's weights as they are, a fresh video abstractor as wide as
the tower (``convert.hf_clip.abstractor_for_tower``) whose projection maps to the LLM's width, LoRA adapters per
``model.lora.*`` (B = 0, so the LLM's logits are unchanged), CLIP's frame preprocessing (``model.video``), and the
LLaMA's tokenizer files. ``--abstractor`` picks one of the paper's Table 5 modules (``model.abstractor.variant``);
with ``qformer``, ``--qformer-from`` starts the Q-Former from a BLIP-2 checkpoint's (``convert.hf_blip2``), sized as
that one. Train it with its own config, which the directory carries:

    python -m g4v_jax.train --config DST/config.yaml train=train/stage1.yaml train.init_from=DST \\
        data.train_manifest=... train.output_dir=runs/stage1
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from g4v_jax.config import ABSTRACTOR_VARIANTS, Config, load_config, parse_overrides
from g4v_jax.convert.common import print_load_hint, run_converter
from g4v_jax.convert.hf_blip2 import load_hf_qformer, read_qformer_config
from g4v_jax.convert.hf_clip import abstractor_for_tower, load_hf_clip_vision
from g4v_jax.convert.hf_llama import load_hf_llama
from g4v_jax.data.tokenizer import copy_tokenizer_files
from g4v_jax.models.gpt4video import build_model
from g4v_jax.weights import (CONFIG_FILE, assign_params, load, load_model_config, named_params, param_shapes,
                             save_pretrained)


def _is_ours(src: Path) -> bool:
    return (src / CONFIG_FILE).is_file()


def _tower(src: Path):
    """(VisionConfig, video config or None, {name: array} of the tower) from an HF CLIP or one of our directories."""
    if _is_ours(src):
        cfg = load_model_config(src).model
        if cfg.kind not in ("video_encoder", "gpt4video"):
            raise ValueError(f"--vision {src} holds a {cfg.kind!r} model, not a vision tower")
        params = named_params(load(src).vision_model)
        return cfg.vision, cfg.video, params

    vision_cfg, tower = load_hf_clip_vision(src, progress=True)
    return vision_cfg, None, named_params(tower)


def _llm(src: Path):
    """(LlamaConfig, {name: array} of the LLM's base weights) from an HF LLaMA or one of our directories."""
    if _is_ours(src):
        cfg = load_model_config(src).model
        if cfg.kind != "llm":
            raise ValueError(f"--llm {src} holds a {cfg.kind!r} model, not a language model (kind llm)")
        model = load(src)
    else:
        cfg, model = load_hf_llama(src, progress=True)
    return cfg.llm, {k: v for k, v in named_params(model).items() if ".lora_" not in k}


def assemble(vision: str | Path, llm: str | Path, dst: str | Path, *, abstractor: str = "paper",
             overrides=(), seed: int = 0, qformer_from: str | Path | None = None) -> Path:
    """Write the GPT4Video directory ``dst`` (module docstring); returns it."""
    vision, llm = Path(vision), Path(llm)
    if qformer_from is not None and abstractor != "qformer":
        raise ValueError(f"--qformer-from needs --abstractor qformer, not {abstractor}")
    sources = [("--vision", vision), ("--llm", llm)]
    if qformer_from is not None:
        sources.append(("--qformer-from", Path(qformer_from)))
    for flag, path in sources:
        if not path.is_dir():
            raise FileNotFoundError(f"{flag} {path}: no such directory")
    vision_cfg, video_cfg, tower = _tower(vision)
    llm_cfg, llm_params = _llm(llm)  # its adapters (if any) are dropped: the new model's come from model.lora.*
    base = load_config({"model": "model/clip_vit_l14.yaml"},
                       ["model.kind=gpt4video", f"model.abstractor.variant={abstractor}",
                        # store full precision; g4v_jax.load(dir, ["model.param_dtype=bfloat16"]) casts later
                        "model.param_dtype=float32", "model.compute_dtype=float32", *overrides])
    abstractor_cfg = abstractor_for_tower(base.model.abstractor, vision_cfg, overrides)
    if qformer_from is not None:
        abstractor_cfg = read_qformer_config(qformer_from, abstractor_cfg, vision_cfg.hidden_size)
    cfg = dataclasses.replace(
        base.model, vision=vision_cfg, llm=llm_cfg, llm_hidden_size=llm_cfg.hidden_size, abstractor=abstractor_cfg,
        video=video_cfg if video_cfg is not None and "video" not in parse_overrides(overrides).get("model", {})
        else base.model.video)
    model = build_model(cfg, seed=seed)
    params = {k: np.asarray(v) for k, v in named_params(model).items()}
    params.update({f"vision_model.{k}": np.asarray(v) for k, v in tower.items()})
    params.update({f"language_model.{k}": np.asarray(v) for k, v in llm_params.items()})
    if qformer_from is not None:
        shapes = {k: s for k, (s, _) in param_shapes(model).items() if k.startswith("abstractor.")}
        params.update(load_hf_qformer(qformer_from, shapes, progress=True))
    model = assign_params(model, params, f"{vision} + {llm}")
    out = save_pretrained(model, Config(model=cfg), dst)
    copied = copy_tokenizer_files(llm, out)
    fresh = f"from {qformer_from}" if qformer_from is not None else "fresh"
    print(f"vision tower from {vision}, LLM from {llm}; abstractor ({abstractor}, width {cfg.abstractor.hidden_size} "
          f"-> {cfg.llm_hidden_size}) {fresh}, LoRA adapters fresh (seed {seed}); tokenizer: "
          f"{', '.join(copied) if copied else 'none found beside the LLM: copy its files into ' + str(out)}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m convert.assemble", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vision", required=True, help="HF CLIP (vision) directory, or ours from g4v_jax.convert.hf_clip")
    ap.add_argument("--llm", required=True, help="HF LLaMA directory, or ours from g4v_jax.convert.hf_llama")
    ap.add_argument("dst")
    ap.add_argument("--abstractor", default="paper", choices=list(ABSTRACTOR_VARIANTS))
    ap.add_argument("--qformer-from", default=None, help="a BLIP-2 (or Blip2QFormerModel) directory whose Q-Former "
                    "starts ours (with --abstractor qformer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="model config overrides, e.g. model.lora.rank=8 "
                                                 "model.abstractor.num_layers=6")
    args = ap.parse_intermixed_args(argv)
    dst = run_converter("convert.assemble", assemble, args.vision, args.llm, args.dst, abstractor=args.abstractor,
                        overrides=args.overrides, seed=args.seed, qformer_from=args.qformer_from)
    print_load_hint(Path(dst))
    print(f"train it:\n\n    python -m g4v_jax.train --config {dst}/config.yaml train=train/stage1.yaml "
          f"train.init_from={dst} data.train_manifest=... train.output_dir=...\n")


if __name__ == "__main__":
    main()
