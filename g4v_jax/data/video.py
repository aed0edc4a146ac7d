"""Video and image-folder loading for the vision tower: decode, sample T frames, resize + center-crop, pad.

(~600 lines: decoding, the two sampling schemes, the resize that must match CLIP's processor bit for bit, and the
untrusted-input limits are one path that every reader of videos takes.)

Everything here is NumPy + PyAV on the host; the output is uint8 RGB so it is small to transfer to the device.

Frame sampling (``sample_frame_indices``; the model config's ``video.sampling``)
    ``uniform_mid`` (default): the N decodable frames are split into T equal segments ``[round(i*N/T),
    round((i+1)*N/T))`` and the middle frame of each segment is taken; T distinct frames whenever N >= T.
    ``mplug_owl``: mPLUG-Owl-video's ``get_index`` literally (``seg = (N-1)/T``; ``int(seg/2) + round(seg*i)``, numpy's
    half-to-even rounding), the indices its released checkpoint was trained with. The two differ by up to 2 frames
    (N=48: [6, 18, 30, 42] against [5, 17, 29, 40]). With N < T both take every frame and pad (below).

Resize (the model config's ``video.resize``)
    ``short_side_crop`` (default, CLIP's ``resize_center_crop`` below) or ``squash``: every frame resized to
    ``size x size`` whatever its aspect, as mPLUG-Owl-video reads videos (decord ``VideoReader(height=224,
    width=224)``), with the same PIL bicubic kernel (decord scales with libswscale's bicubic, so pixel values may
    differ by rounding; the geometry is the same).

Untrusted paths
    A path must be an image folder or a regular file (checked before opening: a FIFO, ``/dev/zero`` or another device
    would block or never end), and decoding stops with ``VideoReadError`` after ``decode_timeout_s`` seconds.
    A file whose container promises more frames than can be decoded (a truncated download) is read from its
    decodable head with a warning that names the file and both counts.

Resize and crop (``resize_center_crop``)
    As HF ``CLIPImageProcessor`` does for CLIP: resize so that the short side equals ``size`` (long side
    ``int(size * long / short)``), with PIL's antialiased bicubic filter reimplemented in NumPy (same taps, same 22-bit
    fixed-point coefficients and rounding, horizontal pass then vertical pass), then crop the centre ``size x size``
    (offset ``(extent - size) // 2``). Output is bit-identical to ``PIL.Image.resize(..., BICUBIC)`` + HF's crop,
    without depending on Pillow. (Pillow >= 13 runs the vertical pass first for some shapes where the height shrinks
    more, which moves a few pixels by rounding; we keep the horizontal-first order that the released checkpoints were
    preprocessed with.) Grayscale is replicated to RGB; an alpha channel is dropped (as PIL's ``convert("RGB")``).

Normalisation
    CLIP's mean/std normalisation is deliberately *not* done here: it lives in the model
    (``g4v_jax.models.clip_vit.normalize_frames``) so that it fuses into the jitted forward pass and the host sends
    uint8.

Short videos (fewer than T decodable frames, at least one)
    ``pad="repeat_last"`` (default) repeats the last real frame, ``pad="zeros"`` appends black frames, and
    ``pad="error"`` raises ``VideoReadError``. Padded positions are ``False`` in ``VideoClip.frame_mask``; real frames
    are ``True``. Frames are never duplicated to fill T, so the mask tells the model exactly which frames are real.

Errors
    A missing path, an empty/corrupt/non-video file, a file without a video stream, an empty image folder or a bad
    array raise ``VideoReadError`` (a ``ValueError``) whose message names the path and the cause; PyAV's own
    exceptions are chained as ``__cause__``.

Image folders
    A directory is read as a sequence of images (``.png .jpg .jpeg .bmp .webp``, case-insensitive, other files
    ignored), ordered by name with digit runs compared as numbers (``f2.png`` before ``f10.png``); each image is decoded
    with PyAV and only the sampled ones are decoded at all.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import re
import stat
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from fractions import Fraction

import av
import numpy as np

CLIP_IMAGE_SIZE = 224

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PAD_MODES = ("repeat_last", "zeros", "error")
SAMPLING_RULES = ("uniform_mid", "mplug_owl")
RESIZE_MODES = ("short_side_crop", "squash")
DECODE_TIMEOUT_S = 120.0  # a hostile or pathological file never holds a worker longer than this

# PIL's fixed-point resampling: coefficients scaled by 2**22 (ImagingResample's PRECISION_BITS for 8-bit images).
_PRECISION_BITS = 22
# Exceptions that PyAV/FFmpeg raise for unreadable input (FFmpegError covers codec/format errors; its subclasses also
# derive from OSError/ValueError/EOFError, which the standard library can raise too while reading).
_AV_ERRORS = (av.error.FFmpegError, OSError, EOFError, ValueError, RuntimeError)


class VideoReadError(ValueError):
    """Unreadable, empty or corrupt video/image input; message names the path and the cause."""


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: the generated __eq__ would compare arrays ambiguously
class VideoClip:
    frames: np.ndarray  # uint8 (T, size, size, 3), RGB
    frame_mask: np.ndarray  # bool (T,), False for padded frames
    source: str  # path or "<array>"

    def __post_init__(self) -> None:
        f, m = self.frames, self.frame_mask
        if f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3 or f.shape[1] != f.shape[2]:
            raise ValueError(f"VideoClip.frames must be uint8 (T, S, S, 3), got {f.dtype} {f.shape}")
        if m.dtype != np.bool_ or m.shape != f.shape[:1]:
            raise ValueError(f"VideoClip.frame_mask must be bool ({f.shape[0]},), got {m.dtype} {m.shape}")

    @property
    def num_real_frames(self) -> int:
        return int(self.frame_mask.sum())


# --------------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------------


def sample_frame_indices(num_total: int, num_frames: int, rule: str = "uniform_mid") -> np.ndarray:
    """Indices (int64, ascending) of ``num_frames`` frames of ``[0, num_total)`` by ``rule`` (module docstring):
    ``uniform_mid``, the middle frame of each of ``num_frames`` equal segments, or ``mplug_owl``, mPLUG-Owl-video's
    ``get_index``.

    With fewer than ``num_frames`` frames, all ``num_total`` indices are returned and the caller pads.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_total < 0:
        raise ValueError(f"num_total must be >= 0, got {num_total}")
    if rule not in SAMPLING_RULES:
        raise ValueError(f"sampling must be one of {SAMPLING_RULES}, got {rule!r}")
    if num_total < num_frames:
        return np.arange(num_total, dtype=np.int64)
    if rule == "mplug_owl":
        seg = float(num_total - 1) / num_frames
        return np.array([int(seg / 2) + int(np.round(seg * i)) for i in range(num_frames)], dtype=np.int64)
    # num_total * i / num_frames rather than seg * i: one correctly rounded division, so exact halves stay exact.
    bounds = np.round(num_total * np.arange(num_frames + 1) / num_frames)
    return ((bounds[:-1] + bounds[1:]) // 2).astype(np.int64)


# --------------------------------------------------------------------------------------------------------------------
# Resize + center crop (PIL bicubic, bit-exact)
# --------------------------------------------------------------------------------------------------------------------


def _bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic kernel (Keys, a = -0.5)."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _resample_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for bicubic: (taps (out, K) int, weights (out, K) int64).

    Downscaling widens the kernel by the scale factor (antialiasing); unused taps get weight 0 and a valid index.
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    # PIL truncates toward zero with a C cast; trunc then clamp reproduces it for negative values too.
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size)
    taps = xmin[:, None] + np.arange(ksize)[None, :]
    valid = taps < xmax[:, None]
    w = np.where(valid, _bicubic((taps - center[:, None] + 0.5) / filter_scale), 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total != 0.0, w / np.where(total == 0.0, 1.0, total), w)
    # C's (int)(x +/- 0.5): round half away from zero.
    fixed = np.trunc(w * (1 << _PRECISION_BITS) + np.where(w < 0, -0.5, 0.5)).astype(np.int64)
    return np.where(valid, taps, xmin[:, None]), fixed


