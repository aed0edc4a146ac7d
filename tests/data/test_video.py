"""Tests for g4v_jax.data.video: sampling, CLIP resize/crop, decoding real files written with PyAV, padding, errors."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest

from g4v_jax.data.video import (
    CLIP_IMAGE_SIZE,
    VideoClip,
    VideoReadError,
    clip_from_array,
    load_video,
    resize_center_crop,
    resize_output_size,
    sample_frame_indices,
    stack_clips,
    synthetic_frames,
    write_video,
)

S = CLIP_IMAGE_SIZE


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def write_png(path: Path, image: np.ndarray) -> Path:
    """Lossless single-image write through PyAV's png encoder (no Pillow needed)."""
    fmt = {3: "rgb24", 4: "rgba"}[image.shape[-1]]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png")
        stream.height, stream.width = image.shape[:2]
        stream.pix_fmt = fmt
        container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format=fmt)))
        container.mux(stream.encode())
    return path


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


@pytest.fixture(scope="module")
def source_frames() -> np.ndarray:
    return synthetic_frames(20, 96, 128, seed=3)


@pytest.fixture(scope="module")
def video_path(tmp_path_factory, source_frames) -> Path:
    return Path(write_video(tmp_path_factory.mktemp("video") / "clip.mp4", source_frames, fps=8))


# --------------------------------------------------------------------------------------------------------------------
# sample_frame_indices
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_total, num_frames, expected",
    [
        (100, 4, [12, 37, 62, 87]),  # segments [0,25) [25,50) [50,75) [75,100)
        (20, 4, [2, 7, 12, 17]),
        (7, 3, [1, 3, 6]),  # bounds round(0, 2.33, 4.67, 7) = 0, 2, 5, 7
        (10, 1, [5]),
        (4, 4, [0, 1, 2, 3]),  # T == N: every frame once
        (2, 4, [0, 1]),  # N < T: all frames, caller pads
        (0, 4, []),
    ],
)
def test_sample_frame_indices_exact(num_total, num_frames, expected):
    got = sample_frame_indices(num_total, num_frames)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)


def test_sample_frame_indices_distinct_in_range_and_in_own_segment():
    for num_total in range(1, 120):
        for num_frames in range(1, min(num_total, 16) + 1):
            idx = sample_frame_indices(num_total, num_frames)
            assert len(idx) == num_frames
            assert idx[0] >= 0 and idx[-1] < num_total
            assert np.all(np.diff(idx) > 0)
            seg = num_total / num_frames
            assert np.all(np.abs(idx - (np.arange(num_frames) + 0.5) * seg) <= 1.0)


def test_sample_frame_indices_rejects_bad_args():
    with pytest.raises(ValueError):
        sample_frame_indices(10, 0)
    with pytest.raises(ValueError):
        sample_frame_indices(-1, 4)


# --------------------------------------------------------------------------------------------------------------------
# resize_center_crop
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(100, 300, 3), (300, 100, 3), (224, 224, 3), (96, 128, 3), (50, 50), (30, 90, 1),
                                   (240, 180, 4), (1, 1, 3), (225, 224, 3)])
def test_resize_center_crop_shapes(shape):
    frame = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = resize_center_crop(frame)
    assert out.shape == (S, S, 3) and out.dtype == np.uint8
    assert out.flags.c_contiguous


