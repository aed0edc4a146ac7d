"""Videos from untrusted requests: ``video_url`` content parts -> decoded ``VideoClip`` s, or a 400 naming the part.

Accepted URLs: ``data:video/<type>;base64,<bytes>`` (written to the server's own upload directory, never to a
client-chosen name) and ``file://<path>`` (absolute, or relative to the media directory: ``file://clip.mp4``) for a
regular file inside ``--media-dir`` only (``..``, symlinks out of it,
FIFOs and devices are refused before anything opens them). ``http(s)://`` and every other scheme: the server does
not fetch. Limits, each checked before any decoding: the size of one video, the number of frames a container says it
holds (a 10,000-frame upload is refused), the width x height of its frames and its frames x width x height (a
198 KB H.264 file declaring 8192 x 8192 frames, a decompression bomb, is refused, not decoded); then the decoder's
timeout (a stalled decode never hangs a worker). Decoding keeps only the sampled frames, each resized as it comes.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
import re
import tempfile
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from g4v_jax.data.video import (ClipCache, VideoClip, VideoReadError, check_video_path, declared_video_shape,
                                load_video)


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


def load_video_part(url: str, where: str, *, media_dir: Path | None, upload_dir: Path, limits: MediaLimits,
                    num_frames: int, size: int, sampling: str, resize: str,
                    gate: Callable[[str], bool] | None = None, cache: ClipCache | None = None
                    ) -> tuple[VideoClip, bool]:
    """One ``video_url`` -> (clip, flagged by ``gate(path)``, the input safety gate). ``MediaError`` (a 400) names
    ``where``. An uploaded video's file is removed once read. With ``cache``, a video seen before (the same data
    URL bytes, or the same file by path, size and modification time) is not decoded or gated again."""
    if not isinstance(url, str) or not url:
        raise MediaError(f"{where}: the video URL must be a non-empty string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    uploaded = False
    settings = (num_frames, size, sampling, resize, gate is not None)
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
        clip = load_video(path, num_frames=num_frames, size=size, sampling=sampling, resize=resize,
                          decode_timeout_s=limits.decode_timeout_s)
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
