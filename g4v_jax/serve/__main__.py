"""python -m g4v_jax.serve --ckpt DIR: the OpenAI-compatible video chat API and the web page, on 127.0.0.1:8000.

    python -m g4v_jax.serve --ckpt runs/world/stage2/final --t2v world --detector runs/world/detector \\
        --media-dir runs/world/data/videos
    python3 dev.py serve          # the same, for the model `python3 dev.py demo` trained

Options: ``--host``/``--port``; ``--t2v NAME`` (a ``g4v_jax.t2v`` backend: world, diffusers, solid; none: the
``<video>`` requests stay text) with ``--t2v-path DIR`` for diffusers, ``--t2v-option KEY=VALUE`` (backend options,
e.g. ``cpu_offload=true``) and ``--t2v-setting KEY=VALUE`` (over the model family's defaults);
``--detector DIR`` (the world's learned input
detector) or ``--safety-checker DIR`` (the SD safety checker) for the input gate and the output check;
``--media-dir DIR`` (file:// video URLs inside it), ``--output-dir DIR``; ``--slots``, ``--max-length``,
``--max-queue``, ``--prefix-cache``/``--no-prefix-cache``, ``--prefill-chunk``, ``--video-cache-mb`` (the engine),
``--clip-cache-mb`` (decoded videos), ``--max-body-mb``, ``--max-videos``, ``--max-video-mb``, ``--max-video-frames``,
``--decode-timeout``, ``--max-video-pixels``, ``--max-decodes``, ``--body-timeout`` (untrusted input); ``--api-key KEY`` (or
``$G4V_API_KEY``: every ``/v1/*`` route then needs ``Authorization: Bearer KEY``), ``--allowed-origins`` (CORS; none by
default); ``--keep-videos N`` / ``--video-max-age-h H`` (generated videos kept on disk); ``--grace S`` (on SIGTERM or
Ctrl-C: stop accepting, let running requests finish for up to S seconds, then cancel them and exit 0);
``--tokenizer DIR`` (default: the checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn

import g4v_jax
from g4v_jax.cli import add_t2v_arguments, fail, guard, setup_logging, t2v_arguments
from g4v_jax.config import EngineConfig
from g4v_jax.endpoint import is_loopback
from g4v_jax.data.template import SYSTEM_PROMPT
from g4v_jax.data.tokenizer import load_tokenizer
from g4v_jax.inference.session import make_renderer
from g4v_jax.safety.checker import load_safety_checker
from g4v_jax.safety.frame_classifier import load_frame_classifier
from g4v_jax.safety.gates import keyword_prompt_check, make_output_video_check, make_video_gate
from g4v_jax.serve.app import create_app
from g4v_jax.serve.server import ServeConfig, Server
from g4v_jax.serve.media import MediaLimits
from g4v_jax.weights import load_model_config


def parse_args(argv: Sequence[str] | None):
    ap = argparse.ArgumentParser(prog="python -m g4v_jax.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model-name", default=None, help="the model id of /v1/models (default: the checkpoint's name)")
    add_t2v_arguments(ap, default="none")
    ap.add_argument("--detector", default=None, help="a learned input detector directory (the world demo's)")
    ap.add_argument("--safety-checker", default=None, help="an SD safety checker directory (convert.sd_safety_checker)")
    ap.add_argument("--blocklist", default="", help="comma-separated words no video prompt may contain")
    ap.add_argument("--media-dir", default="")
    ap.add_argument("--output-dir", default="serve_out")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=0, help="cache positions per slot (default: the context)")
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                    help="keep finished requests' KV in their slots for the next turn of the conversation")
    ap.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled between decode steps")
    ap.add_argument("--video-cache-mb", type=float, default=64, help="encoded video tokens kept by content")
    ap.add_argument("--clip-cache-mb", type=float, default=256, help="decoded videos kept by content")
    ap.add_argument("--max-body-mb", type=float, default=96)
    ap.add_argument("--max-videos", type=int, default=4, help="videos per request")
    ap.add_argument("--max-video-mb", type=float, default=64, help="size of one video")
    ap.add_argument("--max-video-frames", type=int, default=3000, help="frames one video may declare")
    ap.add_argument("--decode-timeout", type=float, default=30, help="seconds to decode one video")
    ap.add_argument("--max-video-pixels", type=float, default=MediaLimits.max_frame_pixels,
                    help="width x height one video's frames may declare")
    ap.add_argument("--body-timeout", type=float, default=60, help="seconds for a whole request body to arrive")
    ap.add_argument("--max-decodes", type=int, default=2, help="videos decoded at once")
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* "
                                                    "(default: $G4V_API_KEY, else open)")
    ap.add_argument("--allowed-origins", default="", help="comma-separated origins allowed by CORS ('*': any); "
                                                          "default: none")
    ap.add_argument("--keep-videos", type=int, default=200, help="generated videos kept on disk (oldest deleted)")
    ap.add_argument("--video-max-age-h", type=float, default=24, help="hours a generated video is kept (0: no limit)")
    ap.add_argument("--grace", type=float, default=30, help="seconds running requests get to finish on SIGTERM")
    ap.add_argument("--max-tokens", type=int, default=256, help="default max_tokens")
    ap.add_argument("--system-prompt", default=None,
                    help="the system prompt of every chat (default: the one the checkpoint was trained with, its "
                    "config's data.system_prompt; the release's when that is null)")
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="compile every program before the first request")
    ap.add_argument("--verbose", action="store_true")
    return ap.parse_args(argv)


def build_server(args):
    """The ``Server`` the arguments describe (also what ``dev.py serve`` and the tests start)."""
    ckpt = Path(args.ckpt)
    if not (ckpt / "config.yaml").is_file():
        fail("python -m g4v_jax.serve", f"--ckpt {ckpt}: not a g4v_jax model directory (no config.yaml)")
    model = g4v_jax.load(ckpt)
    tokenizer = load_tokenizer(args.tokenizer or ckpt)
    context = getattr(getattr(model, "cfg", None), "llm", getattr(model, "cfg", None)).max_position_embeddings
    engine = EngineConfig(num_slots=args.slots, max_length=args.max_length or context, max_queue=args.max_queue,
                          max_videos=args.max_videos, prefix_cache=args.prefix_cache,
                          prefill_chunk=args.prefill_chunk, video_cache_mb=args.video_cache_mb)
    api_key = args.api_key if args.api_key is not None else os.environ.get("G4V_API_KEY", "")
    # a model answers best in the prompt it was trained with (the world's models: none)
    trained = load_model_config(ckpt).data.system_prompt
    system_prompt = args.system_prompt if args.system_prompt is not None else (
        SYSTEM_PROMPT if trained is None else trained)
    cfg = ServeConfig(model_name=args.model_name or ckpt.resolve().name, media_dir=args.media_dir, output_dir=args.output_dir,
                      max_body_bytes=int(args.max_body_mb * 2**20), max_videos=args.max_videos,
                      max_tokens=args.max_tokens, engine=engine, api_key=api_key, system_prompt=system_prompt,
                      allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
                      body_timeout_s=args.body_timeout, keep_videos=args.keep_videos,
                      max_concurrent_decodes=args.max_decodes, clip_cache_mb=args.clip_cache_mb,
                      video_max_age_s=args.video_max_age_h * 3600,
                      limits=MediaLimits(max_video_bytes=int(args.max_video_mb * 2**20),
                                         max_video_frames=args.max_video_frames,
                                         max_frame_pixels=int(args.max_video_pixels),
                                         decode_timeout_s=args.decode_timeout))
    gate, renderer = _safety_and_t2v(args)
    return Server(model, tokenizer, cfg, renderer=renderer, video_gate=gate)


def _safety_and_t2v(args):
    """The input gate (path -> flagged) and the renderer (prompt check -> backend -> output check -> files)."""
    gate = check_video = None
    if args.detector or args.safety_checker:
        if args.detector:
            checker = load_frame_classifier(args.detector)
        else:
            checker = load_safety_checker(args.safety_checker)
        gate, check_video = make_video_gate(checker), make_output_video_check(checker)
    renderer = None
    if args.t2v != "none":
        options, settings = t2v_arguments(args)
        blocklist = [w.strip() for w in args.blocklist.split(",") if w.strip()]
        try:
            renderer = make_renderer(args.t2v, Path(args.output_dir) / "videos", settings=settings,
                                     check_prompt=keyword_prompt_check(blocklist), check_video=check_video, **options)
        except (ImportError, TypeError, RuntimeError) as e:  # no torch, an unknown option, weights that fail to load
            raise ValueError(f"--t2v {args.t2v}: {e}") from None
    return gate, renderer


@guard("python -m g4v_jax.serve", (OSError, ValueError))
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    server = build_server(args)
    if args.warmup:
        print("compiling the engine's programs ...", file=sys.stderr, flush=True)
        server.engine.warmup()
    warning = exposure_warning(args.host, server.cfg.api_key)
    if warning:
        logging.getLogger("g4v_jax.serve").warning(warning)
    print(f"serving {server.cfg.model_name} on http://{args.host}:{args.port}/ (API: /v1/chat/completions)",
          file=sys.stderr, flush=True)
    # uvicorn's own SIGTERM/SIGINT handling is the drain: it stops accepting, waits up to --grace for running
    # requests, cancels the rest (their slots are freed), then the app's shutdown stops the engine and the job worker
    config = uvicorn.Config(create_app(server), host=args.host, port=args.port, timeout_graceful_shutdown=args.grace,
                            log_level="warning" if not args.verbose else "info")
    _DrainingServer(config).run()
    print("stopped", file=sys.stderr, flush=True)
    return 0


def exposure_warning(host: str, api_key: str) -> str | None:
    """What to warn of when ``host`` lets other machines in and no key is asked (None: nothing)."""
    if api_key or is_loopback(host):
        return None
    return (f"serving on {host} without an API key: anyone who reaches the port can use the model (set --api-key or "
            "G4V_API_KEY)")


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, but a SIGTERM or Ctrl-C that drained it ends the process with status 0 (uvicorn re-raises
    the signal after its shutdown, which a supervisor reads as a crash)."""

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
