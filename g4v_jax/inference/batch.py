"""Answering many requests on the continuous-batching engine (the chat CLI's batch mode, the evals, the world demo).

A request is ``{"id", "videos": [paths], "turns": [{"from": "human"|"ai", "value"} | {"from": "human", "video": i}],
"max_new_tokens", "temperature", "top_p", "top_k", "seed"}`` (sampling keys optional). Every request is queued on one
``Engine`` with ``batch_size`` slots; a finished request's slot is refilled at once, so short answers never wait for
long ones. A sampled request draws with its own seed (its ``seed`` key, else the run's), so its answer does not
depend on the other requests or on ``batch_size``. A request that cannot be prepared (bad turns, unreadable video,
too long for the context, ``max_new_tokens: 0``) gets ``{"id", "error"}`` and the others are answered.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


from g4v_jax.config import EngineConfig
from g4v_jax.data.template import SYSTEM_PROMPT, TokenizedConversation, Turn, tokenize_conversation
from g4v_jax.data.video import VideoClip, VideoReadError, load_video
from g4v_jax.inference.engine import Engine, EngineRequest, EngineResult, RequestError
from g4v_jax.inference.generate import SamplingConfig, pow2
from g4v_jax.inference.session import (SAMPLING_KEYS, ModelInfo, cache_length, check_vocab, model_info, prompt_length,
                                      with_stops)
from g4v_jax.inference.text import finish_answer


class BatchOutputError(RuntimeError):
    """The answers file cannot be written, or the run was interrupted; the message says what was kept."""


# --------------------------------------------------------------------------------------------------------------------
# Batch mode
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    id: Any
    turns: list[Turn]
    videos: list[str]
    settings: dict  # the request's own sampling keys and seed


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name!r} must be an integer, got {value!r}")
    return value


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name!r} must be a number, got {value!r}")
    return float(value)


def parse_request(obj: Any, default_id: Any = None) -> ParsedRequest:
    """Check one request (module docstring) and turn it into ``Turn`` s; ``ValueError`` says what is wrong."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"a request must be a JSON object, got {type(obj).__name__}")
    rid = obj.get("id", default_id)
    videos = obj.get("videos", [])
    if not isinstance(videos, list) or not all(isinstance(v, str) and v for v in videos):
        raise ValueError(f"'videos' must be a list of paths, got {videos!r}")
    raw_turns = obj.get("turns")
    if not isinstance(raw_turns, list) or not raw_turns:
        raise ValueError("'turns' must be a non-empty list of {\"from\": \"human\"|\"ai\", \"value\": text} or "
                         "{\"from\": \"human\", \"video\": index}")
    turns = []
    for i, t in enumerate(raw_turns):
        if not isinstance(t, Mapping) or t.get("from") not in ("human", "ai"):
            raise ValueError(f"turn {i} must be an object with \"from\": \"human\" or \"ai\", got {t!r}")
        try:
            if "video" in t:
                turns.append(Turn(t["from"], video=t["video"]))
            else:
                turns.append(Turn(t["from"], t.get("value", "")))
        except ValueError as e:
            raise ValueError(f"turn {i}: {e}") from None
    referenced = [t.video for t in turns if t.video is not None]
    if referenced != list(range(len(videos))):
        raise ValueError(f"the video turns must be numbered 0..{len(videos) - 1} in order, one per path in "
                         f"'videos' ({len(videos)}), got {referenced}")
    if turns[-1].role != "human":
        raise ValueError("the last turn must be a human one (the model answers it)")
    settings = {}
    for name in SAMPLING_KEYS + ("seed",):
        if name in obj:
            check = _number if name in ("temperature", "top_p") else _int
            settings[name] = check(obj[name], name)
    SamplingConfig(**{k: v for k, v in settings.items() if k != "seed"})  # range checks
    return ParsedRequest(rid, turns, videos, settings)


@dataclasses.dataclass
class _Job:
    position: int
    id: Any
    conv: TokenizedConversation
    clips: list[VideoClip]
    sampling: SamplingConfig
    seed: int


