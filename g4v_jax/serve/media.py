"""Videos from untrusted requests: ``video_url`` content parts -> decoded ``VideoClip`` s, or a 400 naming the part.

Accepted URLs: ``data:video/<type>;base64,<bytes>`` (written to the server's own upload directory, never to a
client-chosen name) and ``file://<path>`` (absolute, or relative to the media directory: ``file://clip.mp4``) for a
regular file inside ``--media-dir`` only (``..``, symlinks out of it,
FIFOs and devices are refused before anything opens them). ``http(s)://`` and every other scheme: the server does
not fetch. Limits, each checked before any decoding: the size of one video, the number of frames a container says it
holds (a 10,000-frame upload is refused), the width x height of its frames and its frames x width x height (a
198 KB H.264 file declaring 8192 x 8192 frames, a decompression bomb, is refused, not decoded); then the decoder's
timeout (a stalled decode never hangs a worker). Decoding keeps only the sampled frames, each resized as it comes.

A video may also come as its frames (``load_frames_part``): images as ``data:image/<type>;base64,...`` or ``file://``
URLs inside the media directory, or vLLM's ``data:video/jpeg;base64,<frame>,<frame>,...``. Their bytes together are
bounded as one video's, each image's declared size before it is decoded, and they are read as a folder of images:
the model's sampling picks T of them (all of them, the rest masked, when there are fewer).

``read``: the frames to read (``api.VideoOptions``): ``num_frames`` k <= T reads k frames by the model's rule and masks
the rest; ``fps`` reads the frames at that rate (the video's declared duration x fps, rounded, at least 1, sampled
uniformly over it) if they are at most T. What the model cannot read is a 400 that says its limit.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from g4v_jax.data.video import (ClipCache, VideoClip, VideoReadError, check_video_path, declared_frame_rate,
                                declared_video_shape, load_video, pad_clip)


class MediaError(ValueError):
    """A video part the server refuses (HTTP 400); the message names the part."""


@dataclasses.dataclass(frozen=True)
class MediaLimits:
    max_video_bytes: int = 64 * 2**20
    max_video_frames: int = 3000  # as the container reports them
    max_frame_pixels: int = 4096 * 4096  # width x height the header declares (4K DCI and 4096-square fit)
    max_video_pixels: int = 3000 * 1920 * 1080  # frames x width x height: 3000 frames of 1080p
    decode_timeout_s: float = 30.0


_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.ASCII)


def _from_data_url(url: str, where: str, upload_dir: Path, limits: MediaLimits) -> Path:
    m = _DATA_URL.match(url)
    if m is None or not m.group("b64"):
        raise MediaError(f"{where}: a data URL must be data:video/<type>;base64,<bytes>")
    mime = m.group("mime") or ""
    if not mime.startswith("video/") and mime != "application/octet-stream":
        raise MediaError(f"{where}: the data URL's type is {mime or 'missing'!r}; send a video/* type")
    payload = url[m.end():]
    if len(payload) * 3 // 4 > limits.max_video_bytes:
        raise MediaError(f"{where}: the video is over the limit of {limits.max_video_bytes // 2**20} MiB")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{where}: the data URL is not valid base64") from None
    if not data:
        raise MediaError(f"{where}: the video is empty (0 bytes)")
    upload_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=".video", dir=upload_dir)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(name)


def _from_file_url(url: str, where: str, media_dir: Path | None) -> Path:
    if media_dir is None:
        raise MediaError(f"{where}: file:// URLs are off (the server was started without --media-dir)")
    raw = urllib.parse.unquote(url[len("file://"):] if url.lower().startswith("file://") else url[len("file:"):])
    if raw.startswith("localhost/"):
        raw = raw[len("localhost"):]
    if "\x00" in raw:
        raise MediaError(f"{where}: the video path holds a NUL character")
    root = media_dir.resolve()
    target = Path(raw) if os.path.isabs(raw) else root / raw
    try:
        resolved = target.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop, a name too long
        raise MediaError(f"{where}: {raw[:200]!r} cannot be resolved ({type(e).__name__})") from None
    if resolved != root and root not in resolved.parents:
        raise MediaError(f"{where}: {raw!r} is outside the media directory")
    try:
        check_video_path(resolved)
    except VideoReadError as e:
        raise MediaError(f"{where}: {e}") from None
    if not resolved.is_file():
        raise MediaError(f"{where}: {raw!r} is not a video file")
    return resolved


@dataclasses.dataclass(frozen=True)
class FrameRequest:
    """How many frames of a video to read (``api.VideoOptions`` without the import): ``num_frames`` or ``fps``."""

    num_frames: int | None = None
    fps: float | None = None
    where: str = ""


def frames_to_read(read: FrameRequest, total: int, rate: float, model_frames: int, where: str) -> int:
    """The frames to sample from a video of ``total`` frames at ``rate`` fps (0 for an image list), or a
    ``MediaError`` that says the model's limit."""
    if read.num_frames is not None:
        if read.num_frames > model_frames:
            raise MediaError(f"{read.where}.num_frames is {read.num_frames}; this model reads at most {model_frames} "
                             "frames a video (fewer are masked)")
        return read.num_frames
    if read.fps is not None:
        if not rate:
            raise MediaError(f"{read.where}.fps: {where} has no frame rate (frames sent as images, or a header that "
                             "states none); send num_frames instead")
        seconds = total / rate
        k = max(1, round(seconds * read.fps))
        if k > model_frames:
            raise MediaError(f"{read.where}.fps is {read.fps:g}: {where} lasts {seconds:.1f} s, which gives {k} frames; "
                             f"this model reads at most {model_frames} frames a video (an fps of at most "
                             f"{model_frames / seconds:.3g}, or num_frames <= {model_frames})")
        return k
    return model_frames


