"""Video-generation requests in the LLM's answer: ``<video>a caption</video>`` spans (paper §3.2).

GPT4Video's LLM writes a text-to-video prompt between video tags wherever a video should appear in its answer; an
answer with several videos numbers them: ``<video1>...</video1>``, ``<video2>...</video2>`` (the same convention as
``data.template.video_tags``). ``parse_video_tags`` turns an answer into ``VideoRequest`` s, ``TagStreamParser`` does
the same while the answer is being generated, and ``strip_video_tags`` replaces the spans for display. The answer is
free model output and can be malformed, so nothing here raises on any text: malformed parts are dropped or left as
text according to the policy below.

Tags
    ``<video>``, ``</video>``, ``<video1>`` ... ``<video99>`` and their closing tags. Case-insensitive (ASCII only, so
    no Unicode case folding surprises), with optional spaces or tabs anywhere between the brackets: ``< Video 2 >``
    and ``</ video>`` are tags. The number is 1..99 written without a leading zero; ``<video0>``, ``<video01>``,
    ``<video100>``, ``<videos>`` and ``<video\\n>`` are not tags but ordinary text (a newline inside the brackets is
    not a model slip we have seen, and excluding it keeps tags on one line).

Spans, read left to right
    - An opening tag opens a span. If a span is already open, the new opening tag *restarts* it: the outer, unclosed
      span is dropped (``<video>a <video>b</video>`` gives one request, "b", starting at the second tag).
    - A closing tag closes the open span when the numbers agree: ``<videoN>...</videoN>`` or ``<video>...</video>``.
      Leniency: a number written on only one side is taken as the index (``<video2>...</video>`` is video 2, models
      write this; ``<video>...</video2>`` is video 2 as well, by symmetry). Two *different* numbers
      (``<video1>...</video2>``) do not match: the span is dropped and the closing tag consumed with it, because
      which video the caption belongs to is unknowable, and keeping the span open would swallow the following text.
    - A closing tag with no open span (stray) is ignored; it stays in the text.
    - The prompt is the text between the tags with whitespace normalised (stripped, every run of whitespace, newlines
      included, becomes one space). An empty or whitespace-only prompt gives no request.
    - A span still open at the end of the text is dropped, unless ``accept_unclosed=True``: then it is a request with
      ``closed=False``, the rest of the text (partial tags included) as its prompt and ``end == len(text)``.
    - Long prompts are kept, whatever their length: the text-to-video encoder truncates (77 CLIP tokens for
      ModelScope/ZeroScope) and dropping a request would silently lose a video the model meant to show.

Offsets
    ``start`` is the offset of the opening tag and ``end`` the offset just past the closing tag (or ``len(text)``),
    so ``text[start:end]`` is the whole span; requests come in order and never overlap.

Streaming
    ``TagStreamParser`` is the same parser fed in chunks (``parse_video_tags`` is one ``feed`` plus ``finish``), so
    it gives exactly the same requests, with offsets into the concatenated text, for any chunking. A request is
    returned by the ``feed`` call whose chunk completes its closing tag; an unclosed one by ``finish``. It is exact
    because a tag can contain no ``<``: every ``<`` starts at most one tag, decided by the text up to the next
    ``>``, so only the text from the last ``<`` on (while it can still grow into a tag) has to wait for more input.
    The parser keeps only that tail and the body of an open span, not the whole answer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

# [ \t] rather than \s: a tag stays on one line. re.ASCII: IGNORECASE folds only ASCII letters.
_TAG = re.compile(r"<[ \t]*(/)?[ \t]*video[ \t]*([1-9][0-9]?)?[ \t]*>", re.IGNORECASE | re.ASCII)
# Every proper prefix of a _TAG match (and a little more: it may over-accept, which costs only re-scanning, never
# correctness; under-accepting would lose tags split across chunks). Used with fullmatch on the text after a '<'.
_TAG_PREFIX = re.compile(
    r"<[ \t]*(?:/[ \t]*)?(?:v(?:i(?:d(?:e(?:o[ \t]*(?:[1-9][0-9]?[ \t]*)?)?)?)?)?)?", re.IGNORECASE | re.ASCII
)


@dataclasses.dataclass(frozen=True)
class VideoRequest:
    prompt: str  # the caption between the tags, whitespace-normalised; never empty
    index: int | None  # N of <videoN> (1-based, as written); None for plain <video>...</video>
    start: int  # offset of the opening tag in the answer
    end: int  # offset just past the closing tag; len(answer) for an accepted unclosed span
    closed: bool  # False only for an unclosed span accepted with accept_unclosed=True


@dataclasses.dataclass(frozen=True)
class _Tag:
    start: int  # absolute offsets in the whole text
    end: int
    closing: bool
    index: int | None


def _normalise(prompt: str) -> str:
    return " ".join(prompt.split())


def _matched_index(open_index: int | None, close_index: int | None) -> tuple[bool, int | None]:
    """(do the tags match, the request's index): equal numbers, or a number on at most one side (module docstring)."""
    if open_index is None or close_index is None or open_index == close_index:
        return True, open_index if open_index is not None else close_index
    return False, None


def _closed_request(opening: _Tag, closing: _Tag, body: str) -> VideoRequest | None:
    """The request of a span closed by ``closing``; None when the tags do not match or the prompt is empty."""
    ok, index = _matched_index(opening.index, closing.index)
    prompt = _normalise(body)
    if not ok or not prompt:
        return None
    return VideoRequest(prompt=prompt, index=index, start=opening.start, end=closing.end, closed=True)


def _unclosed_request(opening: _Tag, body: str, end: int) -> VideoRequest | None:
    prompt = _normalise(body)
    if not prompt:
        return None
    return VideoRequest(prompt=prompt, index=opening.index, start=opening.start, end=end, closed=False)


class TagStreamParser:
    """Incremental ``parse_video_tags``: ``feed(chunk)`` returns the requests completed by that chunk (tags split
    across chunks, e.g. ``"<vid" + "eo>a cat</vi" + "deo>"``, are handled); ``finish()`` ends the text and returns
    the still-open span as an unclosed request if ``accept_unclosed`` (else nothing). Offsets are into the
    concatenation of all chunks. After ``finish`` the parser is spent: ``feed``/``finish`` raise ``RuntimeError``.
    """

    def __init__(self, *, accept_unclosed: bool = False) -> None:
        self.accept_unclosed = accept_unclosed
        self._buf = ""  # the text from absolute offset _base on; earlier text is no longer needed
        self._base = 0
        self._scan = 0  # absolute offset from which tags have not been looked for yet
        self._open: _Tag | None = None  # the open span's opening tag
        self._finished = False

    def feed(self, chunk: str) -> list[VideoRequest]:
        if self._finished:
            raise RuntimeError("TagStreamParser.feed after finish(); use a new parser for a new text")
        if not isinstance(chunk, str):
            raise TypeError(f"TagStreamParser.feed takes str, got {type(chunk).__name__}")
        self._buf += chunk
        done: list[VideoRequest] = []
        pos = self._scan - self._base
        for m in _TAG.finditer(self._buf, pos):
            tag = _Tag(self._base + m.start(), self._base + m.end(), m.group(1) is not None,
                       int(m.group(2)) if m.group(2) else None)
            request = self._on_tag(tag)
            if request is not None:
                done.append(request)
            pos = m.end()
        # Everything before the last '<' after the last tag is decided; that '<' may still become a tag.
        last_lt = self._buf.rfind("<", pos)
        pending = last_lt >= 0 and _TAG_PREFIX.fullmatch(self._buf, last_lt) is not None
        self._scan = self._base + (last_lt if pending else len(self._buf))
        self._trim()
        return done

    def finish(self) -> list[VideoRequest]:
        if self._finished:
            raise RuntimeError("TagStreamParser.finish called twice")
        self._finished = True
        opening, self._open = self._open, None
        if opening is None or not self.accept_unclosed:
            return []
        end = self._base + len(self._buf)
        request = _unclosed_request(opening, self._text(opening.end, end), end)
        return [request] if request is not None else []

    def _on_tag(self, tag: _Tag) -> VideoRequest | None:
        """Advance the span state over one tag (module docstring); the request it completes, if any."""
        if not tag.closing:
            self._open = tag  # opens a span, or restarts the open one (the outer one is dropped)
            return None
        if self._open is None:
            return None  # stray closing tag: ignored
        opening, self._open = self._open, None
        return _closed_request(opening, tag, self._text(opening.end, tag.start))

    def _text(self, start: int, end: int) -> str:
        return self._buf[start - self._base : end - self._base]

    def _trim(self) -> None:
        """Forget the text that neither an open span's body nor a pending tag can still need."""
        keep = self._scan if self._open is None else min(self._scan, self._open.end)
        if keep > self._base:
            self._buf = self._buf[keep - self._base :]
            self._base = keep


def parse_video_tags(text: str, *, accept_unclosed: bool = False) -> list[VideoRequest]:
    """The video requests in an answer, in order (policy in the module docstring). Never raises on any ``str``."""
    parser = TagStreamParser(accept_unclosed=accept_unclosed)
    return parser.feed(text) + parser.finish()


def strip_video_tags(
    text: str,
    replacement: Callable[[VideoRequest], str] | str = "",
    *,
    accept_unclosed: bool = False,
) -> str:
    """The answer with each request's span ``text[start:end]`` replaced by ``replacement`` (a string, or a function
    of the request, e.g. ``lambda r: f"[video: {paths[r.start]}]"``).

    Only request spans are replaced; text that gave no request (stray or mismatched tags, empty spans, an unclosed
    span unless ``accept_unclosed``) is left as written, so nothing the model wrote disappears silently.
    """
    parts: list[str] = []
    pos = 0
    for request in parse_video_tags(text, accept_unclosed=accept_unclosed):
        parts.append(text[pos : request.start])
        parts.append(replacement(request) if callable(replacement) else replacement)
        pos = request.end
    parts.append(text[pos:])
    return "".join(parts)
