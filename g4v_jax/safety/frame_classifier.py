"""A small learned frame classifier: the input-side detector for domains without a pretrained safety checker.

GPT4Video screens input videos with a separate detector (paper §4.3; the release uses the Stable Diffusion safety
checker, ``g4v_jax.safety.checker``). That checker needs pretrained CLIP weights and a concept list; a model trained
from scratch on its own domain (the synthetic world, ``g4v_jax.world``) has neither, so it learns its detector from
labelled videos instead. ``FrameClassifier`` has the same ``image_size`` / ``scores(frames, batch_size)`` surface
as ``SafetyChecker``, so ``checker.flag_video`` and the gates of ``g4v_jax.safety.gates`` use either unchanged:

    clf = train_frame_classifier(frames, labels, image_size=32)     # frames (N, H, W, 3) uint8, labels (N,) bool
    gate = make_video_gate(clf)                                       # path -> flagged (> 40% of frames flagged)
    save_frame_classifier(clf, "ckpt/detector"); clf = load_frame_classifier("ckpt/detector")

The network: two stride-2 3x3 convolutions (ReLU), global average pooling, a linear logit; trained with AdamW on
binary cross-entropy. A frame is flagged when its probability exceeds ``threshold`` (0.5).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from g4v_jax.data.video import resize_center_crop

WEIGHTS_FILE = "frame_classifier.safetensors"
CONFIG_FILE = "frame_classifier.json"


@dataclasses.dataclass(frozen=True)
class FrameClassifierConfig:
    image_size: int = 32
    channels: tuple[int, int] = (16, 32)
    threshold: float = 0.5


class FrameClassifier(nnx.Module):
    """(N, S, S, 3) uint8 frames -> (N,) logits of "harmful"."""

    def __init__(self, cfg: FrameClassifierConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        c1, c2 = cfg.channels
        self.conv1 = nnx.Conv(3, c1, (3, 3), strides=(2, 2), rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), strides=(2, 2), rngs=rngs)
        self.head = nnx.Linear(c2, 1, rngs=rngs)

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    def __call__(self, frames: jax.Array) -> jax.Array:
        x = frames.astype(jnp.float32) / 127.5 - 1.0
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        return self.head(x.mean(axis=(1, 2)))[:, 0]

    def scores(self, frames: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
        """Per-frame ``{"probability", "flagged"}`` for (N, S, S, 3) uint8 frames at ``image_size``."""
        frames = np.asarray(frames)
        probs = [np.asarray(_probabilities(self, jnp.asarray(frames[i:i + batch_size])))
                 for i in range(0, len(frames), batch_size)]
        p = np.concatenate(probs) if probs else np.zeros((0,), np.float32)
        return {"probability": p, "flagged": p > self.cfg.threshold}


@nnx.jit
def _probabilities(model: FrameClassifier, frames: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(model(frames))


def _resized(frames: np.ndarray, size: int) -> np.ndarray:
    if frames.shape[1:3] == (size, size):
        return frames

    return np.stack([resize_center_crop(f, size) for f in frames])


def train_frame_classifier(frames: np.ndarray, labels: np.ndarray, *, image_size: int = 32, steps: int = 300,
                           batch_size: int = 64, learning_rate: float = 3e-3, seed: int = 0,
                           progress: bool = False) -> FrameClassifier:
    """Fit a ``FrameClassifier`` to (N, H, W, 3) uint8 frames and their (N,) bool labels (balanced batches)."""
    frames, labels = np.asarray(frames), np.asarray(labels, bool)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (N, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if labels.shape != frames.shape[:1]:
        raise ValueError(f"{len(frames)} frames but labels of shape {labels.shape}")
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    if not len(pos) or not len(neg):
        raise ValueError(f"need frames of both classes, got {len(pos)} harmful and {len(neg)} safe")
    frames = _resized(frames, image_size)
    model = FrameClassifier(FrameClassifierConfig(image_size=image_size), rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adamw(learning_rate), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(m):
            return optax.sigmoid_binary_cross_entropy(m(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    half = batch_size // 2
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc="detector", unit="step", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        idx = np.concatenate([rng.choice(pos, half), rng.choice(neg, batch_size - half)])
        loss = step(model, optimizer, jnp.asarray(frames[idx]), jnp.asarray(labels[idx], jnp.float32))
        bar.set_postfix(loss=f"{float(loss):.4f}")
    return model


def save_frame_classifier(model: FrameClassifier, directory: str | Path) -> Path:
    from safetensors.numpy import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    flat = {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    save_file(flat, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.cfg), indent=1))
    return out


def load_frame_classifier(directory: str | Path) -> FrameClassifier:
    from safetensors.numpy import load_file

    d = Path(directory)
    if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{d} is not a frame classifier directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    raw = json.loads((d / CONFIG_FILE).read_text())
    cfg = FrameClassifierConfig(**{**raw, "channels": tuple(raw["channels"])})
    model = FrameClassifier(cfg, rngs=nnx.Rngs(0))
    saved = load_file(str(d / WEIGHTS_FILE))
    params = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(params)
    expected = {".".join(map(str, k)): v for k, v in flat}
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    bad = [f"{k}: {saved[k].shape} vs {expected[k].get_value().shape}" for k in expected
           if k in saved and saved[k].shape != expected[k].get_value().shape]
    if missing or unexpected or bad:
        raise ValueError(f"{d / WEIGHTS_FILE} does not fit the config: missing {missing}, unexpected {unexpected}, "
                         f"shape mismatches {bad}")
    for k, v in flat:
        v.set_value(jnp.asarray(saved[".".join(map(str, k))]))
    nnx.update(model, params)
    return model
