"""What every ``python -m`` entry point does with bad input: one line on stderr naming what is wrong, exit status 2.

A user who passes a wrong path, a bad config value or a broken checkpoint should read one sentence that names the
field, file or tensor, never a traceback. Library code raises ordinary exceptions (``ConfigError``,
``CheckpointMismatchError``, ``VideoReadError``, ``OSError`` ... all ``ValueError`` or ``OSError``) with such a
message; ``guard`` turns them into that line at the edge of the program.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, Sequence

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
