"""CLIP ViT frames/s: ours (``CLIPVisionTower``, normalisation included) beside HF ``CLIPVisionModel``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common import Context, Suite, attention_flops, layer_matmul_params, sync, paired, torch_dtype

ORDER = 50  # where the group's rows stand in the table


def rows(ctx: Context) -> list[dict]:
    ctx.release_models()  # not needed here
    return [vit_row(ctx.suite, ctx.tmp, ctx.reps)]


def vit_row(suite: Suite, tmp: Path, reps: int) -> dict:
    """CLIP ViT on ``vit_frames`` frames: ours (``CLIPVisionTower``, normalisation included) beside HF
    ``CLIPVisionModel`` (sdpa) on the same weights and pixels."""
    import jax
    import torch
    from flax import nnx
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from g4v_jax.convert.hf_clip import load_hf_clip_vision
    from g4v_jax.models.clip_vit import normalize_frames

    torch.manual_seed(0)
    with torch.device(suite.device):
        hf = CLIPVisionModel(CLIPVisionConfig(**suite.vit, attn_implementation="sdpa")).to(torch_dtype(suite)).eval()
    hf.save_pretrained(tmp / "vit")
    _, tower = load_hf_clip_vision(tmp / "vit", dtype=suite.dtype)
    frames, size = suite.vit_frames, suite.vit["image_size"]
    pixels = np.random.default_rng(0).random((1, frames, size, size, 3), dtype=np.float32)
    graphdef, state = nnx.split(tower)
    encode = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x).last_hidden_state)
    normalized = (torch.from_numpy(np.asarray(normalize_frames(pixels[0]))).permute(0, 3, 1, 2).contiguous()
                  .to(suite.device, torch_dtype(suite)))

    def peer():
        with torch.no_grad():
            out = hf(pixel_values=normalized).last_hidden_state
        sync(suite)
        return out

    diff = float(np.abs(np.asarray(encode(state, pixels), np.float32)[0] - peer().float().cpu().numpy()).max())
    t_ours, t_peer = paired(lambda: encode(state, pixels).block_until_ready(), peer, reps)
    width, patch = suite.vit["hidden_size"], suite.vit["patch_size"]
    patches = (size // patch) ** 2
    heads = suite.vit["num_attention_heads"]
    layers = suite.vit["num_hidden_layers"]
    per_frame = (2 * (patches + 1) * layers * layer_matmul_params(width, heads, heads, width // heads,
                                                                  suite.vit["intermediate_size"], glu=False)
                 + attention_flops(1, patches + 1, layers, width) + 2 * patches * 3 * patch * patch * width)
    return {"work": f"CLIP ViT ({width} wide, {layers} layers, patch {patch}), {frames} frames", "unit": "frames/s",
            "ours": frames / t_ours, "peer": frames / t_peer, "flops": per_frame, "max_abs_diff": diff}
