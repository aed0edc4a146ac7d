"""Tiny random diffusers text-to-video pipelines, one per family, built offline and saved with ``save_pretrained``.

    path = build_tiny_pipeline("wan", "tmp/tiny_wan")        # a directory make_backend("diffusers", path=...) loads

For tests and for ``bench/t2v.py`` on a machine without weights: nothing is downloaded. Components are sized like
diffusers' own fast tests (``tests/pipelines/<family>/``), whose tokenizers come from the hub
(``hf-internal-testing/tiny-random-t5`` / ``tiny-random-clip``); here the tokenizers are built from a small vocabulary
of letters and a few words (a CLIP BPE one, a T5 Unigram one) so that any lower-case English prompt encodes. The
videos are noise: what these pipelines prove is the call conventions, shapes, seeds and files, not image quality.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

__all__ = ["TINY_BUILDERS", "build_tiny_pipeline"]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_WORDS = ("the", "and", "a", "on", "in", "of", "red", "green", "blue", "panda", "sea", "waves", "night", "beach",
          "square", "circle", "moves", "spins", "video", "at", "eating", "bamboo")


def _clip_tokenizer(directory: Path, max_length: int):
    """A CLIP BPE tokenizer over letters, their word-final forms and a few merges (from_pretrained: the
    ``CLIPTokenizer(vocab_file=...)`` constructor ignores its files in transformers 5)."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", *_LETTERS, *(c + "</w>" for c in _LETTERS),
              "th", "the</w>", "an", "and</w>", "in", "ing</w>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    merges = ["t h", "th e</w>", "a n", "an d</w>", "i n", "in g</w>"]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(directory, model_max_length=max_length)


def _t5_tokenizer(max_length: int):
    """A T5 (Unigram, SentencePiece-style) tokenizer: whole words where the vocabulary has them, letters otherwise."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [(c, -6.0) for c in _LETTERS] + [("\u2581" + c, -5.0) for c in _LETTERS]
    pieces += [("\u2581" + w, -2.0) for w in _WORDS if len(w) > 1]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _t5_encoder(vocab_size: int, umt5: bool = False):
    """``hf-internal-testing/tiny-random-t5``'s encoder shape (d_model 32), two layers; UMT5 (Wan's encoder) or T5."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    return model_cls(config_cls(vocab_size=vocab_size, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                decoder_start_token_id=0))


def _clip_text_encoder(vocab_size: int, hidden: int, max_positions: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=vocab_size,
                                        hidden_size=hidden, intermediate_size=37, num_attention_heads=2,
                                        num_hidden_layers=2, max_position_embeddings=max_positions,
                                        projection_dim=hidden))


def _sd_vae():
    """Stable Diffusion's image VAE (ZeroScope and AnimateDiff decode frame by frame with it), two blocks (one more
    than diffusers' tests): 32x32 frames have 16x16 latents, 4x cheaper attention."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, sample_size=32, norm_num_groups=2)


def _zeroscope(root: Path):
    from diffusers import DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel

    tokenizer = _clip_tokenizer(root / "clip_tokenizer", max_length=16)
    unet = UNet3DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=4, attention_head_dim=4, norm_num_groups=2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    return TextToVideoSDPipeline(unet=unet, vae=_sd_vae(), text_encoder=_clip_text_encoder(len(tokenizer), 4, 16),
                                 tokenizer=tokenizer, scheduler=scheduler)


def _animatediff(root: Path):
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, UNet2DConditionModel

    tokenizer = _clip_tokenizer(root / "clip_tokenizer", max_length=16)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=2)
    adapter = MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=1, motion_norm_num_groups=2,
                            motion_num_attention_heads=2, motion_max_seq_length=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False)
    return AnimateDiffPipeline(vae=_sd_vae(), text_encoder=_clip_text_encoder(len(tokenizer), 8, 16),
                               tokenizer=tokenizer, unet=unet, motion_adapter=adapter, scheduler=scheduler)


def _wan(root: Path):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    tokenizer = _t5_tokenizer(512)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)
    return WanPipeline(tokenizer=tokenizer, text_encoder=_t5_encoder(len(tokenizer), umt5=True), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), transformer=transformer)


def _ltx(root: Path):
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, \
        LTXVideoTransformer3DModel

    tokenizer = _t5_tokenizer(128)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
        cross_attention_dim=32, num_layers=1, caption_channels=32)
    # LTX-Video's own compression (patch 4, three 2x space-time steps: 32x in space, 8x in time) so that the tiny
    # pipeline obeys the real rules; diffusers' test shrinks only the encoder and leaves the decoder at 8x, 512 wide
    vae = AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False), decoder_spatio_temporal_scaling=(True, True, True, False),
        patch_size=4, patch_size_t=1, encoder_causal=True, decoder_causal=False)
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                       text_encoder=_t5_encoder(len(tokenizer)), tokenizer=tokenizer, transformer=transformer)


def _cogvideox(root: Path):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, \
        CogVideoXTransformer3DModel

    tokenizer = _t5_tokenizer(226)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=1, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=_t5_encoder(len(tokenizer)), vae=vae,
                             transformer=transformer, scheduler=CogVideoXDDIMScheduler())


# family name (``t2v.families.FAMILIES``) -> builder of the tiny pipeline object
TINY_BUILDERS: dict[str, Callable[[Path], Any]] = {
    "zeroscope": _zeroscope,
    "animatediff": _animatediff,
    "wan": _wan,
    "ltx": _ltx,
    "cogvideox": _cogvideox,
}


def build_tiny_pipeline(family: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build ``family``'s tiny random pipeline (weights from ``torch.manual_seed(seed)``), ``save_pretrained`` it to
    ``out_dir/pipeline`` and return that directory."""
    import torch

    if family not in TINY_BUILDERS:
        raise ValueError(f"no tiny pipeline for family {family!r}; known: {', '.join(TINY_BUILDERS)}")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    pipe = TINY_BUILDERS[family](root)
    path = root / "pipeline"
    pipe.save_pretrained(path)
    return path