def _read(path: str, k: int, model_frames: int, size: int, sampling: str, resize: str, timeout_s: float) -> VideoClip:
    clip = load_video(path, num_frames=k, size=size, sampling=sampling, resize=resize, decode_timeout_s=timeout_s)
    return clip if k == model_frames else pad_clip(clip, model_frames)


_IMAGE_TYPES = {"image/jpeg": ".jpg", "image/jpg": ".jpg", "image/png": ".png", "image/webp": ".webp",
                "image/bmp": ".bmp", "image/gif": ".gif"}


def frame_urls(urls: tuple[str, ...]) -> list[str]:
    """vLLM's ``data:video/jpeg;base64,<f1>,<f2>,...`` -> one ``data:image/jpeg;base64,<f>`` per frame; other URLs
    as they are."""
    out = []
    for url in urls:
        head, sep, rest = url.partition(",")
        if sep and head.lower() == "data:video/jpeg;base64":
            out += [f"data:image/jpeg;base64,{b64}" for b64 in rest.split(",")]
        else:
            out.append(url)
    return out


def _write_frames(urls: list[str], where: str, media_dir: Path | None, folder: Path, limits: MediaLimits) -> None:
    """Each frame URL's image into ``folder`` as 00000.<ext>, 00001.<ext>, ...; their bytes together bounded as one
    video's, each image's declared size checked before anything decodes it."""
    total = 0
    for i, url in enumerate(urls):
        at = f"{where} (frame {i})"
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            m = _DATA_URL.match(url)
            mime = (m.group("mime") or "").lower() if m else ""
            if m is None or not m.group("b64") or mime not in _IMAGE_TYPES:
                raise MediaError(f"{at}: a frame must be data:image/<{'|'.join(sorted({t[6:] for t in _IMAGE_TYPES}))}>"
                                 ";base64,<bytes> or a file:// image in the media directory")
            payload = url[m.end():]
            total += len(payload) * 3 // 4
            if total > limits.max_video_bytes:
                raise MediaError(f"{where}: the frames are over the limit of {limits.max_video_bytes // 2**20} MiB "
                                 "for one video")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise MediaError(f"{at}: the data URL is not valid base64") from None
            ext = _IMAGE_TYPES[mime]
        elif scheme == "file":
            path = _from_file_url(url, at, media_dir)
            ext = path.suffix.lower()
            if ext not in set(_IMAGE_TYPES.values()) | {".jpeg"}:
                raise MediaError(f"{at}: {path.name!r} is not an image ({', '.join(sorted(set(_IMAGE_TYPES.values())))})")
            total += path.stat().st_size
            if total > limits.max_video_bytes:
                raise MediaError(f"{where}: the frames are over the limit of {limits.max_video_bytes // 2**20} MiB "
                                 "for one video")
            data = path.read_bytes()
        elif scheme in ("http", "https", "ftp", "s3", "gs"):
            raise MediaError(f"{at}: this server does not fetch remote URLs; send the frame as a data: URL (base64) "
                             "or a file:// path inside its media directory")
        else:
            raise MediaError(f"{at}: unsupported URL scheme {scheme or url[:20]!r}; use data: or file://")
        if not data:
            raise MediaError(f"{at}: the image is empty (0 bytes)")
        target = folder / f"{i:05d}{ext}"
        target.write_bytes(data)
        width, height = _image_size(target, at, limits.max_frame_pixels)
        if height * width > limits.max_frame_pixels:
            raise MediaError(f"{at}: the image declares {width}x{height}; this server decodes at most "
                             f"{limits.max_frame_pixels:,} pixels a frame")


