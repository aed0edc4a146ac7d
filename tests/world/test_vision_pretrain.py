"""The world's vision pre-training: per-patch targets from the renderer's ground truth, clips decoded as training
reads them, and a tower that learns to tell colours and sizes apart on held-out test frames."""

import math

import numpy as np
import pytest

from g4v_jax.config import load_config
from g4v_jax.models.gpt4video import build_model
from g4v_jax.train.metrics import read_metrics
from g4v_jax.world import vision_pretrain as vp
from g4v_jax.world.scene import COLOURS, SHAPES, SIZES, Obj, Scene, render_scene
from g4v_jax.world.tasks import build_world

SIZE, PATCH, FRAMES = 48, 8, 4


def targets_of(scene, seed=0):
    r = render_scene(scene, num_frames=FRAMES, size=SIZE, seed=seed)
    return r, vp.patch_targets(scene, r, PATCH)


def test_render_scene_ground_truth_matches_its_frames():
    scene = Scene((Obj("square", "red", "big", "moves right"), Obj("circle", "blue", "small", "grows")), "black")
    r = render_scene(scene, num_frames=FRAMES, size=SIZE, seed=3)
    assert r.owner.shape == (FRAMES, SIZE, SIZE) and r.centre.shape == (2, FRAMES, 2)
    red = (r.frames == (220, 30, 30)).all(-1)
    np.testing.assert_array_equal(red, r.owner == 0)
    ys, xs = np.nonzero(r.owner[0] == 0)  # the square's pixel centroid is its centre
    np.testing.assert_allclose([xs.mean() + 0.5, ys.mean() + 0.5], r.centre[0, 0], atol=0.6)
    assert r.centre[0, -1, 0] - r.centre[0, 0, 0] == pytest.approx(0.35 * SIZE)  # moves right by MOVE_FRACTION
    assert r.side[1, -1] / r.side[1, 0] == pytest.approx(2.0)  # grows: x2 in side


