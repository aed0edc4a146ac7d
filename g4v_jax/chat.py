"""Chat with GPT4Video: an interactive REPL with streamed answers, and a batch mode over a JSONL file of requests.

    python -m g4v_jax.chat --ckpt ckpt/g4v                                        # interactive
    python -m g4v_jax.chat --ckpt ckpt/g4v --input requests.jsonl --output answers.jsonl [--batch-size 8]

Both run on ``g4v_jax.inference.Engine``: a turn of the interactive chat on a one-slot engine, a batch file on an
engine with ``--batch-size`` slots that refills a slot as soon as its answer is done.

Options: ``--tokenizer DIR`` (default: the checkpoint directory), ``--max-new-tokens 256 --temperature 0 --top-p 1
--top-k 0 --seed 0``, ``--system-prompt TEXT``, and ``key=value`` overrides of the saved model config
(``model.compute_dtype=bfloat16``). Interactive answers' ``<video>`` requests are rendered with ``--t2v NAME``
(``--t2v diffusers --t2v-path DIR`` for any local diffusers text-to-video pipeline, ``--t2v-option KEY=VALUE`` and
``--t2v-setting KEY=VALUE`` repeatable) into ``--t2v-out DIR``.

Interactive
    Each stdin line is a question, except ``/video PATH`` (attach a video to the next question; several may be
    attached), ``/reset`` (forget the conversation) and ``/quit``. The answer streams to stdout after ``GPT4Video:``;
    then each ``<video>prompt</video>`` the model wrote is listed as ``video N request: prompt`` (the text-to-video
    backend will render them). The whole conversation is the prompt of each turn, as in training.

Batch
    One request per line::

        {"id": "q1", "videos": ["clip.mp4"],
         "turns": [{"from": "human", "video": 0}, {"from": "human", "value": "What happens?"}],
         "max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "seed": 1}

    ``videos`` paths are relative to the requests file (as in training manifests); the sampling keys are optional and
    default to the command-line flags (``seed`` matters only when sampling); ``id`` defaults to the line number
    (``answer_requests``: the 0-based position). Each output line is
    ``{"id", "answer", "video_requests": [{"prompt", "index", "start", "end"}], "num_tokens"}`` in input order, or
    ``{"id", "error"}`` for a request that could not be answered (unreadable video, too long, bad turns). A line that
    is not JSON or not a valid request stops the run before the model is loaded, naming ``file:line``.

Library
    The CLI only parses arguments: ``g4v_jax.inference`` (``ChatSession``, ``answer_requests``,
    ``answer_batch_file``) is what it runs, as the evals and the world demo do.

Decisions
    - Prompts are padded to power-of-two buckets by the engine, so a conversation or a batch reuses a few compiled
      programs (one per bucket, one decode step).
    - The answer is the decoded text up to the first ``###`` (the next turn's prefix; the engine stops on its tokens,
      and the text check also catches other tokenizations of it), whitespace-stripped. While streaming, a trailing
      run of whitespace / ``#`` and an incomplete UTF-8 character are held back until they are resolved, so the
      streamed pieces concatenate to exactly the answer text.
    - The AI turn stored in the history is the answer text as generated, ``<video>`` tags included (they are part of
      the model's answer in training). An empty answer stores no AI turn (the template has no empty turns).
    - Sampling seeds: a chat turn uses ``seed + turn number``; a batch request its own ``seed`` (else ``--seed``).
      Each request draws with ``fold_in(key(seed), token number)``, so a sampled answer is the same whatever the
      other requests in the file and whatever ``--batch-size``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import g4v_jax
from g4v_jax.cli import add_t2v_arguments, t2v_arguments
from g4v_jax.data.io import iter_jsonl, resolve_video_path
from g4v_jax.data.template import SYSTEM_PROMPT
from g4v_jax.data.tokenizer import load_tokenizer
from g4v_jax.inference.batch import BatchOutputError, answer_batch_file
from g4v_jax.inference.generate import SamplingConfig
from g4v_jax.inference.session import ChatSession, make_renderer
from g4v_jax.models.gpt4video import model_kind
from g4v_jax.safety.checker import load_safety_checker
from g4v_jax.safety.gates import keyword_prompt_check, make_output_video_check, make_video_gate
from g4v_jax.weights import CONFIG_FILE

ANSWER_MARKER = "GPT4Video:"  # what the REPL prints before a streamed answer
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k")


ANSWER_MARKER = "GPT4Video:"  # what the REPL prints before a streamed answer


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


class CLIError(Exception):
    """A problem the user can fix (bad path, bad input line): printed as one line, exit status 2."""


def read_requests(path: str | os.PathLike) -> list[dict]:
    """Requests of a JSONL file; a line that is not a JSON object is a ``CLIError`` naming ``file:line``. A request
    that is an object but wrong (bad turns, ``max_new_tokens: 0``) is kept: answering gives it its own error and the
    rest of the batch is answered. Relative video paths are resolved against the file's directory; a missing ``id``
    becomes the line number."""
    path = Path(path)
    out = []
    try:
        for lineno, obj in iter_jsonl(path, CLIError):
            if not isinstance(obj, Mapping):
                raise CLIError(f"{path}:{lineno}: a request must be a JSON object, got {type(obj).__name__}")
            obj = dict(obj)
            obj.setdefault("id", lineno)
            videos = obj.get("videos", [])
            if isinstance(videos, list) and all(isinstance(v, str) and v for v in videos):
                obj["videos"] = [resolve_video_path(v, path.parent) for v in videos]
            out.append(obj)
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read {path}: {e}") from None
    if not out:
        raise CLIError(f"{path}: no requests in the file")
    return out


def _load(args):
    try:
        tokenizer = load_tokenizer(args.tokenizer or args.ckpt)
    except (OSError, ValueError) as e:
        raise CLIError(f"tokenizer: {e}" + ("" if args.tokenizer else " (pass --tokenizer DIR)")) from None
    try:
        model = g4v_jax.load(args.ckpt, args.overrides)
    except (OSError, ValueError) as e:
        raise CLIError(f"checkpoint {args.ckpt}: {e}") from None
    kind = model_kind(model)
    if kind not in ("gpt4video", "llm"):
        raise CLIError(f"checkpoint {args.ckpt} holds a {kind} model, not a language model: chat needs a gpt4video or "
                       "llm checkpoint")
    return model, tokenizer


def repl(session: ChatSession, stdin=None, stdout=None) -> None:
    """The interactive loop (module docstring) over ``stdin`` / ``stdout``."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    tty = stdin.isatty()

    def say(text: str = "", end: str = "\n") -> None:
        stdout.write(text + end)
        stdout.flush()

    say("GPT4Video chat: type a question; /video PATH attaches a video to the next one; /reset; /quit")
    while True:
        if tty:
            say("You: ", end="")
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            say()
            break
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            arg = arg.strip().strip("'\"")
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                session.reset()
                say("(new conversation)")
            elif command == "/video" and arg:
                try:
                    index = session.attach_video(os.path.expanduser(arg))
                    say(f"(video {index + 1} attached: {arg})" if index >= 0 else
                        "(the safety checker flagged this video: it was not attached)")
                except ValueError as e:  # VideoReadError, text-only model
                    say(f"error: {e}")
            elif command == "/video":
                say("usage: /video PATH")
            else:
                say(f"unknown command {command}; commands: /video PATH, /reset, /quit")
            continue
        say(ANSWER_MARKER + " ", end="")
        t0 = time.perf_counter()
        try:
            answer = session.ask(line, on_token=lambda piece: say(piece, end=""))
        except ValueError as e:  # too long for the context
            say(f"\nerror: {e}")
            continue
        except KeyboardInterrupt:
            say("\n(interrupted; the question was dropped)")
            continue
        say()
        for i, request in enumerate(answer.requests, 1):
            say(f"video {i} request: {request.prompt}")
            if i <= len(answer.videos):
                rendered = answer.videos[i - 1]
                say(f"video {i}: {rendered.path}" if rendered.path else f"video {i}: {rendered.error}")
                for note in rendered.notes:  # what the text-to-video model changed: a rounded size, a cut prompt
                    say(f"  note: {note}")
        dt = time.perf_counter() - t0
        print(f"[{answer.num_tokens} tokens in {dt:.1f}s]", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m g4v_jax.chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="model directory (g4v_jax.load)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --ckpt)")
    ap.add_argument("--input", default=None, help="batch mode: requests JSONL")
    ap.add_argument("--output", default=None, help="batch mode: answers JSONL")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--system-prompt", default=SYSTEM_PROMPT)
    ap.add_argument("--safety-checker", default=None,
                    help="converted SD safety checker dir (python -m convert.sd_safety_checker): input and output "
                         "video gate")
    add_t2v_arguments(ap, default=None)
    ap.add_argument("--t2v-out", default="outputs/videos")
    ap.add_argument("--blocklist", default="", help="comma-separated words no video prompt may contain")
    ap.add_argument("overrides", nargs="*", help="model config overrides, e.g. model.compute_dtype=bfloat16")
    return ap.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        _main(args)
    except CLIError as e:
        print(f"g4v_jax.chat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("g4v_jax.chat: interrupted", file=sys.stderr)
        return 130
    return 0


def _safety_and_t2v(args):
    """The input gate and the renderer (prompt check -> backend -> output check -> files) the flags ask for."""
    gate = check_video = None
    if args.safety_checker:
        try:
            checker = load_safety_checker(args.safety_checker)
        except (OSError, ValueError) as e:
            raise CLIError(f"--safety-checker {args.safety_checker}: {e}") from None
        gate, check_video = make_video_gate(checker), make_output_video_check(checker)
    renderer = None
    if args.t2v:
        blocklist = [w.strip() for w in args.blocklist.split(",") if w.strip()]
        try:
            options, settings = t2v_arguments(args)
            renderer = make_renderer(args.t2v, args.t2v_out, settings=settings,
                                     check_prompt=keyword_prompt_check(blocklist), check_video=check_video, **options)
        except (ImportError, ValueError, TypeError, RuntimeError) as e:  # unknown backend/option, no weights, no torch
            raise CLIError(f"--t2v {args.t2v}: {e}") from None
    return gate, renderer


def _main(args) -> None:
    if not Path(args.ckpt).is_dir():
        raise CLIError(f"--ckpt {args.ckpt}: no such directory")
    if not (Path(args.ckpt) / CONFIG_FILE).is_file():
        raise CLIError(f"--ckpt {args.ckpt}: not a g4v_jax model directory ({CONFIG_FILE} is missing)")
    if (args.input is None) != (args.output is None):
        raise CLIError("batch mode needs both --input and --output")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p)
    except ValueError as e:
        raise CLIError(str(e)) from None
    requests = read_requests(args.input) if args.input else None  # fail on a bad line before loading the model
    model, tokenizer = _load(args)
    if requests is None:
        gate, renderer = _safety_and_t2v(args)
        repl(ChatSession(model, tokenizer, sampling, system_prompt=args.system_prompt, seed=args.seed,
                         video_gate=gate, renderer=renderer))
        return
    try:
        answer_batch_file(model, tokenizer, requests, Path(args.output), sampling=sampling,
                          batch_size=args.batch_size, system_prompt=args.system_prompt, seed=args.seed)
    except BatchOutputError as e:
        raise CLIError(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
