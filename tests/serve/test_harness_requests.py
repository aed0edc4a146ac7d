"""The request shapes of the field's evaluation harnesses and of vLLM's video clients, replayed with the official
``openai`` client against the real server:

- lmms-eval's ``openai`` model (``OpenAICompatible``), default mode: the harness decodes the video itself and sends
  its frames as ``image_url`` parts (PNG data URLs) after the question text;
- lmms-eval with ``pass_video_url=True``: one ``video_url`` (``file://``) and ``extra_body={"media_io_kwargs":
  {"video": {"num_frames": N}}}``;
- VLMEvalKit's ``OpenAIWrapper``: a system message, then text, ``nframe`` JPEG frames as ``image_url`` parts with
  ``detail``, the question; ``n=1``;
- vLLM's ``data:video/jpeg;base64,<frame>,<frame>,...`` and ``mm_processor_kwargs`` (fps, num_frames).

Each gets an answer and ``usage.video_frames`` (the frames the model read); the frames of a video sent as images
reach the model exactly as the video's own frames do (the same greedy answer); what the model cannot honour is a 400
that says its limit."""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import av
import numpy as np
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_server import Running, _data_url, _server, world  # noqa: E402,F401,F811  (the module fixture)

from g4v_jax.data.video import sample_frame_indices  # noqa: E402


@pytest.fixture(scope="module")
def served(world, tmp_path_factory):  # noqa: F811
    running = Running(_server(world, tmp_path_factory.mktemp("harness")))
    yield running
    running.stop()


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _image_url(frame: np.ndarray, fmt: str = "PNG") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(served, content, **extra):
    return served.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                                 max_tokens=8, temperature=0, **extra)


def _video_frames(response) -> list[int]:
    return response.usage.model_extra["video_frames"]


def test_lmms_eval_frames_mode_reads_the_videos_own_frames(served, world):  # noqa: F811
    """Text first, then the frames as PNG data URLs, as lmms-eval sends them. The T frames the model's rule picks,
    sent as images, give the answer the video gives; more frames are sampled to T, fewer are masked."""
    info = served.server.info
    frames = _frames(world["media"] / "a.mp4")
    question = {"type": "text", "text": "What happens in this video?"}
    picked = [frames[i] for i in sample_frame_indices(len(frames), info.num_frames, info.sampling)]
    as_images = _ask(served, [question, *({"type": "image_url", "image_url": {"url": _image_url(f)}} for f in picked)])
    as_video = _ask(served, [{"type": "video_url", "video_url": {"url": _data_url(world["media"] / "a.mp4")}},
                             question])
    assert as_images.choices[0].message.content == as_video.choices[0].message.content
    assert _video_frames(as_images) == _video_frames(as_video) == [info.num_frames]
    # lmms-eval's default max_frames_num=10 (plus the last frame): sampled down to the model's T
    eleven = [frames[i] for i in np.linspace(0, len(frames) - 1, 11).astype(int)]
    many = _ask(served, [question, *({"type": "image_url", "image_url": {"url": _image_url(f)}} for f in eleven)])
    assert _video_frames(many) == [info.num_frames]
    few = _ask(served, [question, *({"type": "image_url", "image_url": {"url": _image_url(f)}} for f in frames[:2])])
    assert _video_frames(few) == [2]


def test_lmms_eval_video_url_mode_with_media_io_kwargs(served, world):  # noqa: F811
    path = (world["media"] / "a.mp4").resolve()
    content = [{"type": "text", "text": "What happens?"}, {"type": "video_url", "video_url": {"url": f"file://{path}"}}]
    out = _ask(served, content, extra_body={"media_io_kwargs": {"video": {"num_frames": 2}}})
    assert out.choices[0].message.content is not None and _video_frames(out) == [2]
    t = served.server.info.num_frames
    with pytest.raises(openai.BadRequestError, match=f"reads at most {t} frames"):
        _ask(served, content, extra_body={"media_io_kwargs": {"video": {"num_frames": t + 1}}})


def test_vlmevalkit_openai_wrapper_shape(served, world):  # noqa: F811
    """A system message; text, nframe=8 JPEG frames with detail, the question; n=1 (VLMEvalKit's payload)."""
    frames = _frames(world["media"] / "b.mp4")
    parts = [{"type": "text", "text": ""}]
    parts += [{"type": "image_url", "image_url": {"url": _image_url(frames[i], "JPEG"), "detail": "low"}}
              for i in np.linspace(0, len(frames) - 1, 8).astype(int)]
    parts.append({"type": "text", "text": "Question: what moves? Answer briefly."})
    out = served.client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "You are a helpful assistant."},
                                {"role": "user", "content": parts}], max_tokens=8, n=1, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert _video_frames(out) == [served.server.info.num_frames]


