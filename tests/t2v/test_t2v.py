"""Text-to-video backends: the interface, render_requests, the weight-free "solid" backend and the diffusers backend
on a tiny random TextToVideoSDPipeline built and saved offline (CPU, a few seconds)."""

import json
import subprocess
import sys

import av
import numpy as np
import pytest

from g4v_jax.data.video import load_video
from g4v_jax.tags import VideoRequest, parse_video_tags
from g4v_jax.t2v import (
    BACKENDS,
    RenderedVideo,
    SolidBackend,
    T2VBackend,
    T2VError,
    T2VSettings,
    make_backend,
    register_backend,
    render_requests,
    write_videos,
)
from g4v_jax.t2v.diffusers_backend import _to_uint8_videos

TINY = T2VSettings(num_frames=4, height=32, width=32, steps=2)
ANSWER = ("Sure! <video1>a red panda eating bamboo</video1> Then the sea: <video2>waves on a beach at night"
          "</video2> Enjoy.")


def _decode_all(path):
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


class Recorder:
    """Wraps a backend and records the prompts each generate call got."""

    name = "recorder"

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def generate(self, prompts, settings):
        self.calls.append(list(prompts))
        return self.inner.generate(prompts, settings)


class Failing:
    name = "failing"

    def __init__(self, bad_word=None):
        self.bad_word = bad_word

    def generate(self, prompts, settings):
        if self.bad_word is None or any(self.bad_word in p for p in prompts):
            raise T2VError("model weights missing")
        return SolidBackend().generate(prompts, settings)


# --------------------------------------------------------------------------------------------------------------------
# Settings, registry, solid backend, files
# --------------------------------------------------------------------------------------------------------------------


def test_settings_defaults_are_zeroscope_and_validated():
    s = T2VSettings()
    assert (s.num_frames, s.height, s.width, s.steps, s.guidance_scale) == (24, 320, 576, 40, 9.0)
    for bad in (dict(num_frames=0), dict(height=-1), dict(steps=0), dict(seed=-1), dict(guidance_scale=float("nan"))):
        with pytest.raises(ValueError):
            T2VSettings(**bad)
    with pytest.raises(TypeError):
        T2VSettings(num_frames=2.5)


def test_import_does_not_load_torch():
    code = "import sys, g4v_jax.t2v; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry():
    assert {"solid", "diffusers"} <= set(BACKENDS)
    assert isinstance(make_backend("solid"), T2VBackend)
    with pytest.raises(ValueError, match="unknown text-to-video backend 'zeroscope'.*diffusers, solid"):
        make_backend("zeroscope")
    try:
        register_backend("test-solid", SolidBackend)
        register_backend("test-solid", SolidBackend)  # same factory again: fine
        with pytest.raises(ValueError, match="already registered"):
            register_backend("test-solid", Failing)
        register_backend("test-solid", Failing, replace=True)
        assert isinstance(make_backend("test-solid", bad_word="x"), Failing)
    finally:
        BACKENDS.pop("test-solid", None)


def test_solid_backend_is_deterministic_and_tells_prompts_apart():
    backend = make_backend("solid")
    videos = backend.generate(["a cat", "a dog", "a cat"], TINY)
    assert videos.dtype == np.uint8 and videos.shape == (3, 4, 32, 32, 3)
    np.testing.assert_array_equal(videos[0], videos[2])
    assert not np.array_equal(videos[0], videos[1])
    np.testing.assert_array_equal(videos[0, 0, 0, -1], SolidBackend.colour("a cat"))  # background at the right edge
    assert len({videos[0, t].tobytes() for t in range(4)}) == 4  # the bar moves
    np.testing.assert_array_equal(backend.generate(["a cat"], TINY)[0], videos[0])  # batch-independent
    shifted = backend.generate(["a cat"], T2VSettings(num_frames=4, height=32, width=32, seed=1))[0]
    np.testing.assert_array_equal(shifted[0], videos[0, 1])  # seed shifts the bar's phase
    assert backend.generate([], TINY).shape == (0, 4, 32, 32, 3)


