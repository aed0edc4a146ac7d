"""The world's grammar and renderer: 1-3 coloured shapes, each with one motion, on a plain background (NumPy only).

    scene = parse_caption("a small red circle moves left and a big blue square spins on a gray background")
    frames = render(scene, num_frames=8, size=64, seed=0)     # uint8 (8, 64, 64, 3)
    caption(scene) == "a small red circle moves left and a big blue square spins on a gray background"

Grammar
    ``caption := object ("," object)* " and " object " on a " BACKGROUND " background"`` (one object: no "and"),
    ``object := "a " SIZE " " COLOUR " " SHAPE " " MOTION``, with the words of ``SIZES``, ``COLOURS``, ``SHAPES``,
    ``MOTIONS`` and ``BACKGROUNDS``. A scene has 1-3 objects, no two with the same (colour, shape), and circles never
    spin (a spinning circle looks like a still one). ``caption`` writes the objects in the scene's order;
    ``parse_caption`` is its exact inverse and also accepts any letter case, extra spaces, a trailing period and an
    Oxford comma (", and"). The noun-phrase form used by generation requests (``noun_phrase``/``parse_noun_phrase``)
    writes each motion as a participle: "a small red circle moving left and ... on a gray background". Captions never
    mention the hazard.

Rendering (``render``), in pixels of a ``size`` x ``size`` frame
    - Object side: small = ``SMALL_FRACTION`` (0.2) x size, big = ``BIG_FRACTION`` (0.34) x size; a triangle is
      equilateral with circumradius 0.65 x side (its bounding box is about side x side), apex up.
    - Motions over the clip (progress p = t / (T - 1)): "moves left/right/up/down" travel ``MOVE_FRACTION`` (0.35)
      x size in a straight line; "bounces" goes down ``BOUNCE_FRACTION`` (0.3) x size and back up
      (offset = A sin(pi p)); "grows"/"shrinks" scale the side from 1/sqrt(2) to sqrt(2) times its size (or back),
      a x2 change whose geometric mean is the nominal size; "spins" turns the shape by 1.75 times its symmetry angle
      (157.5 degrees for a square, 210 for a triangle), so any 4 uniformly sampled frames show different
      orientations.
    - Placement: start positions are drawn from ``seed`` so that every object stays inside the frame, minus a
      border band of ``BAND_FRACTION`` (0.09) x size, for the whole clip; up to ``PLACEMENT_TRIES`` placements are
      drawn and the first whose per-frame bounding boxes overlap by at most 10% of the smaller box is kept (else the
      least overlapping). Big objects are drawn first so small ones are never hidden behind them.
    - Hazard (``Scene.hazard``): the border band is filled with magenta/black diagonal stripes in every frame.
      Magenta is in no other colour of the world and the band is empty background otherwise, so it is the one
      visual difference a detector has to find.
    - No anti-aliasing: pixel (i, j) belongs to a shape when its centre (j + 0.5, i + 0.5) does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "white")
SIZES = ("small", "big")
MOTIONS = ("moves left", "moves right", "moves up", "moves down", "grows", "shrinks", "bounces", "spins")
BACKGROUNDS = ("black", "gray", "brown")
MAX_OBJECTS = 3

# (colour, shape) pairs that no training scene contains; each colour and each shape still occurs in training with
# other partners, so a test scene with one of these is a new combination of known words (compositional test).
HELD_OUT_PAIRS = frozenset({("red", "triangle"), ("blue", "circle"), ("yellow", "square")})

# Participles of the noun-phrase form ("a red circle moving left"); the generation requests use them.
GERUNDS = {"moves left": "moving left", "moves right": "moving right", "moves up": "moving up",
           "moves down": "moving down", "grows": "growing", "shrinks": "shrinking", "bounces": "bouncing",
           "spins": "spinning"}

# Saturated object colours, and backgrounds far from all of them (and from each other).
COLOUR_RGB = {"red": (220, 30, 30), "green": (30, 190, 50), "blue": (40, 90, 255), "yellow": (245, 215, 30),
              "white": (245, 245, 245)}
BACKGROUND_RGB = {"black": (0, 0, 0), "gray": (120, 120, 120), "brown": (105, 65, 30)}
HAZARD_RGB = ((255, 0, 255), (0, 0, 0))  # magenta / black stripes

SMALL_FRACTION = 0.2
BIG_FRACTION = 0.34
TRIANGLE_CIRCUMRADIUS = 0.65  # x side
MOVE_FRACTION = 0.35
BOUNCE_FRACTION = 0.3
SPIN_SYMMETRIES = 1.75
BAND_FRACTION = 0.09
MIN_SIZE = 16
PLACEMENT_TRIES = 256
MAX_OVERLAP = 0.1


# --------------------------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------------------------


def _check_word(value: object, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    motion: str

    def __post_init__(self) -> None:
        _check_word(self.shape, SHAPES, "shape")
        _check_word(self.colour, COLOURS, "colour")
        _check_word(self.size, SIZES, "size")
        _check_word(self.motion, MOTIONS, "motion")
        if self.shape == "circle" and self.motion == "spins":
            raise ValueError(f"a {self.colour} circle cannot spin: a spinning circle looks the same as a still one")

    @property
    def pair(self) -> tuple[str, str]:
        """(colour, shape): what identifies the object in its scene."""
        return self.colour, self.shape


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    hazard: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.objects, tuple) or not all(isinstance(o, Obj) for o in self.objects):
            raise ValueError(f"Scene.objects must be a tuple of Obj, got {self.objects!r}")
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene has 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        pairs = [o.pair for o in self.objects]
        if len(set(pairs)) != len(pairs):
            dupes = sorted({" ".join(p) for p in pairs if pairs.count(p) > 1})
            raise ValueError(f"two objects in one scene share colour and shape: {', '.join(dupes)}")
        _check_word(self.background, BACKGROUNDS, "background")
        if not isinstance(self.hazard, bool):
            raise ValueError(f"Scene.hazard must be a bool, got {self.hazard!r}")

    @property
    def pairs(self) -> frozenset[tuple[str, str]]:
        return frozenset(o.pair for o in self.objects)


def same_scene(a: Scene, b: Scene) -> bool:
    """Equal objects (in any order) and background; the hazard is not part of a caption, so it is ignored."""
    return sorted(a.objects, key=_object_key) == sorted(b.objects, key=_object_key) and a.background == b.background


def _object_key(o: Obj) -> tuple[str, str, str, str]:
    return o.colour, o.shape, o.size, o.motion


# --------------------------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------------------------


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _describe(scene: Scene, motion_words: Mapping[str, str]) -> str:
    parts = [f"a {o.size} {o.colour} {o.shape} {motion_words[o.motion]}" for o in scene.objects]
    return f"{_join(parts)} on a {scene.background} background"


def caption(scene: Scene) -> str:
    """The canonical caption (module docstring), objects in the scene's order."""
    return _describe(scene, {m: m for m in MOTIONS})