def _resample_axis(img: np.ndarray, out_size: int, axis: int, keep: slice) -> np.ndarray:
    """Resize uint8 ``img`` along ``axis`` to ``out_size`` and return only the outputs in ``keep``.

    Output samples are independent of each other, so computing only the kept (cropped) ones is exact and cheaper.
    """
    if img.shape[axis] == out_size:  # PIL skips a pass whose size is unchanged
        return np.take(img, np.arange(out_size)[keep], axis=axis)
    taps, weights = _resample_coefficients(img.shape[axis], out_size)
    taps, weights = taps[keep], weights[keep]
    # int32 like PIL's accumulator (its 22-bit precision leaves headroom for 255 * sum|w|); contiguous rows make the
    # gathers fast (5x faster than int64 on a 1080p frame).
    src = np.ascontiguousarray(np.moveaxis(img, axis, 0), dtype=np.int32)
    acc = np.full((taps.shape[0], *src.shape[1:]), 1 << (_PRECISION_BITS - 1), dtype=np.int32)
    bcast = (-1,) + (1,) * (src.ndim - 1)
    for k in range(taps.shape[1]):
        acc += src[taps[:, k]] * weights[:, k].astype(np.int32).reshape(bcast)
    out = np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def _as_rgb_uint8(frame: np.ndarray) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 uint8 -> HxWx3 uint8 (gray replicated, alpha dropped)."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {frame.dtype}")
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.ndim != 3 or frame.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {frame.shape}")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"image has zero size: {frame.shape}")
    if frame.shape[-1] == 1:
        return np.repeat(frame, 3, axis=-1)
    return frame[:, :, :3]


