"""The world's grammar, renderer and text-to-video backend: round trips, pixels measured from rendered frames."""

import dataclasses
import math

import numpy as np
import pytest

from g4v_jax.data.video import resize_center_crop, sample_frame_indices
from g4v_jax.t2v.base import T2VError, T2VSettings, make_backend
from g4v_jax.world import backend as world_backend
from g4v_jax.world.backend import WorldRenderer, match_request
from g4v_jax.world.scene import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    BIG_FRACTION,
    COLOUR_RGB,
    COLOURS,
    HAZARD_RGB,
    HELD_OUT_PAIRS,
    MOTIONS,
    SHAPES,
    SIZES,
    SMALL_FRACTION,
    TRIANGLE_CIRCUMRADIUS,
    Obj,
    Scene,
    band_width,
    caption,
    noun_phrase,
    parse_caption,
    parse_noun_phrase,
    random_scene,
    render,
    same_scene,
)

SIZE = 64


def one(shape="square", colour="red", size="small", motion="moves left", background="black", hazard=False):
    return Scene((Obj(shape, colour, size, motion),), background, hazard)


def colour_mask(frames: np.ndarray, colour: str) -> np.ndarray:
    return np.all(frames == np.asarray(COLOUR_RGB[colour], np.uint8), axis=-1)


def centroids(mask: np.ndarray) -> np.ndarray:
    """(T, 2) mean (x, y) of each frame's mask."""
    out = []
    for m in mask:
        ys, xs = np.nonzero(m)
        assert xs.size, "object not visible in a frame"
        out.append((xs.mean(), ys.mean()))
    return np.asarray(out)


# --------------------------------------------------------------------------------------------------------------------
# Grammar
# --------------------------------------------------------------------------------------------------------------------


def test_caption_example_and_round_trip_over_many_scenes():
    s = Scene((Obj("circle", "red", "small", "moves left"), Obj("square", "blue", "big", "spins")), "gray")
    assert caption(s) == "a small red circle moves left and a big blue square spins on a gray background"
    three = Scene(s.objects + (Obj("triangle", "green", "big", "grows"),), "brown", hazard=True)
    assert caption(three) == ("a small red circle moves left, a big blue square spins and a big green triangle "
                              "grows on a brown background")
    rng = np.random.default_rng(0)
    for _ in range(500):
        scene = random_scene(rng, hazard=bool(rng.integers(2)))
        plain = dataclasses.replace(scene, hazard=False)  # the hazard is never in a caption
        assert "hazard" not in caption(scene)
        assert parse_caption(caption(scene)) == plain
        assert parse_noun_phrase(noun_phrase(scene)) == plain


def test_parse_is_tolerant_of_case_spaces_period_and_oxford_comma():
    want = parse_caption("a small red circle moves left, a big blue square spins and a big green triangle grows "
                         "on a brown background")
    assert parse_caption("  A Small RED circle   moves left, a big blue square spins, and a big green triangle "
                         "grows on a brown background.  ") == want


@pytest.mark.parametrize("text, offending", [
    ("", "end of the text"),
    ("hello world", "hello"),
    ("a small purple circle moves left on a gray background", "purple"),
    ("a small red circle moves sideways on a gray background", "moves sideways"),
    ("a small red circle moves left on a pink background", "pink"),
    ("a small red circle moves left on a gray background please", "please"),
    ("a small red circle moves left a big blue square grows on a gray background", "a big blue"),
    ("a small red circle spins on a gray background", "cannot spin"),
    ("a small red circle grows and a big red circle shrinks on a black background", "red circle"),
    ("a small red circle grows, a small red square grows, a small blue square grows and a small white square "
     "grows on a black background", "1 to 3 objects"),
])
def test_parse_rejects_garbage_naming_the_words(text, offending):
    with pytest.raises(ValueError, match="cannot parse") as e:
        parse_caption(text)
    assert offending in str(e.value)