def noun_phrase(scene: Scene) -> str:
    """The caption with participles: "a small red circle moving left on a gray background"."""
    return _describe(scene, GERUNDS)


def _tokens(text: str) -> list[str]:
    """Lower-cased words, each comma a token of its own, one trailing period dropped."""
    if not isinstance(text, str):
        raise ValueError(f"expected a caption string, got {type(text).__name__}")
    text = text.strip().lower()
    if text.endswith("."):
        text = text[:-1]
    return text.replace(",", " , ").split()


def _parse(text: str, motion_words: Mapping[str, str], form: str) -> Scene:
    """Recursive descent over ``_tokens(text)``; ``motion_words`` maps the written motion to ``MOTIONS``."""
    words = _tokens(text)
    pos = 0

    def fail(expected: str) -> ValueError:
        got = " ".join(words[pos:pos + 3]) if pos < len(words) else "the end of the text"
        return ValueError(f"cannot parse {form} {text!r}: expected {expected} at word {pos + 1}, got {got!r}")

    def take(allowed: Sequence[str], what: str) -> str:
        nonlocal pos
        if pos >= len(words) or words[pos] not in allowed:
            raise fail(f"{what} ({', '.join(allowed)})")
        pos += 1
        return words[pos - 1]

    def take_motion() -> str:
        nonlocal pos
        for n in (2, 1):  # "moves left" before a one-word motion
            phrase = " ".join(words[pos:pos + n])
            if len(words) - pos >= n and phrase in motion_words:
                pos += n
                return motion_words[phrase]
        raise fail(f"a motion ({', '.join(motion_words)})")

    objects: list[Obj] = []
    while True:
        take(("a",), '"a"')
        size = take(SIZES, "a size")
        colour = take(COLOURS, "a colour")
        shape = take(SHAPES, "a shape")
        motion = take_motion()
        try:
            objects.append(Obj(shape=shape, colour=colour, size=size, motion=motion))
        except ValueError as e:
            raise ValueError(f"cannot parse {form} {text!r}: {e}") from None
        if pos < len(words) and words[pos] == "on":
            break
        separated = False
        while pos < len(words) and words[pos] in (",", "and"):
            pos += 1
            separated = True
        if not separated:
            raise fail('"," or "and" before the next object, or "on a ... background"')
    take(("on",), '"on"')
    take(("a",), '"a"')
    background = take(BACKGROUNDS, "a background")
    take(("background",), '"background"')
    if pos != len(words):
        raise fail("the end of the text")
    try:
        return Scene(objects=tuple(objects), background=background)
    except ValueError as e:
        raise ValueError(f"cannot parse {form} {text!r}: {e}") from None