def test_write_videos_mp4_and_gif(tmp_path):
    videos = SolidBackend().generate(["a cat", "a dog"], T2VSettings(num_frames=6, height=31, width=45))
    paths = write_videos(videos, tmp_path / "out", "answer", fps=8, gif=True)
    assert [p.name for p in paths] == ["answer_1.mp4", "answer_2.mp4"]
    for path, video in zip(paths, videos):
        decoded = _decode_all(path)[:, :31, :45]  # odd sizes are padded by one edge pixel for yuv420p
        assert decoded.shape == video.shape
        assert np.abs(decoded.astype(int) - video).mean() < 6
        gif = _decode_all(path.with_suffix(".gif"))
        assert gif.shape == video.shape
        assert np.abs(gif.astype(int) - video).mean() < 40  # 3-3-2 palette: coarse but recognisable
        clip = load_video(path, num_frames=6, size=31)
        assert clip.frames.shape == (6, 31, 31, 3) and clip.frame_mask.all()
    with pytest.raises(ValueError, match="uint8"):
        write_videos(videos.astype(np.float32), tmp_path, "x")


# --------------------------------------------------------------------------------------------------------------------
# render_requests
# --------------------------------------------------------------------------------------------------------------------


def test_render_requests_solid(tmp_path):
    requests = parse_video_tags(ANSWER)
    backend = Recorder(make_backend("solid"))
    rendered = render_requests(backend, requests, TINY, tmp_path, stem="a1")
    assert backend.calls == [["a red panda eating bamboo", "waves on a beach at night"]]  # one batched call
    assert [r.request for r in rendered] == requests
    assert all(r.ok and r.error is None for r in rendered)
    assert [r.path.name for r in rendered] == ["a1_1.mp4", "a1_2.mp4"]
    for r in rendered:
        frames = _decode_all(r.path)
        assert frames.shape == (4, 32, 32, 3)
        assert np.abs(frames[0, 0, -1].astype(int) - SolidBackend.colour(r.request.prompt)).max() < 12


def test_render_requests_batches(tmp_path):
    requests = [VideoRequest(f"prompt {k}", None, 0, 1, True) for k in range(5)]
    backend = Recorder(make_backend("solid"))
    rendered = render_requests(backend, requests, TINY, tmp_path, batch_size=2)
    assert [len(c) for c in backend.calls] == [2, 2, 1]
    assert all(r.ok for r in rendered) and len({r.path for r in rendered}) == 5


def test_check_prompt_refuses_before_generation(tmp_path):
    requests = parse_video_tags(ANSWER)
    backend = Recorder(make_backend("solid"))
    rendered = render_requests(backend, requests, TINY, tmp_path,
                               check_prompt=lambda p: "animal content" if "panda" in p else None)
    assert backend.calls == [["waves on a beach at night"]]  # the refused prompt never reaches the model
    assert rendered[0] == RenderedVideo(requests[0], None, "refused: animal content")
    assert rendered[1].ok and rendered[1].path.name == "video_2.mp4"
    assert not (tmp_path / "video_1.mp4").exists()


def test_check_video_withholds_without_writing(tmp_path):
    requests = parse_video_tags(ANSWER)
    seen = []

    def check_video(frames):
        seen.append(frames.shape)
        return "unsafe frames" if len(seen) == 2 else None

    rendered = render_requests(make_backend("solid"), requests, TINY, tmp_path, check_video=check_video)
    assert seen == [(4, 32, 32, 3)] * 2
    assert rendered[0].ok
    assert rendered[1].path is None and rendered[1].error == "withheld: unsafe frames"
    assert not (tmp_path / "video_2.mp4").exists()