def resize_output_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the short side to ``size``, rounding as HF's ``get_resize_output_image_size``."""
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def resize_center_crop(frame: np.ndarray, size: int = CLIP_IMAGE_SIZE) -> np.ndarray:
    """CLIP geometry: bicubic-resize the short side to ``size`` (aspect kept), then center-crop ``size x size``.

    ``frame`` is uint8 HxW, HxWx1, HxWx3 or HxWx4; returns uint8 (size, size, 3). Bit-identical to PIL + HF.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    rgb = _as_rgb_uint8(frame)
    h, w = rgb.shape[:2]
    new_h, new_w = resize_output_size(h, w, size)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    # PIL's order: horizontal pass (rounded to uint8) first, then vertical.
    out = _resample_axis(rgb, new_w, axis=1, keep=slice(left, left + size))
    out = _resample_axis(out, new_h, axis=0, keep=slice(top, top + size))
    return np.ascontiguousarray(out)


def resize_squash(frame: np.ndarray, size: int = CLIP_IMAGE_SIZE) -> np.ndarray:
    """mPLUG-Owl-video geometry: bicubic-resize the whole frame to ``size x size`` (aspect not kept); uint8
    (size, size, 3), bit-identical to ``PIL.Image.resize((size, size), BICUBIC)``."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    out = _resample_axis(_as_rgb_uint8(frame), size, axis=1, keep=slice(0, size))
    return np.ascontiguousarray(_resample_axis(out, size, axis=0, keep=slice(0, size)))


