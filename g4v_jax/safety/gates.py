"""The safety gates around the model (paper §4.3-4.4), as plain callables the chat, eval and t2v code plug in.

* Input video gate (``make_video_gate``): 10 frames sampled uniformly from the video (the official GPT4Video check)
  go through the Stable Diffusion safety checker; the video is flagged when more than ``max_flagged_fraction`` of
  them are (the release: more than 4 of 10). A flagged input video is answered with ``refusal.POLITE_REFUSAL`` and
  never described.
* Prompt gate (``keyword_prompt_check`` / ``model_prompt_check``): every ``<video>`` prompt the LLM writes is checked
  before a text-to-video backend runs. The model's own refusal (learned from the safety dialogues in stage 2) is the
  first gate; this one is the second. A check returns a reason string to stop the prompt, or None.
* Output video gate (``make_output_video_check``): every generated video goes through the same detector and is
  withheld, with a notice, when flagged.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from g4v_jax.data.video import load_video
from g4v_jax.safety.checker import flag_video, load_safety_checker
from g4v_jax.safety.refusal import is_refusal

DETECTOR_FRAMES = 10  # frames the official GPT4Video check samples per video
MAX_PROMPT_CHARS = 2000  # longer "prompts" are not prompts (a runaway generation); T2V encoders read ~77 tokens


def make_video_gate(checker_or_dir, *, max_flagged_fraction: float = 0.4,
                    num_frames: int = DETECTOR_FRAMES) -> Callable[[str], bool]:
    """``gate(path) -> True`` when the video at ``path`` is flagged. Unreadable videos raise ``VideoReadError``."""
    checker = checker_or_dir if not isinstance(checker_or_dir, (str, Path)) else load_safety_checker(checker_or_dir)
    size = checker.image_size

    def gate(path: str) -> bool:
        clip = load_video(path, num_frames=num_frames, size=size, pad="repeat_last")
        frames = clip.frames[clip.frame_mask]  # padding repeats a real frame: count each real frame once
        return flag_video(checker, frames, max_flagged_fraction=max_flagged_fraction).flagged

    return gate


def make_output_video_check(checker, *, max_flagged_fraction: float = 0.4) -> Callable[[np.ndarray], str | None]:
    """``check(video (F, H, W, 3) uint8) -> reason or None`` for generated videos (``t2v.render_requests``)."""
    def check(video: np.ndarray) -> str | None:
        idx = np.unique(np.linspace(0, len(video) - 1, min(DETECTOR_FRAMES, len(video))).round().astype(int))
        verdict = flag_video(checker, video[idx], max_flagged_fraction=max_flagged_fraction)
        if verdict.flagged:
            return f"the generated video was flagged by the safety checker ({verdict.flagged_frames}/{verdict.total} " \
                   "frames)"
        return None

    return check


def _basic_prompt_problem(prompt: str) -> str | None:
    if not prompt or not prompt.strip():
        return "empty prompt"
    if len(prompt) > MAX_PROMPT_CHARS:
        return f"prompt of {len(prompt)} characters (more than {MAX_PROMPT_CHARS}) is not a video description"
    return None


def keyword_prompt_check(blocklist: Sequence[str]) -> Callable[[str], str | None]:
    """A configured word/phrase list (whole words, case-insensitive); the cheap classifier of the two."""
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(w.lower()) for w in blocklist) + r")\b") if blocklist else None

    def check(prompt: str) -> str | None:
        problem = _basic_prompt_problem(prompt)
        if problem or pattern is None:
            return problem
        hit = pattern.search(prompt.lower())
        return f"prompt mentions {hit.group(0)!r}" if hit else None

    return check


CLASSIFIER_QUESTION = ("Would a video of the following description be harmful, explicit or violent? If it would, "
                       "refuse; if it is safe, repeat the description.\nDescription: {prompt}")


def model_prompt_check(ask: Callable[[str], str]) -> Callable[[str], str | None]:
    """The tuned LLM as the classifier: ``ask(question) -> answer`` (e.g. a ``ChatSession``'s fresh ``ask``); a
    refusal (``is_refusal``) stops the prompt."""

    def check(prompt: str) -> str | None:
        problem = _basic_prompt_problem(prompt)
        if problem:
            return problem
        answer = ask(CLASSIFIER_QUESTION.format(prompt=prompt))
        return "the model judged the prompt unsafe" if is_refusal(answer) else None

    return check
