"""The world's vision pre-training: it stands in for the pretrained video tower the paper starts from.

GPT4Video's vision tower is a pretrained CLIP ViT-L/14 (in the released code, mPLUG-Owl-video's, whose temporal
adapters were trained on video), frozen in both stages (paper §3.1, §5.1). The world has no pretrained tower, and
training one from scratch through a frozen LLM in stage 1 leaves it blind to what the questions ask: the last run
that did so scored 0.33 on shape questions and 0.11 on motion questions (chance: 0.125). So, as stage 0 stands in for
LLaMA's pre-training, this step stands in for the tower's, and stage 1 then keeps the tower frozen as the paper does.

Contrastive video-text pre-training from scratch does not fit in minutes of a 2-core CPU, so the tower learns from
the renderer's ground truth instead, per patch token of every frame (a dense, supervised objective, like a
segmentation pre-training), seeing each clip whole through the temporal adapters (``vision.temporal_adapter``):

    every patch token -> colour, shape, size and motion of the object that covers the patch (or "none"),
                         that object's centre relative to the patch centre, its side and its rotation in this frame
    every CLS token   -> the background colour

So each token says what it shows, as a pretrained tower's features do; binding those features into what the LLM
reads (which object, which words) is left to the abstractor in stage 1. Colour, shape, size and motion are separate
targets, so a held-out (colour, shape) pair is a new combination of known features.

What the tower learns from: freshly rendered clips of every (colour, shape) pair (``rendered_clip_data``), not the
world's training videos. CLIP's web-scale data holds red triangles as surely as red circles, as LLaMA's text does
(stage 0 uses every pair for the same reason); what GPT4Video's own stages never see is those pairs in their
video-text data, so the held-out pairs stay out of stages 1 and 2 and of every video they read, and no test or
validation video is among the rendered clips. ``patch_accuracy`` measures the tower on the held-out test videos,
decoded from their mp4 as training reads them, and on the held-out pairs' patches alone (``*_held_out``).

    data = rendered_clip_data(4000, num_frames=4, size=48, patch_size=8, seed=0)      # rendered clips + targets
    heads, history = pretrain_vision_tower(model.vision_model, data, steps=600)        # trains the tower in place
    patch_accuracy(model.vision_model, heads, clip_data(world.catalogue, "test", ...))  # {"colour": ..., ...}

The read-out heads (``PretrainHeads``) are discarded afterwards, as CLIP's projection is.

Why every pair, measured (full world, seed 0, test videos' patches): trained on the training videos alone (no
held-out pair), the 64-wide tower's shape read-out followed the colour, every training colour appearing with only two
shapes: 0.28 over all test patches after 1,000 steps and 0.0-0.03 on the held-out pairs' own patches, so the abstractor
had no shape to pass on for exactly the objects the test asks about (shape QA 9-17%). On rendered clips of every pair
the tower reads the held-out objects' shapes no worse than the others'. Width decides motion (at 600 steps 64 wide:
0.42, 96: 0.83, 128: 0.89); how the tower came to read shape at all (its initialisation and step count; at 600 steps
it read 0.47, near chance): docs/world.md.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from g4v_jax.data.io import iter_jsonl, resolve_video_path
from g4v_jax.data.video import load_video
from g4v_jax.train.metrics import MetricsWriter
from g4v_jax.world.scene import (BACKGROUNDS, COLOURS, HELD_OUT_PAIRS, MOTIONS, Rendering, SHAPES, SIZES, Scene,
                                 parse_caption, random_scene, render_scene, symmetry_angle)

# a patch shows an object when at least this fraction of its pixels do (a sliver of an edge is "none")
MIN_COVER = 0.125
OBJECT_PATCH_WEIGHT = 3.0
# off: with every pair in the pre-training clips colour no longer predicts shape (see ``grayscale_some``)
GRAYSCALE_FRACTION = 0.0
GEOMETRY = ("dx", "dy", "side", "cos", "sin")  # regression targets per patch, in patch units / unit circle
TARGET_CLASSES = {"colour": 1 + len(COLOURS), "shape": 1 + len(SHAPES), "size": 1 + len(SIZES),
                  "motion": 1 + len(MOTIONS)}


@dataclasses.dataclass(frozen=True)
class ClipData:
    """Clips and their per-patch targets. G = image size // patch size; class 0 is "no object"."""

    frames: np.ndarray  # uint8 (N, T, S, S, 3): decoded from the videos as training reads them, or rendered
    colour: np.ndarray  # int32 (N, T, G*G)
    shape: np.ndarray  # int32 (N, T, G*G)
    size: np.ndarray  # int32 (N, T, G*G)
    motion: np.ndarray  # int32 (N, T, G*G)
    geometry: np.ndarray  # float32 (N, T, G*G, 5): GEOMETRY of the covering object
    geometry_mask: np.ndarray  # float32 (N, T, G*G, 5): 1 where the target exists (no rotation for circles)
    held_out: np.ndarray  # bool (N, T, G*G): the patch shows an object of a held-out (colour, shape) pair
    background: np.ndarray  # int32 (N, T)

    def __len__(self) -> int:
        return len(self.frames)

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)}