def test_checks_that_raise_fail_closed(tmp_path):
    requests = parse_video_tags(ANSWER)

    def broken(_):
        raise RuntimeError("classifier crashed")

    rendered = render_requests(make_backend("solid"), requests, TINY, tmp_path, check_prompt=broken)
    assert all(r.path is None and r.error.startswith("refused: prompt check failed (RuntimeError") for r in rendered)
    rendered = render_requests(make_backend("solid"), requests, TINY, tmp_path, check_video=broken)
    assert all(r.path is None and r.error.startswith("withheld: video check failed") for r in rendered)
    assert not list(tmp_path.iterdir())


def test_backend_failure_is_reported_per_request_not_raised(tmp_path):
    requests = parse_video_tags(ANSWER)
    rendered = render_requests(Failing(), requests, TINY, tmp_path)
    assert [r.request for r in rendered] == requests
    assert all(r.path is None and r.error == "generation failed: T2VError: model weights missing" for r in rendered)
    # one batch per request: only the failing prompt's batch fails
    rendered = render_requests(Failing(bad_word="panda"), requests, TINY, tmp_path, batch_size=1)
    assert not rendered[0].ok and rendered[1].ok


def test_bad_backend_output_is_reported(tmp_path):
    class WrongCount:
        name = "wrong"

        def generate(self, prompts, settings):
            return SolidBackend().generate(list(prompts)[:1], settings)

    class Floats:
        name = "floats"

        def generate(self, prompts, settings):
            return np.zeros((len(prompts), 2, 8, 8, 3), np.float32)

    requests = parse_video_tags(ANSWER)
    rendered = render_requests(WrongCount(), requests, TINY, tmp_path)
    assert all("1 video(s) for 2 prompt(s)" in r.error for r in rendered)
    rendered = render_requests(Floats(), requests, TINY, tmp_path)
    assert all("expected uint8 (N, F, H, W, 3)" in r.error for r in rendered)


def test_render_requests_edge_cases(tmp_path):
    assert render_requests(Failing(), [], TINY, tmp_path) == []
    with pytest.raises(ValueError, match="batch_size"):
        render_requests(make_backend("solid"), [], TINY, tmp_path, batch_size=0)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rendered = render_requests(make_backend("solid"), parse_video_tags(ANSWER), TINY, blocker)
    assert all(r.error.startswith("write failed:") for r in rendered)


# --------------------------------------------------------------------------------------------------------------------
# _to_uint8_videos: every .frames layout diffusers has returned
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def ref():
    """uint8 (2, 3, 8, 10, 3) reference videos and their float [0, 1] version."""
    u8 = np.random.default_rng(0).integers(0, 256, (2, 3, 8, 10, 3), dtype=np.uint8)
    return u8, u8.astype(np.float32) / 255.0


def test_to_uint8_current_np_layout(ref):
    u8, f = ref
    np.testing.assert_array_equal(_to_uint8_videos(f, 2), u8)  # diffusers >= 0.26, output_type="np"
    np.testing.assert_array_equal(_to_uint8_videos(u8, 2), u8)
    np.testing.assert_array_equal(_to_uint8_videos(f[0], 1), u8[:1])  # (F, H, W, 3): `.frames[0]`
    np.testing.assert_array_equal(_to_uint8_videos(f.transpose(0, 1, 4, 2, 3), 2), u8)  # channels first
    np.testing.assert_array_equal(_to_uint8_videos(list(f), 2), u8)  # a list of (F, H, W, 3) arrays
    np.testing.assert_array_equal(_to_uint8_videos(np.clip(f + 1e-4, 0, None), 2), u8)  # rounding noise above 1


def test_to_uint8_pil_layout(ref):
    Image = pytest.importorskip("PIL.Image")
    u8, _ = ref
    pil = [[Image.fromarray(frame) for frame in video] for video in u8]  # output_type="pil"
    np.testing.assert_array_equal(_to_uint8_videos(pil, 2), u8)
    rgba = [[Image.fromarray(np.dstack([frame, np.full(frame.shape[:2], 7, np.uint8)])) for frame in u8[0]]]
    np.testing.assert_array_equal(_to_uint8_videos(rgba, 1), u8[:1])