def test_resize_center_crop_identity_and_other_sizes():
    frame = np.random.default_rng(1).integers(0, 256, (S, S, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_center_crop(frame), frame)
    assert resize_center_crop(frame, size=32).shape == (32, 32, 3)


def test_resize_output_size_rounds_like_hf():
    # HF get_resize_output_image_size(default_to_square=False): long side = int(size * long / short)
    assert resize_output_size(100, 300, 224) == (224, 672)
    assert resize_output_size(300, 100, 224) == (672, 224)
    assert resize_output_size(1080, 1920, 224) == (224, 398)
    assert resize_output_size(96, 128, 224) == (224, 298)
    assert resize_output_size(224, 224, 224) == (224, 224)


def test_resize_center_crop_keeps_the_centre():
    # Three vertical bands; after short-side resize of a 100x300 image the centre crop sees only the middle band.
    frame = np.zeros((100, 300, 3), np.uint8)
    frame[:, :100, 0] = 255
    frame[:, 100:200, 1] = 255
    frame[:, 200:, 2] = 255
    out = resize_center_crop(frame)
    assert out[:, 8:-8, 1].min() >= 250 and out[:, 8:-8, [0, 2]].max() <= 5
    # constant images stay constant (weights are normalised)
    np.testing.assert_array_equal(resize_center_crop(np.full((37, 91, 3), 77, np.uint8)), 77)


def test_resize_center_crop_gray_and_rgba_follow_rgb():
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (120, 160), dtype=np.uint8)
    expected = resize_center_crop(np.repeat(gray[:, :, None], 3, axis=-1))
    np.testing.assert_array_equal(resize_center_crop(gray), expected)
    np.testing.assert_array_equal(resize_center_crop(gray[:, :, None]), expected)
    rgba = rng.integers(0, 256, (120, 160, 4), dtype=np.uint8)
    np.testing.assert_array_equal(resize_center_crop(rgba), resize_center_crop(rgba[:, :, :3]))


@pytest.mark.parametrize("bad", [np.zeros((10, 10, 3), np.float32), np.zeros((10, 10, 2), np.uint8),
                                 np.zeros((2, 10, 10, 3), np.uint8), np.zeros((0, 10, 3), np.uint8)])
def test_resize_center_crop_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        resize_center_crop(bad)


@pytest.mark.parametrize("hw", [(96, 128), (100, 300), (480, 640), (224, 500), (7, 13), (300, 100), (640, 480)])
def test_resize_center_crop_matches_pil_bicubic(hw):
    """Bit-exact with HF CLIPImageProcessor's geometry: PIL BICUBIC resize of the short side, then the centre crop."""
    from PIL import Image  # a dev dependency: this check must run, not skip
    frame = np.random.default_rng(sum(hw)).integers(0, 256, (*hw, 3), dtype=np.uint8)
    h, w = resize_output_size(*hw, S)
    ref = np.asarray(Image.fromarray(frame).resize((w, h), resample=Image.BICUBIC))
    top, left = (h - S) // 2, (w - S) // 2
    ref = ref[top : top + S, left : left + S]
    ours = resize_center_crop(frame)
    pil_major = int(Image.__version__.split(".")[0])
    if hw[0] > hw[1] and pil_major >= 13:
        # Pillow 13 may run the vertical pass first when height shrinks more (python-pillow/Pillow#9549); we keep the
        # horizontal-first order of the Pillow the released checkpoints were trained with, so allow rounding drift.
        assert np.abs(ours.astype(int) - ref).max() <= 24 and mean_abs_diff(ours, ref) < 0.5
    else:
        np.testing.assert_array_equal(ours, ref)


# --------------------------------------------------------------------------------------------------------------------
# synthetic_frames / write_video / load_video
# --------------------------------------------------------------------------------------------------------------------


def test_synthetic_frames_are_deterministic_and_move():
    a = synthetic_frames(5, 40, 60, seed=7)
    assert a.shape == (5, 40, 60, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, synthetic_frames(5, 40, 60, seed=7))
    assert all(mean_abs_diff(a[i], a[i + 1]) > 1.0 for i in range(4))


def test_load_video_samples_the_right_frames(video_path, source_frames):
    clip = load_video(video_path, num_frames=4)
    assert isinstance(clip, VideoClip)
    assert clip.frames.shape == (4, S, S, 3) and clip.frames.dtype == np.uint8
    assert clip.frame_mask.dtype == np.bool_ and clip.frame_mask.all()
    assert clip.source == str(video_path) and clip.num_real_frames == 4
    references = np.stack([resize_center_crop(f) for f in source_frames])
    for got, want in zip(clip.frames, sample_frame_indices(20, 4)):
        diffs = [mean_abs_diff(got, ref) for ref in references]
        assert diffs[want] < 10.0  # lossy codec
        assert int(np.argmin(diffs)) == want  # and it is that frame, not a neighbour