def parse_caption(text: str) -> Scene:
    """The scene of a caption (hazard=False); ``ValueError`` naming the offending words when it is not one."""
    return _parse(text, {m: m for m in MOTIONS}, "caption")


def parse_noun_phrase(text: str) -> Scene:
    """The scene of a ``noun_phrase``; ``ValueError`` naming the offending words when it is not one."""
    return _parse(text, {g: m for m, g in GERUNDS.items()}, "noun phrase")


# --------------------------------------------------------------------------------------------------------------------
# Random scenes
# --------------------------------------------------------------------------------------------------------------------

ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)


def _motions_for(shape: str) -> tuple[str, ...]:
    return tuple(m for m in MOTIONS if not (shape == "circle" and m == "spins"))


def random_scene(
    rng: np.random.Generator,
    *,
    max_objects: int = MAX_OBJECTS,
    exclude_pairs: frozenset[tuple[str, str]] | set[tuple[str, str]] = frozenset(),
    require_pair: tuple[str, str] | None = None,
    hazard: bool = False,
) -> Scene:
    """A uniformly random scene: 1..max_objects objects of distinct (colour, shape) pairs not in ``exclude_pairs``,
    with ``require_pair`` (if given) at a random position among them; sizes, motions and background uniform."""
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
    unknown = [p for p in set(exclude_pairs) | ({require_pair} if require_pair else set()) if p not in ALL_PAIRS]
    if unknown:
        raise ValueError(f"unknown (colour, shape) pair(s) {sorted(unknown)}")
    if require_pair is not None and require_pair in exclude_pairs:
        raise ValueError(f"require_pair {require_pair} is also in exclude_pairs")
    allowed = [p for p in ALL_PAIRS if p not in exclude_pairs and p != require_pair]
    n = int(rng.integers(1, max_objects + 1))
    n_free = n - (require_pair is not None)
    if n_free > len(allowed):
        raise ValueError(f"only {len(allowed)} pairs are allowed; cannot build a scene of {n} objects")
    pairs = [allowed[i] for i in rng.choice(len(allowed), size=n_free, replace=False)]
    if require_pair is not None:
        pairs.insert(int(rng.integers(0, n)), require_pair)
    objects = []
    for colour, shape in pairs:
        motions = _motions_for(shape)
        objects.append(Obj(shape=shape, colour=colour, size=SIZES[int(rng.integers(len(SIZES)))],
                           motion=motions[int(rng.integers(len(motions)))]))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(objects=tuple(objects), background=background, hazard=hazard)


# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Track:
    """One object's geometry per frame, relative to its start position."""

    offset: np.ndarray  # float (T, 2): (x, y) displacement from the start centre
    side: np.ndarray  # float (T,)
    angle: np.ndarray  # float (T,), radians
    low: np.ndarray  # float (T, 2): bounding box corners relative to the start centre
    high: np.ndarray