def patch_targets(scene: Scene, truth: Rendering, patch_size: int) -> dict[str, np.ndarray]:
    """Targets of the frames of one rendering (``scene.render_scene``'s owner (T, S, S), centre (N, T, 2), side and
    angle (N, T)) for a ViT with ``patch_size`` patches: every array has leading dims (T, G*G)."""
    owner, centre, side, angle = truth.owner, truth.centre, truth.side, truth.angle
    t, s, _ = owner.shape
    g = s // patch_size
    n = len(scene.objects)
    cover = np.stack([(owner == k).reshape(t, g, patch_size, g, patch_size).sum(axis=(2, 4)) for k in range(n)])
    cover = cover.reshape(n, t, g * g) / patch_size**2  # (N, T, G*G)
    best = cover.argmax(axis=0)  # (T, G*G)
    present = cover.max(axis=0) >= MIN_COVER
    pick = lambda per_object: np.asarray(per_object)[best]  # noqa: E731 - per-object value at each patch
    out = {"colour": np.where(present, pick([1 + COLOURS.index(o.colour) for o in scene.objects]), 0),
           "shape": np.where(present, pick([1 + SHAPES.index(o.shape) for o in scene.objects]), 0),
           "size": np.where(present, pick([1 + SIZES.index(o.size) for o in scene.objects]), 0),
           "motion": np.where(present, pick([1 + MOTIONS.index(o.motion) for o in scene.objects]), 0)}
    rows, cols = np.divmod(np.arange(g * g), g)
    patch_centre = (np.stack([cols, rows], axis=-1) + 0.5) * patch_size  # (G*G, 2) as (x, y)
    frame = np.arange(t)[:, None]
    obj_centre = centre[best, frame]  # (T, G*G, 2)
    # rotation modulo the shape's symmetry, on the unit circle, so a turn by a full symmetry angle looks like none
    turns = np.stack([angle[k] * 2 * math.pi / symmetry_angle(o.shape) for k, o in enumerate(scene.objects)])
    geometry = np.concatenate([(obj_centre - patch_centre) / patch_size, side[best, frame][..., None] / patch_size,
                               np.cos(turns[best, frame])[..., None], np.sin(turns[best, frame])[..., None]], -1)
    rotates = pick([o.shape != "circle" for o in scene.objects])
    mask = np.concatenate([np.repeat(present[..., None], 3, -1), np.repeat((present & rotates)[..., None], 2, -1)], -1)
    out["geometry"] = np.where(mask, geometry, 0.0)
    out["geometry_mask"] = mask
    out["held_out"] = present & pick([o.pair in HELD_OUT_PAIRS for o in scene.objects])
    return out


def _clip_data(samples, patch_size: int) -> ClipData:
    """Stack ``(scene, truth, frames)`` triples (frames uint8 (T, S, S, 3)) into a ``ClipData``."""
    parts: dict[str, list[np.ndarray]] = {f.name: [] for f in dataclasses.fields(ClipData)}
    for scene, truth, frames in samples:
        parts["frames"].append(frames)
        for k, v in patch_targets(scene, truth, patch_size).items():
            parts[k].append(v)
        parts["background"].append(np.full(len(frames), BACKGROUNDS.index(scene.background)))
    dtypes = {"frames": np.uint8, "geometry": np.float32, "geometry_mask": np.float32, "held_out": bool}
    return ClipData(**{k: np.stack(v).astype(dtypes.get(k, np.int32)) for k, v in parts.items()})