def test_load_video_with_more_frames_than_video_has_real_ones(video_path):
    clip = load_video(video_path, num_frames=32)  # 20 frames: every frame, then 12 padded
    assert clip.frames.shape == (32, S, S, 3)
    np.testing.assert_array_equal(clip.frame_mask, np.arange(32) < 20)
    np.testing.assert_array_equal(clip.frames[20:], np.broadcast_to(clip.frames[19], (12, S, S, 3)))


def test_write_video_returns_path_and_handles_odd_sizes(tmp_path):
    frames = synthetic_frames(6, 31, 45)
    out = write_video(tmp_path / "odd.mp4", frames)
    assert out == str(tmp_path / "odd.mp4")
    with av.open(out) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.height, stream.codec_context.width) == (32, 46)
        assert sum(1 for _ in container.decode(stream)) == 6
    with pytest.raises(ValueError):
        write_video(tmp_path / "bad.mp4", frames.astype(np.float32))


def test_write_video_replaces_a_file_whole_or_not_at_all(tmp_path, monkeypatch):
    """A reader of the path sees the old video or the new one: an encode that fails halfway leaves the old file as it
    was and no temporary file behind; a finished one replaces it."""
    import g4v_jax.data.video as video

    path = tmp_path / "v.mp4"
    write_video(path, synthetic_frames(4, 32, 32, seed=1), lossless=True)
    before = path.read_bytes()
    encode = video._encode_frames

    def fails_halfway(container, frames, *args):
        encode(container, frames[:2], *args)  # bytes reach the file being written, then the disk "fails"
        raise OSError("No space left on device")

    monkeypatch.setattr(video, "_encode_frames", fails_halfway)
    with pytest.raises(OSError, match="No space left"):
        write_video(path, synthetic_frames(4, 32, 32, seed=2), lossless=True)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["v.mp4"]
    monkeypatch.setattr(video, "_encode_frames", encode)
    write_video(path, synthetic_frames(4, 32, 32, seed=2), lossless=True)
    assert os.listdir(tmp_path) == ["v.mp4"]
    with av.open(str(path)) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    np.testing.assert_array_equal(decoded, synthetic_frames(4, 32, 32, seed=2))


@pytest.fixture(scope="module")
def short_video(tmp_path_factory) -> Path:
    frames = synthetic_frames(2, 64, 64, seed=1)
    return Path(write_video(tmp_path_factory.mktemp("short") / "two.mp4", frames))


def test_short_video_repeat_last(short_video):
    clip = load_video(short_video, num_frames=4)
    np.testing.assert_array_equal(clip.frame_mask, [True, True, False, False])
    np.testing.assert_array_equal(clip.frames[2], clip.frames[1])
    np.testing.assert_array_equal(clip.frames[3], clip.frames[1])
    assert mean_abs_diff(clip.frames[0], clip.frames[1]) > 1.0  # the two real frames differ


def test_short_video_zeros(short_video):
    clip = load_video(short_video, num_frames=4, pad="zeros")
    np.testing.assert_array_equal(clip.frame_mask, [True, True, False, False])
    assert not clip.frames[2:].any() and clip.frames[:2].any()


def test_short_video_error(short_video):
    with pytest.raises(VideoReadError, match="pad='error'") as info:
        load_video(short_video, num_frames=4, pad="error")
    assert str(short_video) in str(info.value)
    assert load_video(short_video, num_frames=2, pad="error").frame_mask.all()


def test_bad_pad_argument(short_video):
    with pytest.raises(ValueError, match="pad"):
        load_video(short_video, pad="wrap")