def resize_frame(frame: np.ndarray, size: int = CLIP_IMAGE_SIZE, mode: str = "short_side_crop") -> np.ndarray:
    """``resize_center_crop`` or ``resize_squash`` by ``mode`` (module docstring)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")
    return resize_squash(frame, size) if mode == "squash" else resize_center_crop(frame, size)


# --------------------------------------------------------------------------------------------------------------------
# Clip assembly
# --------------------------------------------------------------------------------------------------------------------


def _check_args(num_frames: int, size: int, pad: str) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if pad not in PAD_MODES:
        raise ValueError(f"pad must be one of {PAD_MODES}, got {pad!r}")


def _assemble_clip(frames: Sequence[np.ndarray], num_frames: int, size: int, pad: str, source: str) -> VideoClip:
    """Stack already resized (size, size, 3) frames and pad them to ``num_frames`` as ``pad`` says."""
    if not frames:
        raise VideoReadError(f"{source!r}: no decodable frames")
    missing = num_frames - len(frames)
    if missing > 0 and pad == "error":
        raise VideoReadError(f"{source!r}: has {len(frames)} frame(s) but {num_frames} were requested (pad='error')")
    filler = frames[-1] if pad == "repeat_last" else np.zeros((size, size, 3), np.uint8)
    stacked = np.stack(list(frames) + [filler] * max(missing, 0))
    mask = np.arange(num_frames) < len(frames)
    return VideoClip(frames=stacked, frame_mask=mask, source=source)


def clip_from_array(
    frames: np.ndarray, num_frames: int = 4, size: int = CLIP_IMAGE_SIZE, *, pad: str = "repeat_last",
    sampling: str = "uniform_mid", resize: str = "short_side_crop",
) -> VideoClip:
    """(N, H, W, C) frames, uint8 or float in [0, 1], C in {1, 3, 4} -> a ``VideoClip`` of ``num_frames`` frames.

    Floats are mapped to uint8 with rounding. Any problem with the array raises ``VideoReadError``.
    """
    _check_args(num_frames, size, pad)
    frames = _array_to_uint8(np.asarray(frames))
    indices = sample_frame_indices(frames.shape[0], num_frames, sampling)
    return _assemble_clip([resize_frame(frames[i], size, resize) for i in indices], num_frames, size, pad, "<array>")


def _array_to_uint8(frames: np.ndarray) -> np.ndarray:
    src = "<array>"
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
        raise VideoReadError(f"{src}: expected frames of shape (N, H, W, 3) (C may also be 1 or 4), got {frames.shape}")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise VideoReadError(f"{src}: empty frames array of shape {frames.shape}")
    if frames.dtype == np.uint8:
        return frames
    if not np.issubdtype(frames.dtype, np.floating):
        raise VideoReadError(f"{src}: expected uint8 or float frames in [0, 1], got dtype {frames.dtype}")
    if not np.all(np.isfinite(frames)):
        raise VideoReadError(f"{src}: float frames contain NaN or inf")
    lo, hi = float(frames.min()), float(frames.max())
    if lo < 0.0 or hi > 1.0:
        raise VideoReadError(f"{src}: float frames must lie in [0, 1], got values in [{lo:g}, {hi:g}]")
    return np.round(frames.astype(np.float32) * 255.0).astype(np.uint8)


def stack_clips(clips: Sequence[VideoClip]) -> tuple[np.ndarray, np.ndarray]:
    """Batch clips -> (frames (B, T, S, S, 3) uint8, frame_mask (B, T) bool); all clips must share T and S."""
    if not clips:
        raise ValueError("stack_clips needs at least one clip")
    shape = clips[0].frames.shape
    for clip in clips[1:]:
        if clip.frames.shape != shape:
            raise ValueError(
                f"cannot stack clips of different shapes: {clips[0].source!r} has (T, S, S, 3) = {shape}, "
                f"{clip.source!r} has {clip.frames.shape}"
            )
    return np.stack([c.frames for c in clips]), np.stack([c.frame_mask for c in clips])


# --------------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _reading(path: str, what: str) -> Iterator[None]:
    """Turn PyAV/OS errors raised while ``what`` into a ``VideoReadError`` naming ``path``."""
    try:
        yield
    except VideoReadError:
        raise
    except _AV_ERRORS as e:
        raise VideoReadError(f"{path!r}: {what} failed: {type(e).__name__}: {e}") from e


class _Deadline:
    """The time left to read one video; ``check`` raises ``VideoReadError`` naming the file once it has run out."""

    def __init__(self, path: str, seconds: float) -> None:
        self.path, self.seconds = path, seconds
        self.end = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise VideoReadError(f"{self.path!r}: decoding took longer than {self.seconds:g} s (decode_timeout_s); "
                                 "the file is pathological or far too long")


def _open(path: str, deadline: _Deadline):
    with _reading(path, "opening the video"):
        # timeout: FFmpeg's I/O interrupt callback, so even opening cannot outlast the deadline
        return av.open(path, timeout=max(deadline.end - time.monotonic(), 0.001))


def _count_video_packets(path: str, deadline: _Deadline) -> int:
    """Frame count without decoding: one demuxed packet per frame (the zero-size packet only flushes)."""
    container = _open(path, deadline)
    with container, _reading(path, "demuxing the video"):
        if not container.streams.video:
            raise VideoReadError(f"{path!r}: contains no video stream")
        stream = container.streams.video[0]
        count = 0
        for packet in container.demux(stream):
            deadline.check()
            count += packet.size > 0
        claimed = _claimed_frames(container, stream)
        if claimed and count < claimed - 1:  # one frame of slack for rounding of the header's duration
            warnings.warn(f"{path}: the container promises {claimed} frames but only {count} can be read (truncated "
                          f"or corrupt); sampling from those {count}", stacklevel=4)
        return count


def _claimed_frames(container, stream) -> int:
    """The frame count the header states: the stream's own count, else its (or the file's) duration x frame rate."""
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        return 0
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    else:
        return 0
    return int(round(seconds * float(rate)))


@contextlib.contextmanager
def _video_header(path: str | os.PathLike, timeout_s: float):
    """(container, its first video stream), opened for reading the header only."""
    source = check_video_path(path)
    container = _open(source, _Deadline(source, timeout_s))
    with container, _reading(source, "reading the video's header"):
        if not container.streams.video:
            raise VideoReadError(f"{source!r}: contains no video stream")
        yield container, container.streams.video[0]


def declared_video_shape(path: str | os.PathLike, timeout_s: float = DECODE_TIMEOUT_S) -> tuple[int, int, int]:
    """(frames, height, width) as a video file's header states them (frames 0 if it states none), read without
    decoding: what a server checks before it agrees to decode an upload. ``VideoReadError`` if the file cannot be
    opened."""
    with _video_header(path, timeout_s) as (container, stream):
        ctx = stream.codec_context
        return _claimed_frames(container, stream), int(ctx.height or 0), int(ctx.width or 0)


def declared_frame_rate(path: str | os.PathLike, timeout_s: float = DECODE_TIMEOUT_S) -> float:
    """Frames per second as a video file's header states them (0.0 if it states none), read without decoding."""
    with _video_header(path, timeout_s) as (_, stream):
        rate = stream.average_rate or stream.guessed_rate
        return float(rate) if rate else 0.0


