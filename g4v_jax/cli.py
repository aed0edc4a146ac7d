"""What every ``python -m`` entry point does with bad input: one line on stderr naming what is wrong, exit status 2.

A user who passes a wrong path, a bad config value or a broken checkpoint should read one sentence that names the
field, file or tensor, never a traceback. Library code raises ordinary exceptions (``ConfigError``,
``CheckpointMismatchError``, ``VideoReadError``, ``OSError`` ... all ``ValueError`` or ``OSError``) with such a
message; ``guard`` turns them into that line at the edge of the program.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Sequence

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
EXIT_USAGE = 2  # argparse's status for a usage error; the same for every other input error


def fail(prog: str, message: str) -> None:
    """Print ``prog: error: message`` and exit with status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


def guard(prog: str, errors: Sequence[type[BaseException]] = ()) -> Callable:
    """Decorate a ``main(argv)``: user-facing exceptions (``ValueError``, ``OSError`` and ``errors``) become one
    ``prog: error: ...`` line on stderr and exit status 2."""
    caught = tuple(USER_ERRORS) + tuple(errors)

    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except caught as e:
                fail(prog, str(e) or type(e).__name__)

        return run

    return wrap


def setup_logging(verbose: bool = False) -> None:
    """Our own INFO lines and everyone's warnings; the libraries' INFO chatter (orbax, absl, jax) only when
    ``verbose``, so a progress bar is not buried under it. Orbax also logs every failed save with its traceback
    through absl: those errors reach the user as our own one-line message instead, so absl is kept quiet."""
    import logging

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("g4v_jax").setLevel(logging.INFO)
    if not verbose:
        logging.getLogger("absl").setLevel(logging.CRITICAL)


def parse_key_values(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """``["steps=4", "cpu_offload=true", "prompt_suffix=, cinematic"]`` -> ``{"steps": 4, "cpu_offload": True,
    "prompt_suffix": ", cinematic"}``: ints, floats, true/false and none are read as such, anything else stays a str.
    A malformed item is a ``ValueError`` naming ``flag``."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE with KEY a name")
        lowered = text.strip().lower()
        value: Any = text
        if lowered in ("true", "false"):
            value = lowered == "true"
        elif lowered == "none":
            value = None
        else:
            for cast in (int, float):
                try:
                    value = cast(text)
                    break
                except ValueError:
                    pass
        out[key] = value
    return out


def add_t2v_arguments(ap: Any, default: str | None) -> None:
    """The text-to-video flags ``python -m g4v_jax.chat`` and ``python -m g4v_jax.serve`` share."""
    ap.add_argument("--t2v", default=default,
                    help="render the <video> prompts with this backend: diffusers (any local diffusers text-to-video "
                         "pipeline: ZeroScope, AnimateDiff, Wan, LTX-Video, CogVideoX), world, solid"
                         + (" or none" if default == "none" else ""))
    ap.add_argument("--t2v-path", default=None,
                    help="the diffusers pipeline directory (e.g. Wan2.1-T2V-1.3B-Diffusers)")
    ap.add_argument("--t2v-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a backend option, repeatable: family, dtype, device, cpu_offload (true|sequential), "
                         "vae_tiling, vae_slicing, scheduler, prompt_prefix, prompt_suffix, max_prompt_tokens, strict")
    ap.add_argument("--t2v-setting", action="append", default=[], metavar="KEY=VALUE",
                    help="a generation setting over the model family's defaults, repeatable: num_frames, height, "
                         "width, steps, guidance_scale, seed, negative_prompt")


def t2v_arguments(args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The backend options and the settings overrides the ``add_t2v_arguments`` flags ask for."""
    options = parse_key_values(args.t2v_option, "--t2v-option")
    if args.t2v_path:
        options["path"] = args.t2v_path
    elif args.t2v == "diffusers" and "path" not in options:
        raise ValueError("--t2v diffusers needs --t2v-path DIR (a diffusers pipeline directory)")
    return options, parse_key_values(args.t2v_setting, "--t2v-setting")