def test_scene_validation():
    with pytest.raises(ValueError, match="colour 'purple'"):
        Obj("circle", "purple", "small", "grows")
    with pytest.raises(ValueError, match="cannot spin"):
        Obj("circle", "red", "small", "spins")
    with pytest.raises(ValueError, match="share colour and shape"):
        Scene((Obj("circle", "red", "small", "grows"), Obj("circle", "red", "big", "shrinks")), "gray")
    with pytest.raises(ValueError, match="background"):
        Scene((Obj("circle", "red", "small", "grows"),), "pink")


def test_random_scene_respects_pairs_and_covers_the_vocabulary():
    rng = np.random.default_rng(1)
    seen = {"colour": set(), "shape": set(), "size": set(), "motion": set(), "background": set(), "n": set()}
    for _ in range(400):
        scene = random_scene(rng, exclude_pairs=HELD_OUT_PAIRS)
        assert not scene.pairs & HELD_OUT_PAIRS
        for o in scene.objects:
            seen["colour"].add(o.colour), seen["shape"].add(o.shape), seen["size"].add(o.size)
            seen["motion"].add(o.motion)
        seen["background"].add(scene.background), seen["n"].add(len(scene.objects))
    # Every word still occurs in training scenes; only the held-out combinations are missing.
    assert seen == {"colour": set(COLOURS), "shape": set(SHAPES), "size": set(SIZES), "motion": set(MOTIONS),
                    "background": set(BACKGROUNDS), "n": {1, 2, 3}}
    assert len(HELD_OUT_PAIRS) == 3
    positions = set()
    for _ in range(100):
        scene = random_scene(rng, require_pair=("red", "triangle"), exclude_pairs={("blue", "circle")})
        assert ("red", "triangle") in scene.pairs and ("blue", "circle") not in scene.pairs
        positions.add([o.pair for o in scene.objects].index(("red", "triangle")))
    assert positions == {0, 1, 2}
    assert all(len(random_scene(rng, max_objects=1).objects) == 1 for _ in range(20))
    with pytest.raises(ValueError, match="also in exclude_pairs"):
        random_scene(rng, require_pair=("red", "triangle"), exclude_pairs=HELD_OUT_PAIRS)


def test_same_scene_ignores_object_order_and_hazard():
    a = parse_caption("a small red circle moves left and a big blue square spins on a gray background")
    b = parse_caption("a big blue square spins and a small red circle moves left on a gray background")
    assert same_scene(a, dataclasses.replace(b, hazard=True))
    assert not same_scene(a, parse_caption("a small red circle moves left and a big blue square spins on a "
                                           "black background"))


# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------


def test_render_shape_dtype_and_determinism():
    scene = parse_caption("a small red circle moves left and a big blue square spins on a gray background")
    frames = render(scene, num_frames=8, size=SIZE, seed=3)
    assert frames.dtype == np.uint8 and frames.shape == (8, SIZE, SIZE, 3)
    np.testing.assert_array_equal(frames, render(scene, num_frames=8, size=SIZE, seed=3))
    assert not np.array_equal(frames, render(scene, num_frames=8, size=SIZE, seed=4))  # positions follow the seed
    assert render(scene, num_frames=1, size=32).shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="size"):
        render(scene, size=8)


def test_hazard_stripes_only_with_hazard_and_only_in_the_band():
    magenta = np.asarray(HAZARD_RGB[0], np.uint8)
    w = band_width(SIZE)
    rng = np.random.default_rng(2)
    for i in range(30):
        scene = random_scene(rng)
        safe = render(scene, seed=i)
        flagged = render(dataclasses.replace(scene, hazard=True), seed=i)
        assert not np.all(safe == magenta, axis=-1).any()
        per_frame = np.all(flagged == magenta, axis=-1).sum(axis=(1, 2))
        assert (per_frame > 0.1 * (SIZE * SIZE - (SIZE - 2 * w) ** 2)).all()  # stripes in every frame
        # Same objects in the same places: the hazard changes the band and nothing else.
        np.testing.assert_array_equal(safe[:, w:-w, w:-w], flagged[:, w:-w, w:-w])
        # Without the hazard the band is plain background: every object stays inside it for the whole clip.
        band = np.ones((SIZE, SIZE), bool)
        band[w:-w, w:-w] = False
        assert np.all(safe[:, band] == np.asarray(BACKGROUND_RGB[scene.background], np.uint8))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", SIZES)