def _image_size(path: Path, at: str, max_pixels: int) -> tuple[int, int]:
    """(width, height) from an image's header, nothing decoded (Pillow opens lazily): FFmpeg learns a PNG's size
    only by decoding it, which is what a decompression bomb wants."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError:  # Pillow's own guard, far above ours: the same answer
        raise MediaError(f"{at}: the image declares more pixels than the {max_pixels:,} a frame this server "
                         "decodes at most") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise MediaError(f"{at}: not a readable image") from None
    if not width or not height:
        raise MediaError(f"{at}: not a readable image (its header states no size)")
    return width, height


def load_frames_part(urls: tuple[str, ...], where: str, *, media_dir: Path | None, upload_dir: Path,
                     limits: MediaLimits, num_frames: int, size: int, sampling: str, resize: str,
                     gate: Callable[[str], bool] | None = None, cache: ClipCache | None = None,
                     read: FrameRequest = FrameRequest()) -> tuple[VideoClip, bool]:
    """A video sent as its frames (module docstring) -> (clip of ``num_frames`` slots, flagged by ``gate``, which
    reads the frames as a folder of images)."""
    urls_ = frame_urls(urls)
    if len(urls_) > limits.max_video_frames:
        raise MediaError(f"{where}: {len(urls_)} frames; this server takes at most {limits.max_video_frames}")
    k = frames_to_read(read, len(urls_), 0.0, num_frames, where)
    settings = (k, num_frames, size, sampling, resize, gate is not None)
    key = ("frames", hashlib.sha256("\n".join(urls_).encode("utf-8")).hexdigest(), settings)
    if cache is not None and (hit := cache.get(key)) is not None:
        return hit
    upload_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="frames-", dir=upload_dir))
    try:
        _write_frames(urls_, where, media_dir, folder, limits)
        clip = _read(str(folder), k, num_frames, size, sampling, resize, limits.decode_timeout_s)
        flagged = bool(gate(str(folder))) if gate is not None else False
    except VideoReadError as e:
        # the decoder names the frame's file in our folder: say which frame of the request it is
        reason = re.sub(r"'?/?(\d{5})\.\w+'?", lambda m: f"frame {int(m.group(1))}", _short(e, folder))
        raise MediaError(f"{where}: the frames are not readable images ({reason})") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if cache is not None:
        cache.put(key, (clip, flagged), clip.frames.nbytes)
    return clip, flagged


def load_video_part(url: str, where: str, *, media_dir: Path | None, upload_dir: Path, limits: MediaLimits,
                    num_frames: int, size: int, sampling: str, resize: str,
                    gate: Callable[[str], bool] | None = None, cache: ClipCache | None = None,
                    read: FrameRequest = FrameRequest()) -> tuple[VideoClip, bool]:
    """One ``video_url`` -> (clip, flagged by ``gate(path)``, the input safety gate). ``MediaError`` (a 400) names
    ``where``. An uploaded video's file is removed once read. With ``cache``, a video seen before (the same data
    URL bytes, or the same file by path, size and modification time) is not decoded or gated again."""
    if not isinstance(url, str) or not url:
        raise MediaError(f"{where}: the video URL must be a non-empty string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    uploaded = False
    settings = (num_frames, size, sampling, resize, gate is not None, read.num_frames, read.fps)
    if scheme == "data":  # keyed by its bytes before anything is written
        key = ("data", hashlib.sha256(url.encode("utf-8")).hexdigest(), settings)
    elif scheme == "file":
        path = _from_file_url(url, where, media_dir)
        info = path.stat()
        key = ("file", str(path), info.st_size, info.st_mtime_ns, settings)
    elif scheme in ("http", "https", "ftp", "s3", "gs"):
        raise MediaError(f"{where}: this server does not fetch remote URLs; send the video as a data: URL "
                         f"(base64) or a file:// path inside its media directory")
    else:
        raise MediaError(f"{where}: unsupported URL scheme {scheme or url[:20]!r}; use data: or file://")
    if cache is not None and (hit := cache.get(key)) is not None:
        return hit
    if scheme == "data":
        path, uploaded = _from_data_url(url, where, upload_dir, limits), True
    try:
        if path.stat().st_size > limits.max_video_bytes:
            raise MediaError(f"{where}: the video is over the limit of {limits.max_video_bytes // 2**20} MiB")
        frames, height, width = declared_video_shape(path, limits.decode_timeout_s)
        if frames > limits.max_video_frames:
            raise MediaError(f"{where}: the video has {frames} frames; this server takes at most "
                             f"{limits.max_video_frames}")
        if height * width > limits.max_frame_pixels or frames * height * width > limits.max_video_pixels:
            raise MediaError(f"{where}: the video declares {frames} frames of {width}x{height}; this server decodes "
                             f"at most {limits.max_frame_pixels:,} pixels a frame and {limits.max_video_pixels:,} a "
                             "video")
        rate = declared_frame_rate(path, limits.decode_timeout_s) if read.fps is not None else 0.0
        k = frames_to_read(read, frames, rate, num_frames, where)
        clip = _read(str(path), k, num_frames, size, sampling, resize, limits.decode_timeout_s)
        flagged = bool(gate(str(path))) if gate is not None else False
    except VideoReadError as e:
        raise MediaError(f"{where}: not a readable video ({_short(e, path)})") from None
    except MediaError:
        raise
    finally:
        if uploaded:
            path.unlink(missing_ok=True)
    if cache is not None:
        cache.put(key, (clip, flagged), clip.frames.nbytes)
    return clip, flagged


def _short(e: Exception, path: Path) -> str:
    """The decoder's reason without the server's own file name or errno noise."""
    text = str(e).replace(repr(str(path)), "").replace(str(path), "")
    text = re.sub(r"\[Errno -?\d+\]\s*", "", text)
    return re.sub(r"^[:\s]+|[:\s]+$", "", text)
