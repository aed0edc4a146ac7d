"""Text-to-video metrics (paper Table 3: FID and CLIPSIM on MSR-VTT) as a command: CLIPSIM, FD-CLIP and FID.

(~550 lines: the three metrics share the frame reading and the CLIP features; the Inception network is its own file.)

    python -m g4v_jax.eval.t2v --clip CLIP_DIR --data gen.jsonl --out OUT [--inception PATH] [--frames N] \\
        [--batch-frames 64] [--tokenizer DIR] [--method NAME] [--inception-device cpu] \\
        [--inception-resize center_crop|stretch]

``CLIP_DIR`` is an HF ``CLIPModel`` directory (``config.json`` + safetensors, e.g. openai/clip-vit-base-patch32),
converted on load by ``convert.hf_clip_text.load_hf_clip``; its tokenizer files are read from the same directory
unless ``--tokenizer`` names another (``g4v_jax.data.tokenizer.load_tokenizer``: local files only).

Data (JSONL, one object per line; paths relative to the file's directory, or absolute)::

    {"id": "v1", "prompt": "a cat plays the piano", "video": "gen/v1.mp4", "reference": "real/video7010.mp4"}

``id`` (default: the line number) and ``reference`` are optional, but references come on every line or on none.
``read_t2v_data`` checks every line (and that each file exists) before any model is loaded; errors name file:line.
Videos are written by ``g4v_jax.t2v.write_videos`` (or anything FFmpeg decodes).

Frames
    Every metric uses the same frames of a video: all its decoded frames (the default), or with ``--frames N`` N
    frames sampled uniformly by ``g4v_jax.data.video.sample_frame_indices`` (the middle frame of each of N equal
    segments; a video with fewer than N frames gives all of its frames, none repeated). The same rule applies to
    reference videos. Frames are decoded at their own resolution (the chosen frames of one video are held at once,
    so ``--frames`` also bounds memory on long reference videos) and then prepared per network: CLIP geometry
    (``resize_center_crop``: bicubic short side to the CLIP image size, centre crop) for CLIP, and
    ``g4v_jax.eval.inception.inception_input`` (centre square or whole frame, antialiased bicubic to 299 x 299,
    float in [0, 255]) for Inception.

Metrics (the definitions below are written into every report, ``METRICS``)

* **CLIPSIM** (Wu et al., GODIVA; the definition NExT-GPT and GPT4Video report for text-to-video): for each video,
  the mean over its frames of the cosine similarity between the prompt's CLIP text embedding and the frame's CLIP
  image embedding (both after their projections). Reported here as the raw cosine in [-1, 1]: some papers scale it
  by 100 or clamp it at 0 — do that yourself when comparing with them. The report gives the mean over videos and
  the population standard deviation (ddof=0) over videos.
* **FD-CLIP**: the Fréchet distance between Gaussians fitted to two sets of CLIP image features,
  ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})``, with ``mu`` the mean and ``S`` the unbiased covariance
  (ddof=1) of the projected (not normalised) image embeddings of all generated frames and of all reference frames.
  It is the FID formula on CLIP features instead of Inception-v3 pool features, so its values are *not* FID values
  and are never reported as FID.
* **FID**: the same Fréchet distance on the features of the user-supplied TorchScript Inception network
  (``--inception``, e.g. NVIDIA's ``inception-2015-12-05.pt``: its 2048-d pool features), generated frames against
  reference frames, frame by frame (not a video-level FVD). The report records the file and its sha256: the value
  is FID only if that file is the FID Inception network. FID is biased upwards on small sets (a Gaussian fitted to
  fewer frames than feature dimensions has a singular covariance): compare values computed on the same number of
  frames.

``score_videos`` is the in-memory CLIPSIM of a list of arrays; ``evaluate`` streams videos from disk (only one
batch of prepared frames is held at a time) and computes everything the command reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import av
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from g4v_jax.convert.hf_clip_text import load_hf_clip
from g4v_jax.data.io import read_records, record_id, resolve_video_path
from g4v_jax.data.tokenizer import load_tokenizer
from g4v_jax.data.video import VideoReadError, resize_center_crop, sample_frame_indices
from g4v_jax.eval.inception import InceptionNetwork, RESIZE_MODES, inception_features, inception_input, load_inception
from g4v_jax.eval.qa import sha256_of
from g4v_jax.eval.report import markdown_table as markdown_table_of, write_report as write_report_files

FD_CLIP = "FD-CLIP"
FID = "FID"

METRICS = {
    "clipsim": "mean over videos of per-video CLIPSIM; per-video CLIPSIM = mean over the video's frames of the cosine "
               "similarity between the prompt's CLIP text embedding and the frame's CLIP image embedding (both "
               "projected); raw cosine in [-1, 1], not scaled by 100, not clamped",
    "clipsim_std": "population standard deviation (ddof=0) of per-video CLIPSIM over the videos",
    "fd_clip": "FD-CLIP (NOT FID): Frechet distance |mu_g - mu_r|^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2)) between "
               "Gaussians fitted (mean, unbiased covariance) to the projected CLIP image embeddings of all generated "
               "frames (g) and of all reference frames (r)",
    "fid": "FID: the same Frechet distance on the features of the Inception network named in the report (file and "
           "sha256), all generated frames vs all reference frames, frame level; frames given to the network as "
           "float32 NCHW RGB in [0, 255] at 299x299 (see the report's inception.input)",
}


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


def _feature_frechet(feats_a, feats_b, name: str) -> float:
    """Fréchet distance between Gaussians fitted (mean, unbiased covariance) to feature sets (Na, D) and (Nb, D)."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{name} needs two (N, D) feature sets of the same width, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError(f"{name} needs at least 2 features per set to fit a covariance, got {len(a)} and {len(b)}")
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def fd_clip(feats_a, feats_b) -> float:
    """FD-CLIP between two sets of CLIP image features (Na, P) and (Nb, P) (not FID: see the module docstring)."""
    return _feature_frechet(feats_a, feats_b, FD_CLIP)