def pad_clip(clip: VideoClip, num_frames: int) -> VideoClip:
    """``clip``'s real frames in a clip of ``num_frames`` slots (>= its real frames), the rest masked as a short
    video's are (the last frame repeated)."""
    real = [f for f, m in zip(clip.frames, clip.frame_mask) if m]
    if len(real) > num_frames:
        raise ValueError(f"a clip of {len(real)} frames does not fit {num_frames} slots")
    return _assemble_clip(real, num_frames, clip.frames.shape[1], "repeat_last", clip.source)


def _decode_video_at(path: str, wanted: np.ndarray, size: int, resize: str,
                     deadline: _Deadline) -> tuple[list[np.ndarray], int]:
    """Decode up to the last wanted index, keeping only wanted frames (already resized, so memory stays small).

    Returns the kept frames and how many frames were decoded; if that is <= the last wanted index, the video has fewer
    frames than the packet count promised and ``decoded`` is the exact total.
    """
    wanted_set = set(int(i) for i in wanted)
    last = int(wanted[-1]) if len(wanted) else -1
    kept: list[np.ndarray] = []
    decoded = 0
    container = _open(path, deadline)
    with container, _reading(path, "decoding the video"):
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            deadline.check()
            if decoded in wanted_set:
                kept.append(resize_frame(frame.to_ndarray(format="rgb24"), size, resize))
            decoded += 1
            if decoded > last:
                break
    return kept, decoded


def _load_video_file(path: str, num_frames: int, size: int, sampling: str, resize: str,
                     deadline: _Deadline) -> list[np.ndarray]:
    total = _count_video_packets(path, deadline)
    if total == 0:
        raise VideoReadError(f"{path!r}: video stream has no frames")
    wanted = sample_frame_indices(total, num_frames, sampling)
    kept, decoded = _decode_video_at(path, wanted, size, resize, deadline)
    if decoded <= int(wanted[-1]):
        # Fewer decodable frames than packets (a truncated file, corrupt packets): resample on the true count.
        if decoded == 0:
            raise VideoReadError(f"{path!r}: no decodable frames ({total} packets)")
        warnings.warn(f"{path}: the container promises {total} frames but only {decoded} decode (truncated or "
                      f"corrupt); sampling from those {decoded}", stacklevel=3)
        wanted = sample_frame_indices(decoded, num_frames, sampling)
        kept, _ = _decode_video_at(path, wanted, size, resize, deadline)
    return kept