def test_patch_targets_name_the_covering_object_and_its_geometry():
    scene = Scene((Obj("triangle", "green", "big", "spins"), Obj("circle", "yellow", "small", "moves up")), "gray")
    r, t = targets_of(scene, seed=1)
    g = SIZE // PATCH
    assert t["colour"].shape == (FRAMES, g * g) and t["geometry"].shape == (FRAMES, g * g, 5)
    for k, obj in enumerate(scene.objects):
        cx, cy = r.centre[k, 0]
        patch = int(cy // PATCH) * g + int(cx // PATCH)  # the patch holding the object's centre shows it
        assert t["colour"][0, patch] == 1 + COLOURS.index(obj.colour)
        assert t["shape"][0, patch] == 1 + SHAPES.index(obj.shape)
        assert t["size"][0, patch] == 1 + SIZES.index(obj.size)
        dx, dy, side, cos, sin = t["geometry"][0, patch]
        assert (dx, dy) == pytest.approx(((cx % PATCH - PATCH / 2) / PATCH, (cy % PATCH - PATCH / 2) / PATCH))
        assert side == pytest.approx(r.side[k, 0] / PATCH)
        rotates = obj.shape != "circle"
        np.testing.assert_array_equal(t["geometry_mask"][0, patch], [1, 1, 1, rotates, rotates])
    # the spinning triangle's rotation target turns: frame 0 at angle 0, later frames elsewhere on the circle
    tri = t["shape"] == 1 + SHAPES.index("triangle")
    first = t["geometry"][0][tri[0]][:, 3:]
    np.testing.assert_allclose(first, np.tile([1.0, 0.0], (len(first), 1)), atol=1e-6)
    last = t["geometry"][-1][tri[-1]][0, 3:]
    assert math.atan2(last[1], last[0]) == pytest.approx(math.remainder(1.75 * 2 * math.pi, 2 * math.pi))
    # no object: class 0 and no geometry target
    empty = t["colour"] == 0
    assert empty.any() and (t["shape"][empty] == 0).all() and (t["geometry_mask"][empty] == 0).all()


def test_grayscale_frames_lose_their_colour_target_only():
    rng = np.random.default_rng(0)
    batch = {"frames": rng.integers(0, 256, (8, FRAMES, SIZE, SIZE, 3), dtype=np.uint8),
             "colour": np.ones((8, FRAMES, 36), np.int32), "shape": np.ones((8, FRAMES, 36), np.int32)}
    out = vp.grayscale_some(batch, rng, 0.5)
    gray = (out["colour"] == -1).all(axis=(1, 2))
    assert 0 < gray.sum() < 8
    assert (out["frames"][gray][..., 0] == out["frames"][gray][..., 2]).all()
    np.testing.assert_array_equal(out["frames"][~gray], batch["frames"][~gray])
    np.testing.assert_array_equal(out["shape"], batch["shape"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"), n_train_videos=120, n_test_videos=16, n_text=8,
                       num_frames=FRAMES, size=SIZE)


def test_clip_data_reads_decoded_training_frames_with_their_targets(world):
    data = vp.clip_data(world.catalogue, "train", num_frames=FRAMES, size=SIZE, patch_size=PATCH)
    assert len(data) == 120 and data.frames.shape == (120, FRAMES, SIZE, SIZE, 3) and data.frames.dtype == np.uint8
    assert data.motion.shape == (120, FRAMES, (SIZE // PATCH) ** 2) and set(np.unique(data.motion)) <= set(range(9))
    # the decoded frame shows the object's colour where the target says so (H.264 keeps saturated colours close)
    from g4v_jax.world.scene import COLOUR_RGB

    g = SIZE // PATCH
    v, f, p = np.argwhere(data.size == 2)[0]  # a patch covered by a big object
    row, col = divmod(p, g)
    pixels = data.frames[v, f, row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH].reshape(-1, 3)
    want = np.asarray(COLOUR_RGB[COLOURS[data.colour[v, f, p] - 1]], np.float32)
    assert np.abs(pixels.astype(np.float32) - want).sum(-1).min() < 40
    with pytest.raises(ValueError, match="no hazard-free videos"):
        vp.clip_data(world.catalogue, "nope", num_frames=FRAMES, size=SIZE, patch_size=PATCH)


def test_pretraining_teaches_the_tower_colour_size_and_background_on_held_out_frames(world, tmp_path):
    read = dict(num_frames=FRAMES, size=SIZE, patch_size=PATCH)
    train, test = vp.clip_data(world.catalogue, "train", **read), vp.clip_data(world.catalogue, "test", **read)
    model = build_model(load_config("world").model, seed=0)
    heads, history = vp.pretrain_vision_tower(model.vision_model, train, steps=150, batch_size=16, progress=False,
                                              metrics_dir=tmp_path / "vision")
    assert read_metrics(tmp_path / "vision" / "metrics.jsonl") == history  # what a person plots
    first, last = np.mean([h["loss"] for h in history[:8]]), np.mean([h["loss"] for h in history[-8:]])
    print(f"loss {first:.3f} -> {last:.3f}")
    assert last < 0.4 * first
    acc = vp.patch_accuracy(model.vision_model, heads, test)
    print(acc)
    # chance: 1/5 colours, 1/2 sizes, 1/3 backgrounds (test frames all hold a held-out (colour, shape) pair)
    assert acc["colour"] > 0.8 and acc["background"] > 0.9 and acc["size"] > 0.6
    # every test video holds a held-out pair, so the compositional read-outs are measured; colour carries over
    assert acc["colour_held_out"] > 0.8 and "shape_held_out" in acc


def test_rendered_clip_data_covers_every_pair_with_the_renderers_targets():
    from g4v_jax.world.scene import ALL_PAIRS, HELD_OUT_PAIRS, random_scene

    data = vp.rendered_clip_data(60, num_frames=FRAMES, size=SIZE, patch_size=PATCH, seed=0)
    assert len(data) == 60 and data.frames.shape == (60, FRAMES, SIZE, SIZE, 3) and data.frames.dtype == np.uint8
    np.testing.assert_array_equal(vp.rendered_clip_data(60, num_frames=FRAMES, size=SIZE, patch_size=PATCH,
                                                        seed=0).frames, data.frames)  # seeded
    assert not np.array_equal(vp.rendered_clip_data(60, num_frames=FRAMES, size=SIZE, patch_size=PATCH,
                                                    seed=1).frames, data.frames)
    # the same scenes, re-rendered by hand: the targets are patch_targets of exactly these frames
    rng = np.random.default_rng([0, 0x5EE])
    pairs = set()
    for i in range(60):
        scene = random_scene(rng)
        truth = render_scene(scene, num_frames=FRAMES, size=SIZE, seed=int(rng.integers(2**31)))
        np.testing.assert_array_equal(truth.frames, data.frames[i])
        want = vp.patch_targets(scene, truth, PATCH)
        np.testing.assert_array_equal(want["shape"], data.shape[i])
        np.testing.assert_array_equal(want["held_out"], data.held_out[i])
        assert not scene.hazard
        pairs |= scene.pairs
    # unlike the world's training videos, the tower's pre-training sees the held-out pairs too (as CLIP has)
    assert pairs == set(ALL_PAIRS) and HELD_OUT_PAIRS <= pairs
    assert data.held_out.any() and (data.shape[data.held_out] > 0).all()
    with pytest.raises(ValueError, match="n must be"):
        vp.rendered_clip_data(0, num_frames=FRAMES, size=SIZE, patch_size=PATCH, seed=0)


def test_patch_targets_mark_the_held_out_objects_patches():
    scene = Scene((Obj("triangle", "red", "big", "moves left"), Obj("circle", "green", "big", "grows")), "black")
    r, t = targets_of(scene, seed=2)
    for k, obj in enumerate(scene.objects):
        cx, cy = r.centre[k, 0]
        patch = int(cy // PATCH) * (SIZE // PATCH) + int(cx // PATCH)
        assert t["held_out"][0, patch] == (obj.pair == ("red", "triangle"))
    assert not t["held_out"][t["shape"] == 0].any()