def fid(feats_a, feats_b) -> float:
    """FID between two sets of Inception pool features (Na, D) and (Nb, D). Call it only on features of the FID
    Inception network (``g4v_jax.eval.inception``); on any other features the value is not FID."""
    return _feature_frechet(feats_a, feats_b, FID)


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


def _batched(fn: Callable[..., np.ndarray], arrays: Sequence[np.ndarray], batch: int, *, pad: bool) -> np.ndarray:
    """``fn`` over leading-axis chunks of ``batch`` rows of ``arrays`` (all the same length), outputs concatenated.
    ``pad``: the last chunk is filled up to ``batch`` by repeating its last row and the extra outputs dropped, so a
    jitted ``fn`` compiles one program (repeating a real row, unlike zeros, never feeds a fully masked text row)."""
    n = len(arrays[0])
    out = []
    for i in range(0, n, batch):
        parts = [a[i:i + batch] for a in arrays]
        real = len(parts[0])
        if pad and real < batch:
            parts = [np.concatenate([p, np.repeat(p[-1:], batch - real, axis=0)]) for p in parts]
        out.append(np.asarray(fn(*parts))[:real])
    return np.concatenate(out)


def clip_text_embeddings(clip_model, tokenizer: Callable, prompts: Sequence[str], *, batch: int = 64) -> np.ndarray:
    """(N, P) projected CLIP text embeddings of ``prompts`` (float32), in jitted batches of ``batch`` prompts."""
    ids, mask = _tokenize(tokenizer, prompts, clip_model.text_cfg.max_position_embeddings)
    with jax.default_matmul_precision("highest"):
        return _batched(lambda i, m: text_features(clip_model, jnp.asarray(i), jnp.asarray(m)), [ids, mask],
                        min(batch, len(ids)), pad=True)


