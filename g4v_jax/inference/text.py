"""Model output as text: the answer cut at a stop string, its ``<video>`` requests, and streaming decoding.

``StreamDecoder`` turns token ids into text pieces that concatenate to exactly the final answer: it decodes the
cumulative ids each time (so BPE merges and multi-byte characters come out right) and holds back a tail that may
still change (trailing whitespace, a prefix of a stop string, a partial UTF-8 character).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from g4v_jax.tags import VideoRequest, parse_video_tags

STOP_STRING = "###"  # every turn prefix starts with it: the model is done with its answer


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str  # the answer, <video> tags included, without the "###" that ended it
    requests: list[VideoRequest]  # the <video>...</video> spans of ``text`` (offsets into ``text``)
    num_tokens: int  # tokens generated (the stop token included)
    videos: tuple = ()  # t2v.RenderedVideo per request when the session renders (path or error each)


def clean_answer(text: str, stops: Sequence[str] = (STOP_STRING,)) -> str:
    """The answer in decoded model output: up to the first stop string (default ``###``, the next turn's prefix),
    whitespace-stripped."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[:min(cuts)] if cuts else text).strip()


def finish_answer(text: str, num_tokens: int) -> Answer:
    """``Answer`` of decoded model output: cleaned (``clean_answer``) and its video requests parsed."""
    answer = clean_answer(text)
    return Answer(answer, parse_video_tags(answer), int(num_tokens))


class StreamDecoder:
    """Token ids in, answer text pieces out. Decodes the cumulative ids each time (so BPE merges and multi-byte
    characters come out right) and returns the new part of the cleaned text, holding back a tail that may still
    change (trailing whitespace or '#', which may become the stop string, or a partial character). ``finish``
    flushes; the pieces then concatenate to ``finish_answer(self.text, ...).text``."""

    def __init__(self, tokenizer, stops: Sequence[str] = (STOP_STRING,)) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        # a streamed tail that may still change: trailing whitespace, a partial character, or a prefix of a stop
        self._held = re.compile("(?:" + "|".join([r"[\s\ufffd]+"] + [
            "(?:" + "|".join(re.escape(s[:i]) for i in range(len(s), 0, -1)) + ")" for s in self.stops]) + r")+\Z")
        self.ids: list[int] = []
        self.text = ""  # decoded output so far (uncleaned)
        self.emitted = ""

    @property
    def stopped(self) -> bool:
        """The output contains a stop string: the answer is complete."""
        return any(s in self.text for s in self.stops)

    @property
    def answer(self) -> str:
        return clean_answer(self.text, self.stops)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._emit(self._held.sub("", self.answer))

    def finish(self) -> str:
        return self._emit(self.answer)

    def _emit(self, visible: str) -> str:
        # visible text only grows; if a decode ever rewrote emitted text, wait until it agrees again
        if len(visible) <= len(self.emitted) or not visible.startswith(self.emitted):
            return ""
        piece, self.emitted = visible[len(self.emitted):], visible
        return piece