def answer_requests(model, tokenizer, requests: Sequence[Mapping], *, sampling: SamplingConfig = SamplingConfig(),
                    batch_size: int = 8, num_frames: int | None = None, image_size: int | None = None,
                    system_prompt: str = SYSTEM_PROMPT, seed: int = 0, progress: bool = True,
                    on_result: Callable[[dict], None] | None = None,
                    engine_config: EngineConfig | None = None) -> list[dict]:
    """Answer many requests (module docstring) on the engine; results in input order.

    ``on_result`` is called with each result as soon as it is final (a request's error at once, an answer when its
    last token is out), so a caller can write them out before the rest are done. ``batch_size`` is the engine's
    number of slots; its cache is sized to the longest request (``engine_config`` overrides both).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from tqdm import tqdm

    info = model_info(model, tokenizer, num_frames, image_size)
    base = with_stops(sampling, tokenizer)
    results: list[dict | None] = [None] * len(requests)
    clip_cache: dict[str, VideoClip | VideoReadError] = {}
    jobs: list[_Job] = []

    def finish(pos: int, result: dict) -> None:
        results[pos] = result
        if on_result is not None:
            on_result(result)

    for pos, obj in enumerate(requests):
        rid = obj.get("id", pos) if isinstance(obj, Mapping) else pos
        try:
            jobs.append(_prepare(pos, obj, info, tokenizer, base, seed, system_prompt, clip_cache))
        except ValueError as e:  # VideoReadError included
            finish(pos, {"id": rid, "error": str(e)})

    with tqdm(total=len(requests), disable=not progress, desc="answering", unit="req", file=sys.stderr) as bar:
        bar.update(sum(r is not None for r in results))
        if jobs:
            engine = Engine(model, tokenizer, engine_config or _engine_config(info, jobs, batch_size),
                            eos_id=info.eos_id)
            for job in jobs:
                def done(res: EngineResult, job=job) -> None:
                    finish(job.position, _answer(job, res))
                    bar.update(1)

                try:
                    engine.submit(EngineRequest.from_conversation(
                        job.conv, [(c.frames, c.frame_mask) for c in job.clips], job.sampling, seed=job.seed,
                        id=job.id), on_done=done)
                except RequestError as e:
                    finish(job.position, {"id": job.id, "error": str(e)})
                    bar.update(1)
            engine.run()
    return results  # type: ignore[return-value]


def _engine_config(info: ModelInfo, jobs: Sequence["_Job"], batch_size: int) -> EngineConfig:
    """Slots = ``batch_size`` (fewer, a power of two of at least 8, for fewer requests); the cache fits the longest
    prompt + budget (``cache_length``). Calls with similar requests get the same shapes, so the evals' many calls
    reuse one set of compiled programs. The floor of 8: a decode step reads every weight whatever its rows, so 8 rows
    cost about what 1 does, and calls of 1, 2, 4 and 8 requests share one compile."""
    need = max(len(j.conv) + j.sampling.max_new_tokens for j in jobs)
    return EngineConfig(num_slots=min(batch_size, max(8, pow2(len(jobs)))),
                        max_length=cache_length(info, need),
                        max_videos=max(4, pow2(max(len(j.clips) for j in jobs))), max_queue=len(jobs))


def _answer(job: "_Job", res: EngineResult) -> dict:
    answer = finish_answer(res.text, len(res.tokens))
    return {"id": job.id, "answer": answer.text,
            "video_requests": [{"prompt": r.prompt, "index": r.index, "start": r.start, "end": r.end}
                               for r in answer.requests],
            "num_tokens": answer.num_tokens}


def _prepare(pos: int, obj, info: ModelInfo, tokenizer, base: SamplingConfig, seed: int, system_prompt: str,
             clip_cache: dict) -> _Job:
    req = parse_request(obj, default_id=pos)
    cfg = dataclasses.replace(base, **{k: v for k, v in req.settings.items() if k != "seed"})
    if req.videos and not info.has_vision:
        raise ValueError("this model is a text-only LLM: it cannot take videos")
    clips = []
    for path in req.videos:
        if path not in clip_cache:
            try:
                clip_cache[path] = load_video(path, num_frames=info.num_frames, size=info.image_size,
                                              sampling=info.sampling, resize=info.resize)
            except VideoReadError as e:
                clip_cache[path] = e
        if isinstance(clip_cache[path], VideoReadError):
            raise clip_cache[path]
        clips.append(clip_cache[path])
    conv = tokenize_conversation(tokenizer, req.turns, num_video_tokens=info.num_video_tokens,
                                 system_prompt=system_prompt, add_generation_prompt=True)
    check_vocab(info, conv)
    prompt_length(info, len(conv), cfg.max_new_tokens)  # raises if it cannot fit
    return _Job(pos, req.id, conv, clips, cfg, int(req.settings.get("seed", seed)))


def answer_batch_file(model, tokenizer, requests: Sequence[Mapping], output: Path, **kwargs) -> list[dict]:
    """``answer_requests`` with each result appended (and flushed) to ``output`` as it is final, so a crash or
    Ctrl-C keeps every finished answer; once all are done the file is rewritten in input order."""
    done: list[dict] = []
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        out = open(output, "w", encoding="utf-8")
    except OSError as e:
        raise BatchOutputError(f"cannot write {output}: {e.strerror or e}") from None

    def write(result: dict) -> None:
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
        out.flush()
        done.append(result)

    try:
        with out:
            results = answer_requests(model, tokenizer, requests, on_result=write, **kwargs)
    except KeyboardInterrupt:
        raise BatchOutputError(f"interrupted: {len(done)} of {len(requests)} answers are in {output} (each line carries its "
                       "request's id)") from None
    except OSError as e:
        raise BatchOutputError(f"cannot write {output}: {e.strerror or e}") from None
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results), encoding="utf-8")
    os.replace(tmp, output)
    errors = sum("error" in r for r in results)
    print(f"wrote {len(results)} answers to {output}" + (f" ({errors} failed)" if errors else ""), file=sys.stderr)
    return results