def clip_image_embeddings(clip_model, frames: np.ndarray, *, batch: int = 64) -> np.ndarray:
    """(N, P) projected CLIP image embeddings (float32) of uint8 frames already at the CLIP size (N, S, S, 3)."""
    with jax.default_matmul_precision("highest"):
        return _batched(lambda x: image_features(clip_model, jnp.asarray(x)), [frames], batch, pad=True)


def score_videos(clip_model, tokenizer: Callable, prompts: Sequence[str], videos: Sequence,
                 *, batch_frames: int = 64) -> np.ndarray:
    """Per-video CLIPSIM (N,) of ``videos`` (each (T, H, W, 3), uint8 or float [0, 1]; T may differ) against
    ``prompts``, with a ``CLIPModel`` and its tokenizer. Matmuls run at full fp32 precision."""
    if len(prompts) != len(videos):
        raise ValueError(f"{len(prompts)} prompts but {len(videos)} videos")
    if not prompts:
        return np.zeros((0,), np.float64)
    text = clip_text_embeddings(clip_model, tokenizer, prompts, batch=len(prompts))
    frames = [_frames_at(v, clip_model.image_size) for v in videos]
    allf = np.concatenate(frames)
    feats = clip_image_embeddings(clip_model, allf, batch=min(len(allf), batch_frames))
    return _per_video_clipsim(text, feats, [len(f) for f in frames])