class ClipCache:
    """Decoded clips (or anything holding them) kept by a key the caller chooses (a content hash, or a file's path,
    size and time), least recently used evicted past ``max_bytes``; thread-safe. A server then decodes a video that a
    conversation sends again in every turn once."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.hits = self.misses = 0
        self._items: collections.OrderedDict = collections.OrderedDict()  # key -> (value, bytes)
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key, value, nbytes: int) -> None:
        with self._lock:
            if nbytes > self.max_bytes or key in self._items:
                return
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                _, (_, old) = self._items.popitem(last=False)
                self._bytes -= old

    def __len__(self) -> int:
        return len(self._items)


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    # Digit runs compare as numbers so that unpadded dumps (f2, f10) keep their order; (0, n) < (1, s) keeps it total.
    return [(0, int(tok)) if tok.isdigit() else (1, tok) for tok in re.split(r"(\d+)", name) if tok]


def list_image_files(directory: str) -> list[str]:
    """Image files of ``directory`` (by extension, case-insensitive) in natural name order."""
    with _reading(directory, "listing the image folder"):
        names = [n for n in os.listdir(directory) if n.lower().endswith(IMAGE_EXTENSIONS)]
    names = [n for n in names if os.path.isfile(os.path.join(directory, n))]
    return [os.path.join(directory, n) for n in sorted(names, key=_natural_key)]


def _read_image(path: str) -> np.ndarray:
    """One image file -> uint8 (H, W, 3) RGB, decoded by PyAV (its image2 demuxer)."""
    with _reading(path, "opening the image"):
        container = av.open(path)
    with container, _reading(path, "decoding the image"):
        if not container.streams.video:
            raise VideoReadError(f"{path!r}: not an image (no video stream)")
        for frame in container.decode(video=0):
            return frame.to_ndarray(format="rgb24")
    raise VideoReadError(f"{path!r}: image has no decodable frame")


def _load_image_folder(directory: str, num_frames: int, size: int, sampling: str, resize: str,
                       deadline: _Deadline) -> list[np.ndarray]:
    files = list_image_files(directory)
    if not files:
        raise VideoReadError(f"{directory!r}: folder has no images with extensions {IMAGE_EXTENSIONS}")
    frames = []
    for i in sample_frame_indices(len(files), num_frames, sampling):
        deadline.check()
        frames.append(resize_frame(_read_image(files[i]), size, resize))
    return frames


def check_video_path(path: str | os.PathLike) -> str:
    """``path`` as a string if it is a regular file or a directory (an image folder); else ``VideoReadError``.

    Checked before anything opens it: opening a FIFO blocks until a writer comes, ``/dev/zero`` never ends.
    """
    source = os.fspath(path)
    try:
        mode = os.stat(source).st_mode
    except FileNotFoundError:
        raise VideoReadError(f"{source!r}: no such file or directory") from None
    except OSError as e:
        raise VideoReadError(f"{source!r}: cannot be read ({e.strerror})") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode) else
                "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
        raise VideoReadError(f"{source!r} is {kind}: a video must be a regular file (or a folder of images)")
    return source


def load_video(
    path: str | os.PathLike, num_frames: int = 4, size: int = CLIP_IMAGE_SIZE, *, pad: str = "repeat_last",
    sampling: str = "uniform_mid", resize: str = "short_side_crop", decode_timeout_s: float = DECODE_TIMEOUT_S,
) -> VideoClip:
    """Video file (anything FFmpeg decodes) or folder of images -> ``VideoClip`` of ``num_frames`` frames of
    ``size x size``.

    Frames are sampled by ``sampling``, resized by ``resize`` and padded per ``pad`` (module docstring); a model's
    settings are ``model.video.sampling`` / ``model.video.resize``. Unreadable input, a path that is not a regular
    file or image folder, and decoding longer than ``decode_timeout_s`` raise ``VideoReadError``.
    """
    _check_args(num_frames, size, pad)
    if sampling not in SAMPLING_RULES or resize not in RESIZE_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_RULES} and resize one of {RESIZE_MODES}, got "
                         f"{sampling!r} and {resize!r}")
    source = check_video_path(path)
    deadline = _Deadline(source, decode_timeout_s)
    if os.path.isdir(source):
        frames = _load_image_folder(source, num_frames, size, sampling, resize, deadline)
    else:
        frames = _load_video_file(source, num_frames, size, sampling, resize, deadline)
    return _assemble_clip(frames, num_frames, size, pad, source)


# --------------------------------------------------------------------------------------------------------------------
# Writing and synthetic content (demo, tests)
# --------------------------------------------------------------------------------------------------------------------


def _even_frames(frames: np.ndarray) -> np.ndarray:
    """Pad H and W to even sizes by repeating the last row/column: yuv420p subsamples chroma 2x2."""
    h, w = frames.shape[1:3]
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _add_video_stream(container: av.container.OutputContainer, fps: int, lossless: bool = False):
    """libx264 when FFmpeg has it (small, near-lossless at crf 18; ``lossless``: libx264rgb at quantiser 0), else the
    always-built-in mpeg4 encoder."""
    if lossless:
        try:
            stream = container.add_stream("libx264rgb", rate=Fraction(fps))
            stream.options = {"qp": "0", "preset": "veryfast"}
            return stream
        except (av.error.FFmpegError, ValueError):
            pass
    try:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.options = {"crf": "18", "preset": "veryfast"}
    except (av.error.FFmpegError, ValueError):  # UnknownCodecError (a ValueError): encoder not compiled in
        stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.bit_rate = 8_000_000
    return stream


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, *, full_chroma: bool = False,
                lossless: bool = False) -> str:
    """Write uint8 RGB frames (N, H, W, 3) as an H.264 (or MPEG-4 part 2) yuv420p video; returns the path.

    Odd H or W is padded by one edge pixel, since yuv420p needs even sizes. ``full_chroma`` writes H.264 yuv444p
    instead (colour at full resolution; yuv420p keeps it at half, which at a few dozen pixels blurs the outline of
    an object that differs from its background in colour more than in brightness). Players that only know 4:2:0
    may not show such a file; FFmpeg (and so ``load_video``) reads it. ``lossless``: H.264 in RGB at quantiser 0
    (libx264rgb), so decoding gives back exactly ``frames``; libx264's lossy output is not the same from one process
    to the next (the same frames and options: decoded pixels apart by up to 19 levels in about one video in fifty), so
    data that training must reproduce is written lossless. Without libx264 it falls back to the lossy encoders.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"write_video needs non-empty uint8 frames (N, H, W, 3), got {frames.dtype} {frames.shape}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    out = os.fspath(path)
    # A reader (another process rewriting the same world, a server streaming it) sees the old file or the new one,
    # never a half-written one; the temporary name is unique per writing thread and keeps the suffix that names the
    # format (and, unlike mkstemp's, the permissions of any file the user writes).
    head, name = os.path.split(out)
    stem, suffix = os.path.splitext(name)
    tmp = os.path.join(head, f".{stem}.{os.getpid()}.{threading.get_ident()}.tmp{suffix}")
    try:
        with av.open(tmp, mode="w") as container:
            _encode_frames(container, frames, fps, full_chroma, lossless)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return out