# --------------------------------------------------------------------------------------------------------------------
# unreadable inputs
# --------------------------------------------------------------------------------------------------------------------


def _empty_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    return path


def _text_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 20)
    return path


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "missing" / "nothing.mp4"


def _truncated(tmp_path: Path) -> Path:
    data = Path(write_video(tmp_path / "full.mp4", synthetic_frames(10, 32, 32))).read_bytes()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])  # mp4 index (moov) is written last, so this is cut off
    return path


def _audio_only(tmp_path: Path) -> Path:
    path = tmp_path / "sound.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _empty_dir(tmp_path: Path) -> Path:
    path = tmp_path / "no_images"
    path.mkdir()
    (path / "readme.txt").write_text("no images here")
    return path


def _dir_with_broken_image(tmp_path: Path) -> Path:
    path = tmp_path / "broken_images"
    path.mkdir()
    (path / "0.png").write_bytes(b"\x89PNG but not really")
    return path


@pytest.mark.parametrize(
    "make, reason",
    [
        (_empty_file, "failed"),
        (_text_file, "failed"),
        (_missing, "no such file"),
        (_truncated, "failed"),
        (_audio_only, "no video stream"),
        (_empty_dir, "no images"),
        (_dir_with_broken_image, "failed"),
    ],
)
def test_unreadable_inputs_raise_video_read_error_naming_the_path(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(VideoReadError) as info:
        load_video(path)
    message = str(info.value)
    assert str(path) in message and reason in message.lower()
    assert isinstance(info.value, ValueError)


def test_av_errors_are_chained(tmp_path):
    with pytest.raises(VideoReadError) as info:
        load_video(_text_file(tmp_path))
    assert isinstance(info.value.__cause__, av.error.FFmpegError)


# --------------------------------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------------------------------


def test_image_folder_loads_like_the_frames(tmp_path, source_frames, video_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(source_frames):
        write_png(folder / f"frame_{i}.png", frame)  # unpadded names: natural order must put 2 before 10
    (folder / "notes.txt").write_text("ignored")
    clip = load_video(folder, num_frames=4)
    assert clip.source == str(folder) and clip.frame_mask.all()
    # PNG is lossless, so the folder gives exactly what the array path gives ...
    np.testing.assert_array_equal(clip.frames, clip_from_array(source_frames, num_frames=4).frames)
    # ... and what the (lossy) video gives, up to codec noise.
    video_clip = load_video(video_path, num_frames=4)
    assert all(mean_abs_diff(a, b) < 10.0 for a, b in zip(clip.frames, video_clip.frames))


def test_image_folder_short_and_mixed_modes(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    rgb = synthetic_frames(2, 50, 70, seed=4)
    write_png(folder / "b.PNG", np.concatenate([rgb[1], np.full((50, 70, 1), 128, np.uint8)], axis=-1))  # RGBA
    write_png(folder / "a.png", rgb[0])
    clip = load_video(folder, num_frames=3)
    np.testing.assert_array_equal(clip.frame_mask, [True, True, False])
    np.testing.assert_array_equal(clip.frames[0], resize_center_crop(rgb[0]))
    np.testing.assert_array_equal(clip.frames[1], resize_center_crop(rgb[1]))  # alpha dropped
    np.testing.assert_array_equal(clip.frames[2], clip.frames[1])


def test_single_image_file_is_a_one_frame_video(tmp_path):
    frame = synthetic_frames(1, 40, 40)[0]
    clip = load_video(write_png(tmp_path / "one.png", frame), num_frames=2)
    np.testing.assert_array_equal(clip.frame_mask, [True, False])
    np.testing.assert_array_equal(clip.frames[0], resize_center_crop(frame))


# --------------------------------------------------------------------------------------------------------------------
# clip_from_array / stack_clips
# --------------------------------------------------------------------------------------------------------------------


def test_clip_from_array_uint8_and_float_agree(source_frames):
    clip = clip_from_array(source_frames, num_frames=4)
    assert clip.source == "<array>" and clip.frames.shape == (4, S, S, 3) and clip.frame_mask.all()
    expected = np.stack([resize_center_crop(source_frames[i]) for i in sample_frame_indices(20, 4)])
    np.testing.assert_array_equal(clip.frames, expected)
    as_float = source_frames.astype(np.float64) / 255.0
    np.testing.assert_array_equal(clip_from_array(as_float, num_frames=4).frames, clip.frames)


def test_clip_from_array_pads_and_accepts_grayscale_channel():
    frames = synthetic_frames(3, 24, 24)
    clip = clip_from_array(frames[..., :1], num_frames=5, size=16, pad="zeros")
    assert clip.frames.shape == (5, 16, 16, 3)
    np.testing.assert_array_equal(clip.frame_mask, [True, True, True, False, False])
    assert not clip.frames[3:].any()


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.full((2, 8, 8, 3), 1.5, np.float32), r"\[0, 1\]"),
        (np.full((2, 8, 8, 3), -0.1, np.float32), r"\[0, 1\]"),
        (np.full((2, 8, 8, 3), np.nan, np.float32), "NaN"),
        (np.zeros((8, 8, 3), np.uint8), "shape"),
        (np.zeros((1, 2, 8, 8, 3), np.uint8), "shape"),
        (np.zeros((2, 8, 8, 2), np.uint8), "shape"),
        (np.zeros((0, 8, 8, 3), np.uint8), "empty"),
        (np.zeros((2, 8, 8, 3), np.int64), "dtype"),
    ],
)
def test_clip_from_array_rejects_bad_arrays(bad, match):
    with pytest.raises(VideoReadError, match=match):
        clip_from_array(bad)