def clip_data(catalogue: str | Path, split: str, *, num_frames: int, size: int, patch_size: int,
              limit: int | None = None) -> ClipData:
    """The hazard-free videos of ``split`` in a world's ``catalogue.jsonl``, decoded from their mp4 as training
    decodes them, with the targets of their re-rendered ground truth (scene from the caption, positions from the
    row's seed; the videos must have been rendered at ``num_frames`` x ``size``)."""
    catalogue = Path(catalogue)
    rows = [row for _, row in iter_jsonl(catalogue) if row["split"] == split and not row["hazard"]][:limit]
    if not rows:
        raise ValueError(f"{catalogue} has no hazard-free videos of split {split!r}")

    def samples():
        for row in rows:
            scene = parse_caption(row["caption"])
            truth = render_scene(scene, num_frames=num_frames, size=size, seed=int(row["seed"]))
            clip = load_video(resolve_video_path(row["video"], catalogue.parent), num_frames=num_frames, size=size)
            if not clip.frame_mask.all():
                raise ValueError(f"{row['video']} has fewer than {num_frames} frames: it was not rendered for this "
                                 "model")
            yield scene, truth, clip.frames

    return _clip_data(samples(), patch_size)


def rendered_clip_data(n: int, *, num_frames: int, size: int, patch_size: int, seed: int) -> ClipData:
    """``n`` freshly rendered hazard-free scenes over every (colour, shape) pair, with their targets: the world's
    stand-in for the web-scale data CLIP learns from. CLIP has seen red triangles; what GPT4Video's own stages
    never see is the pairing of those words with those videos, so only stages 1 and 2 (and the videos behind them)
    hold pairs out, as only they do in the paper. The scenes come from their own seed stream, not from any world
    video, so no test or validation video is among them."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng([seed, 0x5EE])

    def samples():
        for _ in range(n):
            scene = random_scene(rng)
            truth = render_scene(scene, num_frames=num_frames, size=size, seed=int(rng.integers(2**31)))
            yield scene, truth, truth.frames

    return _clip_data(samples(), patch_size)


def grayscale_some(batch: dict[str, np.ndarray], rng: np.random.Generator, fraction: float) -> dict[str, np.ndarray]:
    """``batch`` with a random ``fraction`` of its clips in gray (ITU-R 601 luma) and their colour targets masked
    (``colour`` = -1: no loss). In the training videos every shape appears with only the colours its held-out pairs
    leave it, so a tower that may use colour to guess shape learns "red is never a triangle"; gray frames are meant
    to make it read the outline (random grayscale is a standard augmentation of vision pre-training). It did not
    clearly help: per-frame pre-training on 600 videos reached held-out shape accuracy 0.28 with it (600 steps) and
    0.25 without (400 steps, an earlier loss), one run each; brightness still tells the world's colours apart."""
    gray = rng.random(len(batch["frames"])) < fraction
    if not gray.any():
        return batch
    frames = batch["frames"].copy()
    luma = np.round(frames[gray].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    frames[gray] = np.repeat(luma[..., None], 3, axis=-1).astype(np.uint8)
    colour = batch["colour"].copy()
    colour[gray] = -1
    return {**batch, "frames": frames, "colour": colour}


class PretrainHeads(nnx.Module):
    """Linear read-outs of the tower's output tokens (..., 1 + G*G, D): per-patch classes and geometry, CLS ->
    background. Discarded after pre-training."""

    def __init__(self, hidden_size: int, *, rngs: nnx.Rngs):
        self.classes = nnx.Dict({k: nnx.Linear(hidden_size, n, rngs=rngs) for k, n in TARGET_CLASSES.items()})
        self.geometry = nnx.Linear(hidden_size, len(GEOMETRY), rngs=rngs)
        self.background = nnx.Linear(hidden_size, len(BACKGROUNDS), rngs=rngs)

    def __call__(self, tokens: jax.Array) -> dict[str, jax.Array]:
        patches = tokens[..., 1:, :]
        out = {k: head(patches) for k, head in self.classes.items()}
        return {**out, "geometry": self.geometry(patches), "background": self.background(tokens[..., 0, :])}


def _tokens(tower, frames: jax.Array) -> jax.Array:
    """(N, T, S, S, 3) uint8 clips -> (N, T, 1 + G*G, D)."""
    return tower(frames).last_hidden_state


def pretrain_loss(outputs: dict[str, jax.Array], batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
    """Cross-entropy of each patch class (``TARGET_CLASSES``) and of the background, plus the masked squared error of
    the geometry."""
    ce = optax.softmax_cross_entropy_with_integer_labels
    # three quarters of the patches show no object; weighting the others up keeps the loss on what is hard
    weight = jnp.where(batch["shape"] > 0, OBJECT_PATCH_WEIGHT, 1.0)
    parts = {}
    for k in TARGET_CLASSES:
        w = weight * (batch[k] >= 0)  # -1: no target (the colour of a gray frame)
        parts[k] = (ce(outputs[k], jnp.maximum(batch[k], 0)) * w).sum() / jnp.maximum(w.sum(), 1)
    parts["background"] = ce(outputs["background"], batch["background"]).mean()
    mask = batch["geometry_mask"]
    parts["geometry"] = (jnp.square(outputs["geometry"] - batch["geometry"]) * mask).sum() / jnp.maximum(mask.sum(), 1)
    return sum(parts.values()), parts


def make_step(graphdef, tx: optax.GradientTransformation) -> Callable:
    """``step(params, opt_state, batch) -> (params, opt_state, loss, parts)``, one jitted program."""

    def loss_fn(params, batch):
        tower, heads = nnx.merge(graphdef, params)
        return pretrain_loss(heads(_tokens(tower, batch["frames"])), batch)

    @jax.jit
    def step(params, opt_state, batch):
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, parts

    return step


def pretrain_vision_tower(tower: nnx.Module, data: ClipData, *, steps: int, batch_size: int = 32,
                          learning_rate: float = 2e-3, grayscale_fraction: float = GRAYSCALE_FRACTION,
                          seed: int = 0, progress: bool = True,
                          metrics_dir: str | Path | None = None) -> tuple[PretrainHeads, list[dict]]:
    """Train ``tower`` (a ``CLIPVisionTower``) in place on ``data``; returns the trained read-out heads and the
    per-step losses (also appended to ``metrics_dir/metrics.jsonl`` by ``metrics.MetricsWriter`` when given). AdamW,
    warmup then cosine decay, batches drawn with replacement."""
    from tqdm.auto import tqdm

    heads = PretrainHeads(tower.cfg.hidden_size, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split((tower, heads), nnx.Param)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 20), max(steps, 2),
                                                  learning_rate * 0.05)
    tx = optax.adamw(schedule, weight_decay=0.01)
    opt_state = tx.init(params)
    step = make_step(graphdef, tx)
    rng = np.random.default_rng(seed)
    history = []
    sink = MetricsWriter(Path(metrics_dir), tensorboard=False) if metrics_dir else None
    bar = tqdm(range(steps), desc="vision", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for i in bar:
            batch = grayscale_some(data.batch(rng.integers(len(data), size=batch_size)), rng, grayscale_fraction)
            batch = {k: jnp.asarray(v) for k, v in batch.items()}
            params, opt_state, loss, parts = step(params, opt_state, batch)
            row = {"step": i + 1, "loss": float(loss), **{k: float(v) for k, v in parts.items()}}
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"vision pre-training: non-finite loss at step {i + 1}: {row}")
            history.append(row)
            if sink:
                sink.write(row["step"], {k: v for k, v in row.items() if k != "step"})
            bar.set_postfix(loss=f"{row['loss']:.3f}")
    finally:
        bar.close()
        if sink:
            sink.close()
    trained, heads = nnx.merge(graphdef, params)
    nnx.update(tower, nnx.state(trained, nnx.Param))
    return heads, history


def patch_accuracy(tower: nnx.Module, heads: PretrainHeads, data: ClipData, batch_size: int = 64
                   ) -> dict[str, float]:
    """Accuracy of the read-outs on ``data``: each class target over the patches that show an object (colour and
    shape also over the held-out pairs' patches alone, ``*_held_out``, when ``data`` has any), and the background
    over frames."""
    graphdef, state = nnx.split((tower, heads))

    @jax.jit
    def predict(st, frames):
        t, h = nnx.merge(graphdef, st)
        return {k: v.argmax(-1) for k, v in h(_tokens(t, frames)).items() if k != "geometry"}

    preds = [jax.device_get(predict(state, jnp.asarray(data.frames[i:i + batch_size])))
             for i in range(0, len(data), batch_size)]
    pred = {k: np.concatenate([p[k] for p in preds]) for k in preds[0]}
    shows = data.colour > 0
    out = {k: float((pred[k] == getattr(data, k))[shows].mean()) for k in TARGET_CLASSES}
    if data.held_out.any():  # the compositional test at the tower: the objects of the held-out pairs alone
        out.update({f"{k}_held_out": float((pred[k] == getattr(data, k))[data.held_out].mean())
                    for k in ("colour", "shape")})
    out["background"] = float((pred["background"] == data.background).mean())
    return out