def test_to_uint8_torch_layout(ref):
    torch = pytest.importorskip("torch")
    u8, f = ref
    pt = torch.from_numpy(f).permute(0, 1, 4, 2, 3)  # output_type="pt": (N, F, C, H, W)
    np.testing.assert_array_equal(_to_uint8_videos(pt, 2), u8)
    np.testing.assert_array_equal(_to_uint8_videos(pt.to(torch.float64), 2), u8)


def test_to_uint8_pre_026_side_by_side_layout(ref):
    u8, _ = ref
    # tensor2vid before diffusers 0.26: a list of F uint8 frames (H, N*W, 3), the batch concatenated along the width
    old = [np.concatenate([u8[0, t], u8[1, t]], axis=1) for t in range(3)]
    np.testing.assert_array_equal(_to_uint8_videos(old, 2), u8)
    np.testing.assert_array_equal(_to_uint8_videos(list(u8[0]), 1), u8[:1])


def test_to_uint8_gray_and_alpha(ref):
    u8, _ = ref
    gray = u8[0, ..., 0]
    np.testing.assert_array_equal(_to_uint8_videos(list(gray), 1)[0], np.repeat(gray[..., None], 3, -1))  # (H, W)s
    rgba = np.concatenate([u8, np.zeros(u8.shape[:-1] + (1,), np.uint8)], axis=-1)
    np.testing.assert_array_equal(_to_uint8_videos(rgba, 2), u8)


@pytest.mark.parametrize(
    "frames, n, match",
    [
        (np.zeros((2, 3, 8, 10, 3), np.float32), 3, "2 video"),
        (np.zeros((3, 8, 10, 3), np.float32), 2, "expected an array"),
        (np.full((1, 3, 8, 10, 3), np.nan, np.float32), 1, "NaN"),
        (np.full((1, 3, 8, 10, 3), -1.0, np.float32), 1, r"\[0, 1\]"),
        (np.zeros((1, 3, 8, 10, 3), np.int16), 1, "dtype int16"),
        (np.zeros((1, 3, 8, 10, 5), np.uint8), 1, "channel axis"),
        ([], 1, "empty list"),
        ("frames", 1, "type str"),
        ([np.zeros((8, 9, 3), np.uint8)] * 3, 2, "side by side"),
        ([np.zeros((3, 8, 10, 3)), np.zeros((3, 8, 12, 3))], 2, "different shapes"),
    ],
)
def test_to_uint8_rejects(frames, n, match):
    with pytest.raises(ValueError, match=match):
        _to_uint8_videos(frames, n)