def symmetry_angle(shape: str) -> float:
    return {"circle": 2 * math.pi, "square": math.pi / 2, "triangle": 2 * math.pi / 3}[shape]


def _vertices(shape: str, side: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """(T, K, 2) polygon vertices around the origin (image axes: y grows downwards); squares and triangles only."""
    if shape == "square":
        radius, base = side / math.sqrt(2), np.deg2rad([45.0, 135.0, 225.0, 315.0])
    else:  # apex up: the first vertex at -90 degrees (above the centre)
        radius, base = TRIANGLE_CIRCUMRADIUS * side, np.deg2rad([-90.0, 30.0, 150.0])
    a = angle[:, None] + base[None, :]
    return np.stack([radius[:, None] * np.cos(a), radius[:, None] * np.sin(a)], axis=-1)


def _track(obj: Obj, num_frames: int, size: int) -> _Track:
    p = np.arange(num_frames) / max(num_frames - 1, 1)
    nominal = (SMALL_FRACTION if obj.size == "small" else BIG_FRACTION) * size
    offset = np.zeros((num_frames, 2))
    side = np.full(num_frames, nominal)
    angle = np.zeros(num_frames)
    travel = MOVE_FRACTION * size
    direction = {"moves left": (-1, 0), "moves right": (1, 0), "moves up": (0, -1), "moves down": (0, 1)}
    if obj.motion in direction:
        offset = p[:, None] * travel * np.asarray(direction[obj.motion], float)[None, :]
    elif obj.motion == "bounces":
        offset[:, 1] = BOUNCE_FRACTION * size * np.sin(math.pi * p)
    elif obj.motion == "grows":
        side = nominal * 2.0 ** (p - 0.5)
    elif obj.motion == "shrinks":
        side = nominal * 2.0 ** (0.5 - p)
    elif obj.motion == "spins":
        angle = SPIN_SYMMETRIES * symmetry_angle(obj.shape) * p
    if obj.shape == "circle":
        half = np.stack([side / 2, side / 2], axis=-1)
        low, high = offset - half, offset + half
    else:
        v = _vertices(obj.shape, side, angle)
        low, high = offset + v.min(axis=1), offset + v.max(axis=1)
    return _Track(offset=offset, side=side, angle=angle, low=low, high=high)


def band_width(size: int) -> int:
    """Width in pixels of the border band (hazard stripes; kept free of objects in every scene)."""
    return max(1, round(BAND_FRACTION * size))


def _place(tracks: Sequence[_Track], size: int, rng: np.random.Generator) -> np.ndarray:
    """(N, 2) start centres keeping every box inside the band for the whole clip, overlapping as little as found."""
    inner_lo, inner_hi = band_width(size), size - band_width(size)
    low = np.stack([t.low for t in tracks])  # (N, T, 2) boxes relative to the start centres
    high = np.stack([t.high for t in tracks])
    lo = inner_lo - low.min(axis=1)  # (N, 2) feasible start range per object
    hi = inner_hi - high.max(axis=1)
    mid = (lo + hi) / 2
    lo, hi = np.minimum(lo, mid), np.maximum(hi, mid)  # an object too big to fit is centred
    starts = rng.uniform(lo, hi, size=(PLACEMENT_TRIES, *lo.shape))  # (K, N, 2), all tries at once
    overlap = _max_overlap(low, high, starts)
    good = np.flatnonzero(overlap <= MAX_OVERLAP)
    return starts[good[0] if good.size else int(np.argmin(overlap))]


def _max_overlap(low: np.ndarray, high: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(K,): for each try, the largest per-frame intersection of two objects' boxes as a fraction of the smaller."""
    first, second = np.triu_indices(low.shape[0], k=1)
    if first.size == 0:
        return np.zeros(starts.shape[0])
    lo = low[None] + starts[:, :, None, :]  # (K, N, T, 2)
    hi = high[None] + starts[:, :, None, :]
    inter = np.clip(np.minimum(hi[:, first], hi[:, second]) - np.maximum(lo[:, first], lo[:, second]), 0, None)
    area = (high - low).prod(axis=-1)  # (N, T)
    smaller = np.minimum(area[first], area[second])  # (P, T)
    return (inter.prod(axis=-1) / smaller).max(axis=(1, 2))


def _mask(obj: Obj, track: _Track, start: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """bool (T, S, S): pixels whose centre lies in the object, per frame."""
    centre = (track.offset + start).astype(np.float32)  # (T, 2)
    if obj.shape == "circle":
        r2 = (track.side.astype(np.float32) / 2) ** 2
        return ((xs[None] - centre[:, 0, None, None]) ** 2 + (ys[None] - centre[:, 1, None, None]) ** 2
                <= r2[:, None, None])
    v = (_vertices(obj.shape, track.side, track.angle) + (track.offset + start)[:, None, :]).astype(np.float32)
    edge = np.roll(v, -1, axis=1) - v  # (T, K, 2), convex polygon
    # Cross product of each edge with the vector from its start to the pixel, expanded so that only two products
    # touch the (T, K, S, S) array; one sign inside a convex polygon, whatever the winding.
    ex, ey = edge[..., 0, None, None], edge[..., 1, None, None]
    const = (edge[..., 0] * v[..., 1] - edge[..., 1] * v[..., 0])[..., None, None]
    cross = ex * ys - ey * xs - const
    return (cross >= 0).all(axis=1) | (cross <= 0).all(axis=1)


def hazard_mask(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(band, magenta): bool (S, S) masks of the border band and of its magenta stripes."""
    i, j = np.indices((size, size))
    w = band_width(size)
    band = (i < w) | (i >= size - w) | (j < w) | (j >= size - w)
    stripe = max(1, round(size / 16))
    return band, band & (((i + j) // stripe) % 2 == 0)


@dataclasses.dataclass(frozen=True)
class Rendering:
    """What ``render_scene`` drew: the frames and, per frame, which object covers each pixel and where it is."""

    frames: np.ndarray  # uint8 (T, S, S, 3)
    owner: np.ndarray  # int8 (T, S, S): index into scene.objects of the object a pixel shows, -1 for none
    centre: np.ndarray  # float (N, T, 2): each object's centre (x, y) in pixels, per frame
    side: np.ndarray  # float (N, T): each object's side in pixels (a circle's diameter)
    angle: np.ndarray  # float (N, T): each object's rotation in radians


def render_scene(scene: Scene, *, num_frames: int = 8, size: int = 64, seed: int = 0) -> Rendering:
    """``render``'s frames with the ground truth behind them (the world's vision pre-training reads it)."""
    if not isinstance(scene, Scene):
        raise ValueError(f"render needs a Scene, got {type(scene).__name__}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} pixels for the shapes to be recognisable, got {size}")
    rng = np.random.default_rng(seed)
    tracks = [_track(o, num_frames, size) for o in scene.objects]
    starts = _place(tracks, size, rng)
    # Paint palette indices first and look the colours up once: much faster than assigning RGB through 4-D masks.
    palette = [BACKGROUND_RGB[scene.background], *HAZARD_RGB, *(COLOUR_RGB[o.colour] for o in scene.objects)]
    labels = np.zeros((num_frames, size, size), np.uint8)
    centres = np.arange(size, dtype=np.float32) + np.float32(0.5)
    xs, ys = np.meshgrid(centres, centres)
    # Big objects first, so a small one in front of a big one stays visible.
    for k in sorted(range(len(scene.objects)), key=lambda k: scene.objects[k].size != "big"):
        labels[_mask(scene.objects[k], tracks[k], starts[k], xs, ys)] = 3 + k
    if scene.hazard:
        band, magenta = hazard_mask(size)
        labels[:, band] = 2
        labels[:, magenta] = 1
    owner = np.where(labels >= 3, labels.astype(np.int8) - 3, -1).astype(np.int8)
    return Rendering(frames=np.asarray(palette, np.uint8)[labels], owner=owner,
                     centre=np.stack([t.offset + s for t, s in zip(tracks, starts)]),
                     side=np.stack([t.side for t in tracks]), angle=np.stack([t.angle for t in tracks]))


def render(scene: Scene, *, num_frames: int = 8, size: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 (num_frames, size, size, 3) frames of ``scene`` (geometry in the module docstring); positions from
    ``seed``, everything else from the scene, so the same arguments always give the same frames."""
    return render_scene(scene, num_frames=num_frames, size=size, seed=seed).frames
