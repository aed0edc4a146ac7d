"""Cache of frozen vision-tower outputs for stage 1 (``data.vision_cache``).

In stage 1 the CLIP tower is frozen, so every epoch recomputes the same (T, 1 + N, Dv) features per video. Building
the cache runs the tower once per distinct video and stores its output; training then reads features instead of
decoding frames and runs only the abstractor and the LLM. The features are the tower's own output in its compute
dtype, so the cached path trains on the same numbers as the uncached one.

    python -m g4v_jax.data.feature_cache --config CONFIG [key=value ...]     # uses data.train_manifest,
                                                                            # train.init_from, data.vision_cache
Layout: ``<cache>/meta.json`` (tower config, frames, image size, feature shape/dtype and a digest of the tower's
weights, so a cache built by another tower is refused) and one ``<sha1 of the video's absolute path>.npz`` per video
with ``features`` (T, 1 + N, Dv) and ``frame_mask`` (T,). A video that cannot be decoded gets no entry, and training
skips it exactly as it skips an unreadable video without the cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from g4v_jax.config import load_config
from g4v_jax.data.io import resolve_video_path
from g4v_jax.data.manifest import Example, read_manifest
from g4v_jax.data.video import VideoReadError, load_video
from g4v_jax.weights import load as load_model_dir

META = "meta.json"


def entry_path(cache_dir: str | Path, video_path: str) -> Path:
    # abspath also folds "a/../b": two manifests that spell one file differently share its entry
    key = hashlib.sha1(os.path.abspath(video_path).encode()).hexdigest()
    return Path(cache_dir) / f"{key}.npz"


def tower_digest(vision_model) -> str:
    """A short digest of the vision tower's weights."""
    h = hashlib.sha256()
    _, state = nnx.split(vision_model, nnx.Param)
    for path, var in sorted(nnx.to_flat_state(state), key=lambda pv: str(pv[0])):
        h.update(str(path).encode())
        h.update(np.ascontiguousarray(np.asarray(var.get_value(), np.float32)).tobytes())
    return h.hexdigest()[:16]


def read_meta(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / META
    if not path.is_file():
        raise FileNotFoundError(f"{cache_dir} is not a vision-feature cache ({META} missing); build it with "
                                "python -m g4v_jax.data.feature_cache --config ...")
    return json.loads(path.read_text())


def load_entry(cache_dir: str | Path, video_path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(features (T, 1 + N, Dv), frame_mask (T,)) or None when the video had no entry (unreadable)."""
    path = entry_path(cache_dir, video_path)
    if not path.is_file():
        return None
    with np.load(path) as z:
        return z["features"], z["frame_mask"]


def build_feature_cache(vision_model, examples: list[Example], manifest_dir: str | Path, cache_dir: str | Path, *,
                        num_frames: int, image_size: int, batch_size: int = 8, progress: bool = True,
                        sampling: str = "uniform_mid", resize: str = "short_side_crop") -> dict:
    """Run ``vision_model`` once over every distinct video of ``examples``; returns counts."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    videos = sorted({resolve_video_path(v, manifest_dir) for ex in examples for v in ex.videos})
    graphdef, state = nnx.split(vision_model)

    @jax.jit
    def features(state, frames, mask):
        return nnx.merge(graphdef, state)(frames, mask).last_hidden_state

    todo = [v for v in videos if not entry_path(cache_dir, v).is_file()]
    unreadable, shape, dtype = 0, None, None
    for start in tqdm(range(0, len(todo), batch_size), desc="vision features", disable=not progress, unit="batch"):
        clips, paths = [], []
        for path in todo[start:start + batch_size]:
            try:
                clips.append(load_video(path, num_frames=num_frames, size=image_size, sampling=sampling,
                                        resize=resize))
                paths.append(path)
            except VideoReadError:
                unreadable += 1
        if not clips:
            continue
        n = len(clips)
        frames = np.stack([c.frames for c in clips] + [clips[0].frames] * (batch_size - n))  # one compiled shape
        mask = np.stack([c.frame_mask for c in clips] + [clips[0].frame_mask] * (batch_size - n))
        out = np.asarray(features(state, frames[:, :], mask))[:n]
        shape, dtype = out.shape[1:], str(out.dtype)
        for path, feats, clip in zip(paths, out, clips):
            np.savez(entry_path(cache_dir, path), features=feats, frame_mask=clip.frame_mask)
    meta = {"num_frames": num_frames, "image_size": image_size, "tower": tower_digest(vision_model),
            "vision": dataclasses.asdict(vision_model.cfg)}
    if shape is not None:
        meta.update(feature_shape=list(shape), dtype=dtype)
    elif (cache_dir / META).is_file():
        old = read_meta(cache_dir)
        meta.update(feature_shape=old.get("feature_shape"), dtype=old.get("dtype"))
    (cache_dir / META).write_text(json.dumps(meta, indent=1))
    return {"videos": len(videos), "computed": len(todo) - unreadable, "unreadable": unreadable}


def check_cache(cache_dir: str | Path, vision_model, *, num_frames: int, image_size: int) -> dict:
    """The cache's meta, after checking it was built by this tower with these frame settings."""
    meta = read_meta(cache_dir)
    want = {"num_frames": num_frames, "image_size": image_size, "tower": tower_digest(vision_model)}
    wrong = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if wrong:
        raise ValueError(f"vision cache {cache_dir} was built with other settings (cache, run): {wrong}; rebuild it")
    return meta


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not (cfg.data.vision_cache and cfg.data.train_manifest and cfg.train.init_from):
        sys.exit("error: set data.vision_cache, data.train_manifest and train.init_from")
    model = load_model_dir(cfg.train.init_from)
    examples = read_manifest(cfg.data.train_manifest)
    counts = build_feature_cache(model.vision_model, examples, Path(cfg.data.train_manifest).parent,
                                 cfg.data.vision_cache, num_frames=cfg.model.num_frames,
                                 image_size=cfg.model.vision.image_size, batch_size=args.batch_size,
                                 sampling=cfg.model.video.sampling, resize=cfg.model.video.resize)
    print(f"vision cache {cfg.data.vision_cache}: {counts}")


if __name__ == "__main__":
    main()
