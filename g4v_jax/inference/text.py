"""Model output as text: the answer cut at a stop string, its ``<video>`` requests, and streaming decoding.

``StreamDecoder`` turns token ids into text pieces that concatenate to exactly the final answer: it decodes the
cumulative ids each time (so BPE merges and multi-byte characters come out right) and holds back a tail that may
still change (trailing whitespace, a prefix of a stop string, a partial UTF-8 character).
"""

from __future__ import annotations

import dataclasses
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
    return _before_stop(text, stops).strip()


def _before_stop(text: str, stops: Sequence[str]) -> str:
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[:min(cuts)] if cuts else text


def finish_answer(text: str, num_tokens: int) -> Answer:
    """``Answer`` of decoded model output: cleaned (``clean_answer``) and its video requests parsed."""
    answer = clean_answer(text)
    return Answer(answer, parse_video_tags(answer), int(num_tokens))


class StreamDecoder:
    """Token ids in, answer text pieces out. Decodes the cumulative ids each time (so BPE merges and multi-byte
    characters come out right) and returns the new part of the cleaned text, holding back a tail that may still
    change: a partial character, the longest end of the text that may begin a stop string, and the whitespace before
    it. ``finish`` flushes; the pieces then concatenate to ``finish_answer(self.text, ...).text``.

    The held tail is found by a KMP automaton per stop string run over the text's last ``len(stop) - 1`` characters,
    so a push costs time linear in the stop strings' lengths (a client's ``stop`` cannot make it quadratic)."""

    def __init__(self, tokenizer, stops: Sequence[str] = (STOP_STRING,)) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self._failure = [prefix_function(s) for s in self.stops]
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
        return self._emit(self._settled(_before_stop(self.text, self.stops)))

    def finish(self) -> str:
        return self._emit(self.answer)

    def _settled(self, text: str) -> str:
        """The part of the answer that no later token can change (the class docstring), from the output before its
        first stop string, unstripped: a stop may begin with whitespace that stripping would hide (" #" before a
        stop " ##" would stream "#")."""
        stable = text.rstrip("\ufffd")
        held = max((stop_prefix_at_end(stable, s, f) for s, f in zip(self.stops, self._failure)), default=0)
        return _rstrip_unsettled(stable[:len(stable) - held]).lstrip()

    def _emit(self, visible: str) -> str:
        # visible text only grows; if a decode ever rewrote emitted text, wait until it agrees again
        if len(visible) <= len(self.emitted) or not visible.startswith(self.emitted):
            return ""
        piece, self.emitted = visible[len(self.emitted):], visible
        return piece


def prefix_function(pattern: str) -> list[int]:
    """KMP's failure table: ``out[i]`` = length of the longest proper prefix of ``pattern[:i + 1]`` that is also its
    suffix. O(len(pattern))."""
    out, k = [0] * len(pattern), 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = out[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        out[i] = k
    return out


def stop_prefix_at_end(text: str, stop: str, failure: Sequence[int]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of ``stop`` (where ``stop`` may still begin).
    O(len(stop)): only the last ``len(stop) - 1`` characters can take part."""
    k = 0
    for ch in text[max(0, len(text) - len(stop) + 1):] if len(stop) > 1 else "":
        while k and stop[k] != ch:
            k = failure[k - 1]
        if stop[k] == ch:
            k += 1
        if k == len(stop):  # a whole stop inside the window (the caller stops at it): keep matching past it
            k = failure[k - 1]
    return k


def _rstrip_unsettled(text: str) -> str:
    """``text`` without trailing whitespace and replacement characters (a partial UTF-8 character)."""
    end = len(text)
    while end and (text[end - 1].isspace() or text[end - 1] == "\ufffd"):
        end -= 1
    return text[:end]
