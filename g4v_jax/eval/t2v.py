"""Text-to-video metrics on CLIP features: CLIPSIM and FD-CLIP.

* **CLIPSIM** (Wu et al., GODIVA; the definition NExT-GPT and GPT4Video report for text-to-video): for each video,
  the mean over its frames of the cosine similarity between the prompt's CLIP text embedding and the frame's CLIP
  image embedding (both after their projections). Reported here as the raw cosine in [-1, 1]: some papers scale it
  by 100 or clamp it at 0 — do that yourself when comparing with them.
* **FD-CLIP**: the Fréchet distance between Gaussians fitted to two sets of CLIP image features,
  ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})``. It is the FID formula on CLIP features instead of
  Inception-v3 pool features, so its values are *not* FID values and must not be reported as FID.

``score_videos`` runs a ``g4v_jax.models.clip_text.CLIPModel`` (``convert.hf_clip_text.load_hf_clip``) over prompts
and their generated videos.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FD_CLIP = "FD-CLIP"


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def clipsim(text_embeds, frame_embeds, frame_mask=None) -> np.ndarray:
    """Per-video CLIPSIM: ``text_embeds`` (N, P), ``frame_embeds`` (N, T, P) -> (N,) mean over frames of
    cos(text, frame). ``frame_mask`` (N, T) bool excludes padded frames from the mean."""
    t = _normalize(np.asarray(text_embeds, np.float64))
    f = _normalize(np.asarray(frame_embeds, np.float64))
    if t.ndim != 2 or f.ndim != 3 or f.shape[0] != t.shape[0] or f.shape[2] != t.shape[1]:
        raise ValueError(f"clipsim needs text (N, P) and frames (N, T, P), got {t.shape} and {f.shape}")
    cos = np.einsum("np,ntp->nt", t, f)
    if frame_mask is None:
        return cos.mean(axis=1)
    m = np.asarray(frame_mask, bool)
    if m.shape != cos.shape:
        raise ValueError(f"frame_mask must be {cos.shape}, got {m.shape}")
    if not m.any(axis=1).all():
        raise ValueError("every video needs at least one unmasked frame")
    return (cos * m).sum(axis=1) / m.sum(axis=1)


def _sqrtm_product(s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """A square root of ``s1 @ s2`` (both symmetric PSD), float64."""
    try:
        from scipy.linalg import sqrtm
    except ImportError:  # sqrt(S1 S2) has the same trace as sqrt(S1^1/2 S2 S1^1/2), which is symmetric PSD
        w, v = np.linalg.eigh(s1)
        r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        w2, v2 = np.linalg.eigh(r1 @ s2 @ r1)
        return (v2 * np.sqrt(np.clip(w2, 0, None))) @ v2.T
    out = sqrtm(s1 @ s2)
    if not np.isfinite(out).all():  # singular product: offset the diagonals as pytorch-fid does
        eps = 1e-6 * np.eye(s1.shape[0])
        out = sqrtm((s1 + eps) @ (s2 + eps))
    if np.iscomplexobj(out):
        out = out.real  # tiny imaginary parts from numerical error
    return out


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    diff = mu1 - mu2
    covmean = _sqrtm_product(s1, s2)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fd_clip(feats_a, feats_b) -> float:
    """FD-CLIP between two sets of CLIP image features (Na, P) and (Nb, P) (not FID: see the module docstring)."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{FD_CLIP} needs two (N, P) feature sets of the same width, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError(f"{FD_CLIP} needs at least 2 features per set to fit a covariance")
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def _tokenize(tokenizer: Callable, prompts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """An HF CLIP tokenizer (or anything called the same way) -> (ids, mask), padded to ``max_length``."""
    enc = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np")
    ids = np.asarray(enc["input_ids"])
    mask = np.asarray(enc["attention_mask"]) if "attention_mask" in enc else np.ones_like(ids)
    return ids, mask


def _frames_at(video, size: int) -> np.ndarray:
    """(T, H, W, 3) uint8 or float [0, 1] -> (T, size, size, 3), resized and center-cropped as CLIP expects."""
    v = np.asarray(video)
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"each video must be (T, H, W, 3) RGB, got shape {v.shape}")
    if v.shape[1:3] == (size, size):
        return v
    from g4v_jax.data.video import resize_center_crop

    if v.dtype != np.uint8:
        v = np.clip(np.round(v * 255.0), 0, 255).astype(np.uint8)
    return np.stack([resize_center_crop(f, size) for f in v])


@nnx.jit
def text_features(clip_model, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Jitted ``CLIPModel.get_text_features``: (B, L) -> (B, P)."""
    return clip_model.get_text_features(input_ids, attention_mask)


@nnx.jit
def image_features(clip_model, images: jax.Array) -> jax.Array:
    """Jitted ``CLIPModel.get_image_features``: (N, S, S, 3) -> (N, P)."""
    return clip_model.get_image_features(images)


def score_videos(clip_model, tokenizer: Callable, prompts: Sequence[str], videos: Sequence,
                 *, batch_frames: int = 64) -> np.ndarray:
    """Per-video CLIPSIM (N,) of ``videos`` (each (T, H, W, 3), uint8 or float [0, 1]; T may differ) against
    ``prompts``, with a ``CLIPModel`` and its tokenizer. Matmuls run at full fp32 precision."""
    if len(prompts) != len(videos):
        raise ValueError(f"{len(prompts)} prompts but {len(videos)} videos")
    if not prompts:
        return np.zeros((0,), np.float64)
    ids, mask = _tokenize(tokenizer, prompts, clip_model.text_cfg.max_position_embeddings)
    size = clip_model.image_size
    frames = [_frames_at(v, size) for v in videos]
    with jax.default_matmul_precision("highest"):
        text = np.asarray(text_features(clip_model, jnp.asarray(ids), jnp.asarray(mask)))
        allf = np.concatenate(frames)
        n = len(allf)
        chunk = min(n, batch_frames)
        feats = []
        for i in range(0, n, chunk):  # fixed chunk size, last one zero-padded: one compiled program
            part = allf[i:i + chunk]
            real = len(part)
            if real < chunk:
                part = np.concatenate([part, np.zeros((chunk - real, *part.shape[1:]), part.dtype)])
            feats.append(np.asarray(image_features(clip_model, jnp.asarray(part)))[:real])
    feats = np.concatenate(feats)
    out, start = [], 0
    for i, f in enumerate(frames):
        out.append(clipsim(text[i:i + 1], feats[None, start:start + len(f)])[0])
        start += len(f)
    return np.asarray(out)