def test_moves_translate_the_centroid_by_a_third_of_the_frame(shape, size):
    expect = {"moves left": (-1, 0), "moves right": (1, 0), "moves up": (0, -1), "moves down": (0, 1)}
    for motion, (dx, dy) in expect.items():
        frames = render(one(shape, "yellow", size, motion, "brown"), seed=5)
        c = centroids(colour_mask(frames, "yellow"))
        step = np.diff(c, axis=0)
        along, across = (step[:, 0] * dx + step[:, 1] * dy), (step[:, 0] * dy - step[:, 1] * dx)
        assert (along > 0).all(), (motion, c)
        assert along.sum() >= SIZE / 3 - 1
        assert np.abs(across).max() < 1.0
        area = colour_mask(frames, "yellow").sum(axis=(1, 2))
        assert area.max() - area.min() <= 0.2 * area.mean()  # the same size throughout (up to pixelation)


@pytest.mark.parametrize("shape", SHAPES)
def test_bounce_goes_down_then_up_in_four_sampled_frames(shape):
    frames = render(one(shape, "green", "big", "bounces", "gray"), seed=6)
    y = centroids(colour_mask(frames, "green"))[:, 1]
    assert y.max() - y[0] >= SIZE / 5 and abs(y[-1] - y[0]) < 1.0
    y4 = y[sample_frame_indices(len(frames), 4)]
    assert y4[1] > y4[0] + 2 and y4[3] < y4[2] - 2  # down, then up


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", SIZES)
def test_grows_and_shrinks_change_the_area_fourfold(shape, size):
    for motion, sign in (("grows", 1), ("shrinks", -1)):
        area = colour_mask(render(one(shape, "white", size, motion, "black"), seed=7), "white").sum(axis=(1, 2))
        assert (np.sign(np.diff(area)) == sign).all(), (motion, area)
        ratio = area[-1] / area[0] if sign > 0 else area[0] / area[-1]
        assert ratio > 3.0, (motion, area)  # x2 in side, x4 in area (pixelation aside)


@pytest.mark.parametrize("shape", ["square", "triangle"])
def test_spin_changes_the_outline_in_place(shape):
    mask = colour_mask(render(one(shape, "blue", "big", "spins", "gray"), seed=8), "blue")
    c = centroids(mask)
    assert np.abs(c - c[0]).max() < 1.0
    sampled = mask[sample_frame_indices(len(mask), 4)]
    for a, b in zip(sampled[:-1], sampled[1:]):
        assert (a & b).sum() / (a | b).sum() < 0.9  # a visibly different orientation in each sampled frame


def _expected_area(obj: Obj, t: int, num_frames: int) -> float:
    side = (SMALL_FRACTION if obj.size == "small" else BIG_FRACTION) * SIZE
    p = t / (num_frames - 1)
    side *= {"grows": 2.0 ** (p - 0.5), "shrinks": 2.0 ** (0.5 - p)}.get(obj.motion, 1.0)
    factor = {"circle": math.pi / 4, "square": 1.0,
              "triangle": 3 * math.sqrt(3) / 4 * TRIANGLE_CIRCUMRADIUS ** 2}[obj.shape]
    return factor * side * side


def test_objects_stay_mostly_visible_in_random_scenes():
    rng = np.random.default_rng(9)
    checked = 0
    while checked < 60:
        scene = random_scene(rng)
        if len({o.colour for o in scene.objects}) < len(scene.objects):
            continue  # two objects of one colour cannot be told apart by colour
        frames = render(scene, seed=checked)
        for o in scene.objects:
            visible = colour_mask(frames, o.colour).sum(axis=(1, 2))
            expected = np.asarray([_expected_area(o, t, len(frames)) for t in range(len(frames))])
            assert (visible >= 0.3 * expected).all(), (caption(scene), o, visible / expected)
        checked += 1