# --------------------------------------------------------------------------------------------------------------------
# The diffusers backend on a tiny random TextToVideoSDPipeline
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_t2v_dir(tmp_path_factory):
    """A tiny random TextToVideoSDPipeline (components sized as diffusers' own fast test) saved with save_pretrained."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from g4v_jax.t2v.tiny import build_tiny_pipeline

    return build_tiny_pipeline("zeroscope", tmp_path_factory.mktemp("tiny_t2v"))


@pytest.fixture(scope="module")
def tiny_backend(tiny_t2v_dir):
    return make_backend("diffusers", path=tiny_t2v_dir, device="cpu")


def test_diffusers_backend_generates_uint8_videos(tiny_backend, tmp_path):
    assert tiny_backend.name == "diffusers" and isinstance(tiny_backend, T2VBackend)
    assert type(tiny_backend.pipeline).__name__ == "TextToVideoSDPipeline"
    assert type(tiny_backend.pipeline.scheduler).__name__ == "DDIMScheduler"
    videos = tiny_backend.generate(["a red panda", "waves at night"], TINY)
    assert videos.dtype == np.uint8 and videos.shape == (2, 4, 32, 32, 3)
    assert videos.std() > 1 and not np.array_equal(videos[0], videos[1])
    # per-prompt generators: a prompt's video does not depend on its batch
    alone = tiny_backend.generate(["waves at night"], TINY)[0]
    assert np.abs(alone.astype(int) - videos[1]).max() <= 1
    paths = write_videos(videos, tmp_path, "zs")
    for path, video in zip(paths, videos):
        clip = load_video(path, num_frames=4, size=32)
        assert clip.frames.shape == (4, 32, 32, 3) and clip.frame_mask.all()
        # noise-like frames lose detail in yuv420p; the frames' mean colours survive
        assert np.abs(clip.frames.mean(axis=(1, 2)) - video.mean(axis=(1, 2))).max() < 4


def test_diffusers_backend_dpm_scheduler_and_negative_prompt(tiny_t2v_dir):
    backend = make_backend("diffusers", path=tiny_t2v_dir, device="cpu", scheduler="dpm", dtype="float32")
    assert type(backend.pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    settings = T2VSettings(num_frames=4, height=32, width=32, steps=2, negative_prompt="blurry", seed=3)
    videos = backend.generate(["a red panda", "waves at night"], settings)
    assert videos.dtype == np.uint8 and videos.shape == (2, 4, 32, 32, 3)
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_backend("diffusers", path=tiny_t2v_dir, device="cpu", scheduler="nonsense")


def test_swapping_the_backend_leaves_the_llm_side_untouched(tiny_t2v_dir, tmp_path):
    """The same requests (parsed from answer text: no model object anywhere) render with either backend."""
    requests = parse_video_tags(ANSWER)
    outcomes = {}
    for name, options in [("solid", {}), ("diffusers", {"path": tiny_t2v_dir, "device": "cpu"})]:
        rendered = render_requests(make_backend(name, **options), requests, TINY, tmp_path / name,
                                   check_prompt=lambda p: None, check_video=lambda v: None)
        outcomes[name] = [(r.request, r.error, r.path.name) for r in rendered]
        for r in rendered:
            assert load_video(r.path, num_frames=4, size=32).frames.shape == (4, 32, 32, 3)
    assert outcomes["solid"] == outcomes["diffusers"]
    assert [o[2] for o in outcomes["solid"]] == ["video_1.mp4", "video_2.mp4"]


def test_diffusers_backend_without_torch_points_at_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[torch\]'"):
        make_backend("diffusers", path=tmp_path)


def test_diffusers_backend_load_failures(tmp_path, tiny_t2v_dir):
    pytest.importorskip("diffusers")
    missing = tmp_path / "zeroscope_v2_576w"
    with pytest.raises(T2VError, match="zeroscope_v2_576w.*no such"):
        make_backend("diffusers", path=missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(T2VError, match="model_index.json"):
        make_backend("diffusers", path=empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "TextToVideoSDPipeline",
                                                         "unet": ["diffusers", "UNet3DConditionModel"]}))
    with pytest.raises(T2VError, match="broken.*cannot load"):
        make_backend("diffusers", path=broken)
    with pytest.raises(ValueError, match="unsupported dtype"):
        make_backend("diffusers", path=tiny_t2v_dir, dtype="int8")


def test_diffusers_generation_failure_becomes_t2v_error(tiny_t2v_dir, tmp_path):
    """With no family rules ("generic") diffusers' own check speaks, as one T2VError per request."""
    backend = make_backend("diffusers", path=tiny_t2v_dir, device="cpu", family="generic")
    bad = T2VSettings(num_frames=2, height=30, width=32, steps=1)  # the UNet needs sizes divisible by 8
    with pytest.raises(T2VError, match=r"pipeline.*generating 1 video\(s\).*divisible by 8"):
        backend.generate(["a red panda"], bad)
    rendered = render_requests(backend, parse_video_tags(ANSWER), bad, tmp_path)
    assert all(r.path is None and "divisible by 8" in r.error for r in rendered)