def test_vllm_jpeg_frames_and_mm_processor_kwargs(served, world):  # noqa: F811
    frames = _frames(world["media"] / "a.mp4")
    b64 = [_image_url(f, "JPEG").split(",", 1)[1] for f in frames[:3]]
    jpeg = {"type": "video_url", "video_url": {"url": "data:video/jpeg;base64," + ",".join(b64)}}
    assert _video_frames(_ask(served, [jpeg, {"type": "text", "text": "What happens?"}])) == [3]
    video = {"type": "video_url", "video_url": {"url": "file://a.mp4"}}  # 12 frames at 8 fps: 1.5 s
    ask = [video, {"type": "text", "text": "What happens?"}]
    assert _video_frames(_ask(served, ask, extra_body={"mm_processor_kwargs": {"fps": 1}})) == [2]
    assert _video_frames(_ask(served, ask, extra_body={"mm_processor_kwargs": {"num_frames": 3}})) == [3]
    t = served.server.info.num_frames
    with pytest.raises(openai.BadRequestError, match=rf"lasts 1.5 s, which gives 12 frames; this model reads at most {t}"):
        _ask(served, ask, extra_body={"mm_processor_kwargs": {"fps": 8}})


@pytest.mark.parametrize("extra, message", [
    ({"mm_processor_kwargs": {"max_pixels": 100}}, "'max_pixels'.* not supported"),
    ({"mm_processor_kwargs": {"num_frames": 2, "fps": 1}}, "num_frames or fps, not both"),
    ({"mm_processor_kwargs": {"fps": 1}, "media_io_kwargs": {"video": {"num_frames": 2}}}, "not both"),
    ({"media_io_kwargs": {"image": {}}}, "media_io_kwargs"),
    ({"mm_processor_kwargs": {"num_frames": 0}}, "num_frames' must be an integer >= 1"),
    ({"mm_processor_kwargs": {"fps": -1}}, "fps' must be a number"),
])
def test_sampling_options_it_cannot_honour_are_refused_not_ignored(served, extra, message):
    ask = [{"type": "video_url", "video_url": {"url": "file://a.mp4"}}, {"type": "text", "text": "What happens?"}]
    with pytest.raises(openai.BadRequestError, match=message):
        _ask(served, ask, extra_body=extra)


def _png_declaring(width: int, height: int) -> bytes:
    """A 1 x 1 PNG whose header claims ``width`` x ``height`` (its IHDR checksum fixed, so decoders believe it)."""
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    ihdr = 8 + 4  # signature, then the IHDR chunk's length; its type and data follow
    png[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    png[ihdr + 4 + 13:ihdr + 4 + 17] = struct.pack(">I", zlib.crc32(bytes(png[ihdr:ihdr + 4 + 13])))
    return bytes(png)


def test_bad_frames_get_a_clear_error_naming_the_part(served, world, tmp_path):  # noqa: F811
    frame = _frames(world["media"] / "a.mp4")[0]
    text = {"type": "text", "text": "What happens?"}
    cases = [
        ([text, {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGVsbG8="}}], "a frame must be"),
        ([text, {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}],
         "not a readable image"),
        ([text, {"type": "image_url", "image_url": {"url": "file://../outside.png"}}], "outside the media directory"),
        ([text, {"type": "image_url", "image_url": {"url": "https://example.com/f.png"}}], "does not fetch"),
        ([text, {"type": "image_url", "image_url": {"url": _image_url(frame)}}], None),  # the control: answered
    ]
    # an image declaring 20000 x 20000 pixels (a decompression bomb) is refused before it is decoded
    bomb = "data:image/png;base64," + base64.b64encode(_png_declaring(20000, 20000)).decode()
    cases.append(([text, {"type": "image_url", "image_url": {"url": bomb}}], "decodes at most"))
    cases.append(([text, {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
        _png_declaring(5000, 5000)).decode()}}], "decodes at most"))
    for content, message in cases:
        if message is None:
            assert _video_frames(_ask(served, content)) == [1]
            continue
        with pytest.raises(openai.BadRequestError, match=message) as e:
            _ask(served, content)
        assert "messages[0].content[1]" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="fps: .* no frame rate"):
        _ask(served, [text, {"type": "image_url", "image_url": {"url": _image_url(frame)}}],
             extra_body={"mm_processor_kwargs": {"fps": 1}})
    assert _ask(served, "still answering").choices[0].message.content is not None
