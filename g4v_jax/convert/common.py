"""Shared machinery for checkpoint conversion: read HF checkpoints lazily, and key maps as data.

A key map is a list of ``Rule``s. A rule names our parameter paths and the checkpoint's tensor names (both may contain
``{i}`` for a layer index) and the two pure functions between them, so the same table serves import and export and a
new checkpoint family is a new table. Conversion is driven by the model: every parameter the model expects is looked
up, so a mismatch reports the checkpoint's own names (missing, unexpected, wrong shape) all at once.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from g4v_jax.cli import USER_ERRORS, fail
from g4v_jax.config import Config
from g4v_jax.data.tokenizer import copy_tokenizer_files
from g4v_jax.weights import CheckpointMismatchError, mismatch_message, read_safetensors, save_pretrained

Arrays = Mapping[str, np.ndarray]


# ----------------------------------------------------------------------------------------------------------------------
# reading HF checkpoint directories
# ----------------------------------------------------------------------------------------------------------------------


class TorchBinTensors(Mapping[str, np.ndarray]):
    """Tensors of a ``pytorch_model*.bin`` file, loaded with ``torch.load(weights_only=True, mmap=True)``."""

    def __init__(self, path: Path):
        try:
            import torch
        except ImportError as e:  # torch is an optional extra
            raise ImportError(
                f"{path} is a PyTorch .bin checkpoint; reading it needs torch: pip install 'g4v-jax[torch]' "
                "(or convert it to safetensors first)"
            ) from e
        import pickle

        self._torch = torch
        try:
            self._sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            # torch's own text suggests weights_only=False, i.e. running the file's code: never
            found = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "global" in line),
                         "it references Python objects other than tensors")
            raise ValueError(f"{path} is not a plain weights file ({found}); g4v_jax will not unpickle it, since "
                             "that could run code from the file. Use a .safetensors checkpoint, or convert this one "
                             "with a tool you trust") from None
        except (RuntimeError, EOFError, OSError) as e:
            raise ValueError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0][:200]})") from None

    def __getitem__(self, key: str) -> np.ndarray:
        t = self._sd[key].detach()
        if t.dtype == self._torch.bfloat16:  # numpy has no bf16: reinterpret the bits
            return t.contiguous().view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def __iter__(self) -> Iterator[str]:
        return iter(self._sd)

    def __len__(self) -> int:
        return len(self._sd)


class MergedTensors(Mapping[str, np.ndarray]):
    def __init__(self, parts: Sequence[Mapping[str, np.ndarray]]):
        self._where = {k: p for p in parts for k in p}

    def __getitem__(self, key):
        return self._where[key][key]

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


def _open_file(path: Path) -> Mapping[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return TorchBinTensors(path)
    raise ValueError(f"{path}: unknown checkpoint file type (expected .safetensors or .bin)")


def open_checkpoint(src: str | Path) -> Mapping[str, np.ndarray]:
    """All tensors of an HF checkpoint (a file, or a directory with one file or a sharded index), read lazily."""
    src = Path(src)
    if src.is_file():
        return _open_file(src)
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint {src} does not exist")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return MergedTensors([_open_file(src / f) for f in files])
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).is_file():
            return _open_file(src / name)
    found = sorted(p.name for p in src.iterdir())
    raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or sharded index in {src} (found: {found})")


def read_hf_config(src: str | Path) -> dict:
    path = Path(src) / "config.json" if Path(src).is_dir() else Path(src).parent / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: conversion needs the checkpoint's config.json")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------------------------------
# key maps
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    to_ours: Callable[..., tuple[np.ndarray, ...]]
    to_theirs: Callable[..., tuple[np.ndarray, ...]]


def _identity(*xs):
    return xs


def rename(ours: str, theirs: str) -> Rule:
    return Rule((ours,), (theirs,), _identity, _identity)


def reshaped(ours: str, theirs: str, ours_shape: Callable, theirs_shape: Callable) -> Rule:
    """Same values, other shape (e.g. torch's (1, 64, D) query tokens -> (64, D))."""
    return Rule((ours,), (theirs,), lambda a: (a.reshape(ours_shape(a)),), lambda a: (a.reshape(theirs_shape(a)),))


def linear(ours: str, theirs: str, bias: bool = True) -> list[Rule]:
    """torch ``nn.Linear`` (weight (out, in)) -> our Dense (kernel (in, out))."""
    rules = [Rule((f"{ours}.kernel",), (f"{theirs}.weight",), lambda w: (w.T,), lambda k: (k.T,))]
    if bias:
        rules.append(rename(f"{ours}.bias", f"{theirs}.bias"))
    return rules


def pointwise_conv(ours: str, theirs: str) -> list[Rule]:
    """torch 1x1(x1) conv (out, in, 1, ...) -> Dense (in, out)."""
    return [
        Rule((f"{ours}.kernel",), (f"{theirs}.weight",),
             lambda w: (w.reshape(w.shape[0], w.shape[1]).T,), lambda k: (k.T.reshape(*k.T.shape, 1, 1, 1),)),
        rename(f"{ours}.bias", f"{theirs}.bias"),
    ]


def layernorm(ours: str, theirs: str) -> list[Rule]:
    return [rename(f"{ours}.scale", f"{theirs}.weight"), rename(f"{ours}.bias", f"{theirs}.bias")]


def _pattern_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(\d+)") + "$")


def _instances(rule: Rule, model_names: Sequence[str]) -> list[dict]:
    """Layer indices for which the model has ``rule.ours[0]``; [{}] for a rule without ``{i}``."""
    if "{i}" not in rule.ours[0]:
        return [{}] if rule.ours[0] in model_names else []
    rx = _pattern_regex(rule.ours[0])
    return sorted(({"i": int(m.group(1))} for n in model_names if (m := rx.match(n))), key=lambda d: d["i"])


def expected_checkpoint_shapes(rule: Rule, ours_shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The checkpoint shapes a rule needs for our shapes, found by running the export direction on placeholders
    (``np.empty`` int8: views and transposes touch no memory, even for a 7B embedding)."""
    return [tuple(a.shape) for a in rule.to_theirs(*(np.empty(s, np.int8) for s in ours_shapes))]


def convert_checkpoint(
    tensors: Mapping[str, np.ndarray],
    rules: Sequence[Rule],
    model_shapes: Mapping[str, tuple[int, ...]],
    *,
    source: str,
    ignore: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Map checkpoint tensors to our parameter names for a model with ``model_shapes`` (name -> shape).

    ``ignore`` holds regexes of checkpoint keys that are expected and deliberately skipped (buffers, other towers).
    Raises ``CheckpointMismatchError`` listing missing keys, unexpected keys and shape mismatches together.
    """
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    missing, bad_shapes = [], []
    jobs = [(rule, inst) for rule in rules for inst in _instances(rule, list(model_shapes))]
    for rule, inst in tqdm(jobs, desc=f"converting {Path(source).name}", unit="tensor", disable=not progress,
                           file=sys.stderr):
        theirs = [t.format(**inst) for t in rule.theirs]
        ours = [o.format(**inst) for o in rule.ours]
        absent = [t for t in theirs if t not in tensors]
        if absent:
            missing.extend(absent)
            continue
        used.update(theirs)
        # check the checkpoint's own shapes before any reshape, so a wrong layout is reported, never reshaped
        # into place and never a bare reshape error
        want = expected_checkpoint_shapes(rule, [model_shapes[o] for o in ours])
        arrays = [np.asarray(tensors[t]) for t in theirs]
        wrong = [f"{t}: checkpoint {a.shape}, model needs {w}" for t, a, w in zip(theirs, arrays, want)
                 if tuple(a.shape) != w]
        if wrong:
            bad_shapes.extend(wrong)
            continue
        out.update(zip(ours, rule.to_ours(*arrays)))
    uncovered = sorted(set(model_shapes) - set(out) - {o.format(**i) for r, i in jobs for o in r.ours})
    ignored = [re.compile(p) for p in ignore]
    unexpected = sorted(k for k in tensors if k not in used and not any(p.search(k) for p in ignored))
    message = mismatch_message(str(source), missing=missing, unexpected=unexpected, bad_shapes=bad_shapes,
                               uncovered=uncovered)
    if message:
        raise CheckpointMismatchError(message)
    return out


def export_params(params: Mapping[str, np.ndarray], rules: Sequence[Rule]) -> dict[str, np.ndarray]:
    """Inverse of ``convert_checkpoint``: our named parameters -> checkpoint tensor names."""
    out: dict[str, np.ndarray] = {}
    names = list(params)
    for rule in rules:
        for inst in _instances(rule, names):
            arrays = rule.to_theirs(*(np.asarray(params[o.format(**inst)]) for o in rule.ours))
            out.update({t.format(**inst): a for t, a in zip(rule.theirs, arrays)})
    return out


def save_converted(model, cfg, src: str | Path, dst: str | Path) -> Path:
    """Write a converted model directory (config + weights) and the tokenizer that came with ``src``."""
    out = save_pretrained(model, Config(model=cfg), dst)
    copied = copy_tokenizer_files(src, out)
    print(f"tokenizer: {', '.join(copied)} copied" if copied else "no tokenizer files beside the checkpoint")
    return out


def converter_main(doc: str, convert: Callable[..., Path], overrides_help: str, argv=None) -> None:
    """The CLI of a ``SRC DST [key=value ...]`` converter."""
    import argparse

    ap = argparse.ArgumentParser(prog=f"python -m {module_name(convert)}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("overrides", nargs="*", help=overrides_help)
    args = ap.parse_intermixed_args(argv)
    print_load_hint(run_converter(module_name(convert), convert, args.src, args.dst, args.overrides))


def module_name(fn: Callable) -> str:
    """``convert.hf_llama`` (the documented command's name) for a function of ``g4v_jax.convert.hf_llama``, also when
    it runs as ``python -m convert.hf_llama``."""
    name = fn.__module__
    if name == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        name = spec.name if spec is not None else Path(sys.argv[0]).stem
    return name.removeprefix("g4v_jax.")


def run_converter(prog: str, convert: Callable[..., Path], *args, **kwargs) -> Path:
    """``convert(*args)``; bad input (a missing or mismatched checkpoint, a corrupt file) ends the program with one
    ``prog: error: ...`` line and exit status 2."""
    try:
        return convert(*args, **kwargs)
    except USER_ERRORS + (ImportError,) as e:
        fail(prog, str(e))


def print_load_hint(dst: Path) -> None:
    print(f"wrote {dst}. Load it with:\n\n    import g4v_jax\n    model = g4v_jax.load({str(dst)!r})\n")
