"""One module per row group of ``bench/run.py``: each has ``ORDER`` (its place in the table), ``rows(ctx)`` (its rows,
given a ``common.Context``) and optionally ``CHILDREN`` (what it runs in fresh processes, by name). A new row is a new
module here."""

from __future__ import annotations

import importlib
import pkgutil


def groups() -> dict:
    """{name: module} of every row group, in table order."""
    mods = [importlib.import_module(f"rows.{m.name}") for m in pkgutil.iter_modules(__path__)]
    return {m.__name__.split(".")[-1]: m for m in sorted(mods, key=lambda m: m.ORDER)}