def _encode_frames(container, frames: np.ndarray, fps: int, full_chroma: bool, lossless: bool) -> None:
    stream = _add_video_stream(container, fps, lossless)
    if stream.codec_context.name == "libx264rgb":
        stream.pix_fmt = "rgb24"
    else:
        full_chroma = full_chroma and stream.codec_context.name == "libx264"  # mpeg4 knows 4:2:0 only
        if not full_chroma:
            frames = _even_frames(frames)
        stream.pix_fmt = "yuv444p" if full_chroma else "yuv420p"
    stream.height, stream.width = frames.shape[1:3]
    for rgb in frames:
        container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
    container.mux(stream.encode())  # flush delayed (B-)frames


def synthetic_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (num_frames, height, width, 3): a coloured square moving left to right over a static RGB gradient.

    Each frame differs from its neighbours (the square moves by about (width - side) / (num_frames - 1) pixels), so
    tests can tell which source frame a sampled frame came from.
    """
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"need num_frames, height, width >= 1, got {(num_frames, height, width)}")
    rng = np.random.default_rng(seed)
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    blue = np.float32(rng.uniform(0.2, 0.8))
    background = np.stack(
        np.broadcast_arrays(0.2 + 0.6 * xs, 0.2 + 0.6 * ys, np.full((1, 1), blue, np.float32)), axis=-1
    )
    background = np.round(background * 255).astype(np.uint8)
    # Saturated colour far from the muted gradient, so the square stays visible after lossy coding.
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255]], np.uint8)
    colour = palette[rng.integers(len(palette))]
    side = max(1, min(height, width) // 3)
    top = (height - side) // 2
    out = np.repeat(background[None], num_frames, axis=0)
    for t in range(num_frames):
        left = round((width - side) * t / max(num_frames - 1, 1))
        out[t, top : top + side, left : left + side] = colour
    return out
