"""The converters' command-line names: ``python -m convert.<name>`` runs ``g4v_jax.convert.<name>``, and
``import convert.<name>`` is that module (one object, not a copy)."""

from __future__ import annotations

import importlib
import runpy
import sys


def forward(name: str) -> None:
    """Make the module ``name`` (``convert.<x>``, or ``__main__`` under ``python -m convert.<x>``) be
    ``g4v_jax.convert.<x>``: run it as the program, or stand in for it in ``sys.modules``."""
    if name == "__main__":
        target = "g4v_jax." + sys.modules["__main__"].__spec__.name
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.modules[name] = importlib.import_module("g4v_jax." + name)