def test_stack_clips(source_frames):
    a = clip_from_array(source_frames, num_frames=4, size=32)
    b = clip_from_array(source_frames[:2], num_frames=4, size=32)
    frames, mask = stack_clips([a, b])
    assert frames.shape == (2, 4, 32, 32, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(mask, [[True] * 4, [True, True, False, False]])
    with pytest.raises(ValueError, match="different shapes"):
        stack_clips([a, clip_from_array(source_frames, num_frames=3, size=32)])
    with pytest.raises(ValueError, match="different shapes"):
        stack_clips([a, clip_from_array(source_frames, num_frames=4, size=16)])
    with pytest.raises(ValueError):
        stack_clips([])


def test_video_clip_validates_its_fields():
    with pytest.raises(ValueError):
        VideoClip(frames=np.zeros((2, 8, 8, 3), np.float32), frame_mask=np.ones(2, bool), source="x")
    with pytest.raises(ValueError):
        VideoClip(frames=np.zeros((2, 8, 8, 3), np.uint8), frame_mask=np.ones(3, bool), source="x")


def test_load_video_resamples_when_fewer_frames_decode_than_packets(video_path, monkeypatch):
    """If the packet count overstates the decodable frames, sampling is redone on the true count."""
    import g4v_jax.data.video as video_module

    expected = load_video(video_path, num_frames=4)
    monkeypatch.setattr(video_module, "_count_video_packets", lambda path, deadline: 30)  # the file has 20 frames
    with pytest.warns(UserWarning, match="promises 30 frames but only 20 decode"):
        got = load_video(video_path, num_frames=4)
    np.testing.assert_array_equal(got.frames, expected.frames)
    assert got.frame_mask.all()


# --------------------------------------------------------------------------------------------------------------------
# the released checkpoint's preprocessing (mPLUG-Owl-video), and untrusted paths
# --------------------------------------------------------------------------------------------------------------------


def _get_index(num_frames, num_segments):
    """mPLUG-Owl-video's frame sampling, as its processing code writes it (the reference rule, verbatim)."""
    seg_size = float(num_frames - 1) / num_segments
    start = int(seg_size / 2)
    offsets = np.array([start + int(np.round(seg_size * idx)) for idx in range(num_segments)])
    return offsets


def test_mplug_owl_sampling_is_get_index():
    from g4v_jax.data.video import sample_frame_indices

    np.testing.assert_array_equal(sample_frame_indices(48, 4, "mplug_owl"), [5, 17, 29, 40])
    np.testing.assert_array_equal(sample_frame_indices(48, 4), [6, 18, 30, 42])  # the default stays
    for n in range(4, 2001):
        for t in (4, 8):
            if n >= t:
                np.testing.assert_array_equal(sample_frame_indices(n, t, "mplug_owl"), _get_index(n, t))


def test_squash_is_pil_bicubic_to_a_square(source_frames):
    from PIL import Image

    from g4v_jax.data.video import resize_frame

    frame = source_frames[7]  # 96 x 128: not square, so squash and crop see different pixels
    reference = np.asarray(Image.fromarray(frame).resize((56, 56), Image.BICUBIC))
    np.testing.assert_array_equal(resize_frame(frame, 56, "squash"), reference)
    assert not np.array_equal(resize_frame(frame, 56, "short_side_crop"), reference)


def test_a_video_read_the_released_checkpoints_way(video_path, source_frames):
    """mplug_owl sampling + squash on a real file: the frames get_index picks, squashed (codec noise aside)."""
    from PIL import Image

    clip = load_video(video_path, num_frames=4, size=56, sampling="mplug_owl", resize="squash")
    for got, i in zip(clip.frames, _get_index(20, 4)):
        want = np.asarray(Image.fromarray(source_frames[i]).resize((56, 56), Image.BICUBIC)).astype(int)
        assert np.abs(got.astype(int) - want).mean() < 6  # lossy H.264 yuv420p round trip
        others = [np.abs(got.astype(int) - np.asarray(Image.fromarray(source_frames[j]).resize(
            (56, 56), Image.BICUBIC)).astype(int)).mean() for j in range(20) if j != i]
        assert np.abs(got.astype(int) - want).mean() < min(others)  # the right frame, not a neighbour


def test_a_truncated_file_warns_with_both_counts(tmp_path):
    frames = synthetic_frames(40, 64, 64, seed=2)
    path = tmp_path / "cut.mkv"  # Matroska keeps its index up front, so the head of a cut file still decodes
    write_video(path, frames)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 6 // 10])
    with pytest.warns(UserWarning, match=r"cut\.mkv: the container promises 40 frames but only \d+ can be read"):
        clip = load_video(path, num_frames=4)
    assert clip.frame_mask.all()


def _load_in_thread(path, **kwargs):
    """load_video in a thread with a join timeout: a regression that blocks fails the test instead of hanging CI."""
    import threading

    result = {}

    def run():
        try:
            result["clip"] = load_video(path, **kwargs)
        except Exception as e:  # noqa: BLE001 - handed to the test
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), f"load_video({path}) blocked"
    return result


def test_a_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "clip.mp4"
    os.mkfifo(fifo)
    result = _load_in_thread(fifo)
    assert isinstance(result.get("error"), VideoReadError)
    assert str(result["error"]) == f"{str(fifo)!r} is a FIFO: a video must be a regular file (or a folder of images)"


@pytest.mark.parametrize("path,kind", [("/dev/zero", "a character device"), ("/dev/null", "a character device")])
def test_device_files_are_refused(path, kind):
    result = _load_in_thread(path)
    assert isinstance(result.get("error"), VideoReadError) and f"is {kind}" in str(result["error"])


def test_a_directory_without_images_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a frame")
    with pytest.raises(VideoReadError, match="folder has no images"):
        load_video(tmp_path)


def test_decoding_has_a_time_limit(video_path):
    with pytest.raises(VideoReadError, match=r"decoding took longer than 1e-09 s \(decode_timeout_s\)"):
        load_video(video_path, decode_timeout_s=1e-9)