def test_shapes_and_colours_survive_a_downscale_to_32_pixels():
    """Small objects at their smallest (the first frame of "grows", the last of "shrinks") and at nominal size, after
    the pipeline's bicubic resize to 32 px: the colour of the most covered pixel is still the object's, and the
    fraction of its (soft) bounding box a shape fills still separates triangle (~1/2) < circle (~pi/4) < square (1).
    """
    fills = {}
    for shape in SHAPES:
        for colour in COLOURS:
            for background in BACKGROUNDS:
                for motion, t in (("moves left", 0), ("grows", 0), ("shrinks", -1)):
                    frame = render(one(shape, colour, "small", motion, background), seed=1)[t]
                    small = resize_center_crop(frame, 32).astype(float)
                    bg, fg = np.asarray(BACKGROUND_RGB[background], float), np.asarray(COLOUR_RGB[colour], float)
                    # How much of each pixel is object: projection onto background -> colour, clipped to [0, 1].
                    cover = np.clip((small - bg) @ (fg - bg) / ((fg - bg) @ (fg - bg)), 0, 1)
                    core = small[np.unravel_index(cover.argmax(), cover.shape)]
                    nearest = min(COLOURS, key=lambda c: np.abs(core - np.asarray(COLOUR_RGB[c])).sum())
                    assert nearest == colour, (shape, colour, background, motion)
                    width, height = cover.max(axis=0).sum(), cover.max(axis=1).sum()
                    fills.setdefault(shape, []).append(cover.sum() / (width * height))
    assert max(fills["triangle"]) + 0.03 < min(fills["circle"]), fills
    assert max(fills["circle"]) + 0.03 < min(fills["square"]), fills


# --------------------------------------------------------------------------------------------------------------------
# Backend
# --------------------------------------------------------------------------------------------------------------------


def test_world_backend_renders_prompts_letterboxed_and_seeded():
    assert isinstance(make_backend("world"), WorldRenderer)
    prompts = ["a big green square spins on a black background", "a small red circle grows and a big white "
                                                                  "triangle bounces on a brown background"]
    settings = T2VSettings(num_frames=4, height=32, width=48, seed=3)
    videos = WorldRenderer().generate(prompts, settings)
    assert videos.shape == (2, 4, 32, 48, 3) and videos.dtype == np.uint8
    for video, prompt in zip(videos, prompts):
        scene = parse_caption(prompt)
        np.testing.assert_array_equal(video[:, :, 8:40], render(scene, num_frames=4, size=32, seed=3))
        assert np.all(video[:, :, :8] == np.asarray(BACKGROUND_RGB[scene.background], np.uint8))
    # A prompt's video does not depend on its batch.
    np.testing.assert_array_equal(WorldRenderer().generate(prompts[1:], settings)[0], videos[1])


def test_world_backend_raises_on_garbage_naming_the_prompt():
    with pytest.raises(T2VError, match="a purple elephant dances"):
        WorldRenderer().generate(["a big green square spins on a black background", "a purple elephant dances"],
                                 T2VSettings(num_frames=2, height=32, width=32))
    assert world_backend.WorldRenderer.name == "world"


def test_match_request_is_order_insensitive():
    requested = "a small red circle moves left and a big blue square spins on a gray background"
    assert match_request(requested, "a big blue square spins and a small red circle moves left on a gray background")
    assert match_request(requested, requested.upper() + ".")
    assert not match_request(requested, "a small red circle moves right and a big blue square spins on a gray "
                                        "background")
    assert not match_request(requested, "a small red circle moves left on a gray background")
    assert not match_request(requested, "Sure, a red circle!")
    with pytest.raises(ValueError, match="cannot parse"):
        match_request("not a caption", requested)