def _per_video_clipsim(text: np.ndarray, frame_feats: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """CLIPSIM of video i = its ``counts[i]`` consecutive rows of ``frame_feats`` against ``text[i]``."""
    out, start = [], 0
    for i, n in enumerate(counts):
        out.append(clipsim(text[i:i + 1], frame_feats[None, start:start + n])[0])
        start += n
    return np.asarray(out)


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------

DATA_KEYS = ("id", "prompt", "video", "reference")


class T2VDataError(ValueError):
    """A text-to-video data file that does not fit the schema, or a video in it that cannot be read; names file:line."""


@dataclasses.dataclass(frozen=True)
class T2VItem:
    id: str
    prompt: str
    video: str  # resolved path of the generated video
    reference: str | None  # resolved path of the real video, or None
    where: str  # "file:line", for error messages


def _video_field(raw: Mapping, key: str, base: Path, where: str) -> str:
    value = raw[key]
    if not isinstance(value, str) or not value.strip():
        raise T2VDataError(f"{where}: \"{key}\" must be a non-empty path, got {value!r}")
    path = resolve_video_path(value, base)
    if not os.path.isfile(path):
        raise T2VDataError(f"{where}: {key} file {path!r} not found")
    return path


def read_t2v_data(path: str | os.PathLike) -> list[T2VItem]:
    """Every line of a text-to-video JSONL file (module docstring), validated, with paths resolved and checked to
    exist; ``T2VDataError`` names file:line and the problem."""
    base = Path(path).parent
    items: list[T2VItem] = []

    def parse(raw: Mapping, where: str, lineno: int) -> T2VItem:
        for key in ("prompt", "video"):
            if key not in raw:
                raise T2VDataError(f"{where}: missing \"{key}\"")
        prompt = raw["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise T2VDataError(f"{where}: \"prompt\" must be a non-empty string, got {prompt!r}")
        vid = record_id(raw, lineno, where, T2VDataError)
        video = _video_field(raw, "video", base, where)
        reference = _video_field(raw, "reference", base, where) if "reference" in raw else None
        if items and (reference is None) != (items[0].reference is None):
            raise T2VDataError(f"{where}: {'no' if reference is None else 'a'} \"reference\" here but "
                               f"{'one' if reference is None else 'none'} on {items[0].where}; give references on "
                               "every line or on none")
        items.append(T2VItem(vid, prompt.strip(), video, reference, where))
        return items[-1]

    return read_records(path, parse, error=T2VDataError, kind="data", noun="videos", keys=DATA_KEYS)


_AV_ERRORS = (av.error.FFmpegError, OSError, EOFError, ValueError, RuntimeError)


def _decoded_frames(path: str):
    """The decoded ``av.VideoFrame``s of the first video stream of ``path``."""
    with av.open(path) as container:
        if not container.streams.video:
            raise VideoReadError(f"{path!r}: contains no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield from container.decode(stream)


def read_video_frames(path: str | os.PathLike, num_frames: int | None = None) -> np.ndarray:
    """uint8 RGB (T, H, W, 3) at the video's own resolution: every decoded frame (``num_frames`` None), or
    ``num_frames`` sampled by ``sample_frame_indices`` over the decoded frames (counted by a first decoding pass, so
    the count is exact even where the container's metadata is not). ``VideoReadError`` names the path and cause."""
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 or None, got {num_frames}")
    src = os.fspath(path)
    if not os.path.isfile(src):
        raise VideoReadError(f"{src!r}: no such file")
    frames = []
    try:
        if num_frames is None:
            frames = [f.to_ndarray(format="rgb24") for f in _decoded_frames(src)]
        else:
            wanted = sample_frame_indices(sum(1 for _ in _decoded_frames(src)), num_frames)
            keep, last = set(wanted.tolist()), int(wanted[-1]) if len(wanted) else -1
            for i, f in enumerate(_decoded_frames(src)):
                if i > last:
                    break
                if i in keep:
                    frames.append(f.to_ndarray(format="rgb24"))
    except VideoReadError:
        raise
    except _AV_ERRORS as e:
        raise VideoReadError(f"{src!r}: decoding failed: {type(e).__name__}: {e}") from e
    if not frames:
        raise VideoReadError(f"{src!r}: no decodable frames")
    return np.stack(frames)


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------


class _StreamedFeatures:
    """Features of frames that arrive video by video, computed in batches of ``batch`` frames so that only one batch
    of prepared frames is held at a time (``pad``: see ``_batched``)."""

    def __init__(self, extract: Callable[[np.ndarray], np.ndarray], batch: int, *, pad: bool) -> None:
        self._extract, self._batch, self._pad = extract, batch, pad
        self._pending: list[np.ndarray] = []
        self._num_pending = 0
        self._done: list[np.ndarray] = []

    def add(self, frames: np.ndarray) -> None:
        self._pending.append(frames)
        self._num_pending += len(frames)
        if self._num_pending >= self._batch:
            pending = np.concatenate(self._pending)
            full = len(pending) - len(pending) % self._batch
            self._done.append(_batched(self._extract, [pending[:full]], self._batch, pad=False))
            self._pending, self._num_pending = [pending[full:]], len(pending) - full

    def result(self) -> np.ndarray:
        if self._num_pending:
            self._done.append(_batched(self._extract, [np.concatenate(self._pending)], self._batch, pad=self._pad))
            self._pending, self._num_pending = [], 0
        return np.concatenate(self._done)


def _read_item_video(item: T2VItem, field: str, num_frames: int | None) -> np.ndarray:
    try:
        return read_video_frames(getattr(item, field), num_frames)
    except VideoReadError as e:
        raise T2VDataError(f"{item.where}: {field}: {e}") from e


def evaluate(items: Sequence[T2VItem], clip_model, tokenizer: Callable, *, num_frames: int | None = None,
             batch_frames: int = 64, inception: InceptionNetwork | None = None,
             inception_resize: str = "center_crop", progress: bool = False) -> tuple[dict, list[dict]]:
    """The metrics of the module docstring over ``items`` and one record per video: (metrics, records).

    FD-CLIP (and FID, with ``inception``) need references on the items; without them those metrics are None."""
    if not items:
        raise ValueError("evaluate needs at least one item")
    if batch_frames < 1:
        raise ValueError(f"batch_frames must be >= 1, got {batch_frames}")
    if inception_resize not in RESIZE_MODES:
        raise ValueError(f"inception_resize must be one of {RESIZE_MODES}, got {inception_resize!r}")
    has_refs = all(it.reference is not None for it in items)
    if not has_refs and any(it.reference is not None for it in items):
        raise T2VDataError("give a reference video for every item or for none")
    if inception is not None and not has_refs:
        raise T2VDataError("FID compares generated frames with reference frames: every line needs a \"reference\"")
    size = clip_model.image_size

    def clip_stream() -> _StreamedFeatures:
        return _StreamedFeatures(lambda x: clip_image_embeddings(clip_model, x, batch=batch_frames), batch_frames,
                                 pad=True)

    def inception_stream() -> _StreamedFeatures:
        return _StreamedFeatures(lambda x: inception_features(inception, x), batch_frames, pad=False)

    to_clip = lambda frames: _frames_at(frames, size)
    streams = {"video": [(clip_stream(), to_clip)]}
    if has_refs:
        streams["reference"] = [(clip_stream(), to_clip)]
    if inception is not None:
        for field in streams:
            streams[field].append((inception_stream(), lambda v: inception_input(v, inception_resize)))
    counts: dict[str, list[int]] = {field: [] for field in streams}
    for item in tqdm(items, desc="videos", disable=not progress):
        for field, consumers in streams.items():
            frames = _read_item_video(item, field, num_frames)
            counts[field].append(len(frames))
            for stream, prepare in consumers:
                stream.add(prepare(frames))
    feats = {field: [stream.result() for stream, _ in consumers] for field, consumers in streams.items()}

    text = clip_text_embeddings(clip_model, tokenizer, [it.prompt for it in items], batch=batch_frames)
    per_video = _per_video_clipsim(text, feats["video"][0], counts["video"])
    metrics: dict[str, Any] = {
        "n": len(items), "generated_frames": int(sum(counts["video"])),
        "reference_frames": int(sum(counts["reference"])) if has_refs else None,
        "clipsim": float(per_video.mean()), "clipsim_std": float(per_video.std()),
        "fd_clip": fd_clip(feats["video"][0], feats["reference"][0]) if has_refs else None,
        "fid": fid(feats["video"][1], feats["reference"][1]) if inception is not None else None,
        "inception_feature_dim": int(feats["video"][1].shape[1]) if inception is not None else None,
    }
    records = [{"id": it.id, "prompt": it.prompt, "video": it.video, "reference": it.reference,
                "frames": counts["video"][i], "reference_frames": counts["reference"][i] if has_refs else None,
                "clipsim": float(per_video[i])} for i, it in enumerate(items)]
    return metrics, records


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def _inception_info(net: InceptionNetwork, resize: str, feature_dim: int | None) -> dict:
    geometry = ("centre square of each frame (side = short side)" if resize == "center_crop"
                else "whole frame, aspect ratio not kept")
    return {"path": net.path, "sha256": net.sha256, "call": net.call, "device": net.device, "resize": resize,
            "feature_dim": feature_dim,
            "input": f"float32 NCHW RGB in [0, 255], 299x299: {geometry}, resized with torch interpolate "
                     "(bicubic, antialias=True, align_corners=False), clamped to [0, 255], not re-quantised"}


def build_report(*, clip: str | os.PathLike, data: str | os.PathLike, items: Sequence[T2VItem], metrics: Mapping,
                 records: Sequence[Mapping], num_frames: int | None, inception: InceptionNetwork | None = None,
                 inception_resize: str = "center_crop") -> dict:
    computed = {"clipsim", "clipsim_std"} | ({"fd_clip"} if metrics.get("fd_clip") is not None else set()) \
        | ({"fid"} if metrics.get("fid") is not None else set())
    return {"clip": str(clip),
            "inception": (_inception_info(inception, inception_resize, metrics.get("inception_feature_dim"))
                          if inception is not None else None),
            "data": str(data), "data_sha256": sha256_of(data), "samples": len(items),
            "frames_per_video": num_frames if num_frames is not None else "all",
            "metric_definitions": {k: v for k, v in METRICS.items() if k in computed},
            "metrics": dict(metrics), "records": [dict(r) for r in records]}


def markdown_table(report: Mapping, method: str) -> str:
    """``| Method | N | CLIPSIM | FD-CLIP | FID |``, with "—" for what was not computed."""
    m = report["metrics"]
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    return markdown_table_of(["Method", "N", "CLIPSIM", FD_CLIP, FID],
                             [[method, m["n"], f"{m['clipsim']:.4f} ± {m['clipsim_std']:.4f}", fmt(m["fd_clip"]),
                               fmt(m["fid"])]])


def write_report(report: Mapping, out: str | os.PathLike, method: str) -> str:
    """``OUT/report.json`` and ``OUT/report.md``; returns the Markdown table."""
    m, inc = report["metrics"], report["inception"]
    frames = report["frames_per_video"]
    lines = [f"Data: `{report['data']}` (sha256 {report['data_sha256']}), {report['samples']} videos, "
             f"{'all frames' if frames == 'all' else f'{frames} frames sampled uniformly'} per video "
             f"({m['generated_frames']} generated frames"
             + (f", {m['reference_frames']} reference frames)." if m["reference_frames"] is not None else ")."),
             f"CLIP: `{report['clip']}`. CLIPSIM is mean ± std over videos (raw cosine).",
             f"{FD_CLIP}: " + ("generated vs reference frames on CLIP image features; not FID."
                               if m["fd_clip"] is not None else "not computed (no reference videos)."),
             f"{FID}: " + (f"Inception network `{inc['path']}` (sha256 {inc['sha256']}), called as `{inc['call']}`; "
                           f"input {inc['input']}." if inc else "not computed (no --inception network).")]
    return write_report_files(report, out, title="Text-to-video generation", table=markdown_table(report, method),
                              after=lines)


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m g4v_jax.eval.t2v", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", required=True, help="HF CLIPModel directory (config.json + safetensors)")
    ap.add_argument("--data", required=True, help="JSONL of {id, prompt, video, reference?}")
    ap.add_argument("--out", required=True, help="directory for report.json and report.md")
    ap.add_argument("--inception", default=None,
                    help="TorchScript Inception network (e.g. NVIDIA's inception-2015-12-05.pt); enables FID")
    ap.add_argument("--frames", type=int, default=None,
                    help="frames per video, sampled uniformly (default: every decoded frame)")
    ap.add_argument("--batch-frames", type=int, default=64, help="frames per CLIP / Inception batch")
    ap.add_argument("--tokenizer", default=None, help="CLIP tokenizer directory (default: --clip)")
    ap.add_argument("--method", default=None, help="row name in report.md (default: the data file's name)")
    ap.add_argument("--inception-device", default="cpu",
                    help="torch device for the Inception network (cuda shares the GPU with JAX, which preallocates "
                         "most of its memory: set XLA_PYTHON_CLIENT_MEM_FRACTION=.5 or similar)")
    ap.add_argument("--inception-resize", choices=RESIZE_MODES, default="center_crop",
                    help="center_crop: centre square of each frame; stretch: whole frame (clean-fid)")
    args = ap.parse_args(argv)
    if args.frames is not None and args.frames < 1:
        ap.error(f"--frames must be >= 1, got {args.frames}")
    if args.batch_frames < 1:
        ap.error(f"--batch-frames must be >= 1, got {args.batch_frames}")
    try:
        items = read_t2v_data(args.data)
        inception = None
        if args.inception:
            if items[0].reference is None:
                raise T2VDataError(f"{args.data}: --inception needs a \"reference\" video on every line (FID "
                                   "compares generated frames with reference frames)")

            inception = load_inception(args.inception, args.inception_device)
        clip_model = load_hf_clip(args.clip)
        tokenizer = load_tokenizer(args.tokenizer or args.clip)
        metrics, records = evaluate(items, clip_model, tokenizer, num_frames=args.frames,
                                    batch_frames=args.batch_frames, inception=inception,
                                    inception_resize=args.inception_resize, progress=True)
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")
    report = build_report(clip=args.clip, data=args.data, items=items, metrics=metrics, records=records,
                          num_frames=args.frames, inception=inception, inception_resize=args.inception_resize)
    print(write_report(report, args.out, args.method or Path(args.data).stem))


if __name__ == "__main__":
    main()
