"""Our checkpoint format and the one place that puts named arrays into a model.

A model directory holds ``config.yaml`` (the full ``Config``) and ``model.safetensors`` whose keys are the model's
parameter paths joined by dots (``vision_model.layers.3.self_attn.q_proj.kernel``). ``g4v_jax.load(dir)`` builds the
model from the config without allocating random weights (``nnx.eval_shape``) and fills it, checking every name and
shape. Training checkpoints (optimizer state, data iterator) are orbax's business, in ``train``.

Safetensors files are read with a small memory-mapped reader (``read_safetensors``) because the ``safetensors``
package cannot hand bfloat16 tensors to NumPy; it needs no torch and copies nothing until a tensor is used.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from g4v_jax.config import Config, ModelConfig, dump_config, from_dict, load_config
from g4v_jax.models.gpt4video import abstract_model
from g4v_jax.models.layers import is_stacked, named_variables, variable_names
from g4v_jax.models.lora import unmerged_kernels

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class CheckpointMismatchError(ValueError):
    """Checkpoint names/shapes do not match the model; the message lists every difference."""


# ----------------------------------------------------------------------------------------------------------------------
# safetensors without torch
# ----------------------------------------------------------------------------------------------------------------------


class SafetensorsError(ValueError):
    """A ``.safetensors`` file that is not what its header says (truncated, corrupt, hostile); names file and tensor."""


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Memory-mapped arrays of a ``.safetensors`` file (bf16 included), keyed by tensor name.

    The header is untrusted: its length, every tensor's dtype, shape and byte range are checked against the file
    before anything is allocated or mapped, so a corrupt or hostile file is a ``SafetensorsError`` naming the tensor.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: {size} bytes is too short for a safetensors file (no header length)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise SafetensorsError(f"{path}: the header claims {header_len} bytes but the file has only {size - 8} "
                                   "after the length field (truncated or not a safetensors file)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is not a JSON object")
    header.pop("__metadata__", None)
    if not header:
        return {}
    data_size = size - 8 - header_len
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len) if data_size else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        try:
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            shape = [int(d) for d in info["shape"]]
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{where}: bad header entry {info!r} (needs dtype among {sorted(_ST_DTYPES)}, "
                                   "shape and data_offsets)") from None
        if any(d < 0 for d in shape):
            raise SafetensorsError(f"{where}: negative dimension in shape {shape}")
        if not 0 <= start <= end <= data_size:
            raise SafetensorsError(f"{where}: data_offsets [{start}, {end}] lie outside the file's {data_size} "
                                   "data bytes (truncated or corrupt)")
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - start != need:
            raise SafetensorsError(f"{where}: {end - start} bytes for shape {shape} of {info['dtype']}, which "
                                   f"needs {need}")
        out[name] = data[start:end].view(dtype).reshape(shape)
    return out


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Write named arrays as one ``.safetensors`` file, streaming tensor by tensor."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = {}
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays[name] = arr
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format asks for 8-byte alignment of the data section
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in sorted(arrays):
            f.write(np.ascontiguousarray(arrays[name]).tobytes())


# ----------------------------------------------------------------------------------------------------------------------
# named parameters <-> model
# ----------------------------------------------------------------------------------------------------------------------


def param_shapes(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{name: (shape, dtype)}`` of every parameter (a layer-stacked one per layer, see ``named_variables``)."""
    _, state, _ = nnx.split(model, nnx.Param, ...)
    out = {}
    for name, var, layer in named_variables(state):
        shape = tuple(var.get_value().shape)
        out[name] = (shape if layer is None else shape[1:], np.dtype(var.get_value().dtype))
    return out


def named_params(model: nnx.Module) -> dict[str, jax.Array]:
    """Every parameter (``nnx.Param``, LoRA adapters included; not RNG state) by dotted name."""
    _, state, _ = nnx.split(model, nnx.Param, ...)
    return {name: var.get_value() if layer is None else var.get_value()[layer]
            for name, var, layer in named_variables(state)}


def mismatch_message(source: str, *, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                     bad_shapes: Sequence[str] = (), uncovered: Sequence[str] = ()) -> str | None:
    """The one message for a checkpoint that does not fit a model (loading and every converter): each kind of
    difference on a line, every name listed; None when there is none."""
    parts = [("missing keys", missing, ", "), ("unexpected keys", unexpected, ", "),
             ("shape mismatches", bad_shapes, "; "), ("model parameters no rule maps", uncovered, ", ")]
    lines = [f"  {what} ({len(names)}): " + sep.join(names) for what, names, sep in parts if names]
    return "\n".join([f"checkpoint {source} does not match the model:", *lines]) if lines else None


def mismatch_report(expected: Mapping[str, tuple], got: Mapping[str, tuple], source: str) -> str | None:
    """A readable list of missing keys, unexpected keys and shape mismatches, or None when all match."""
    return mismatch_message(
        source, missing=sorted(set(expected) - set(got)), unexpected=sorted(set(got) - set(expected)),
        bad_shapes=[f"{k} model {tuple(expected[k])} vs checkpoint {tuple(got[k])}"
                    for k in sorted(set(expected) & set(got)) if tuple(expected[k]) != tuple(got[k])])


def assign_params(model: nnx.Module, arrays: Mapping[str, np.ndarray], source: str = "<arrays>") -> nnx.Module:
    """Return ``model`` (abstract or concrete) with every parameter replaced by ``arrays[name]``, cast to the
    parameter's dtype. Raises ``CheckpointMismatchError`` naming all missing/unexpected keys and wrong shapes."""
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    expected = {k: shape for k, (shape, _) in param_shapes(model).items()}
    report = mismatch_report(expected, {k: tuple(np.shape(a)) for k, a in arrays.items()}, source)
    if report:
        raise CheckpointMismatchError(report)
    leaves = []
    for path, var in nnx.to_flat_state(state):
        dtype = var.get_value().dtype
        value = [np.asarray(arrays[n]) for n in variable_names(path, var)]
        value = value[0] if not is_stacked(var) else np.stack(value)
        leaves.append((path, var.replace(jnp.asarray(value, dtype=dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves), jax.tree.map(materialize, rest))


def materialize(x):
    """Concrete values for non-parameter state of an abstract model (dropout RNG keys and counters)."""
    if not isinstance(x, jax.ShapeDtypeStruct):
        return x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jnp.broadcast_to(jax.random.key(0), x.shape)
    return jnp.zeros(x.shape, x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# our directory format
# ----------------------------------------------------------------------------------------------------------------------


def save_pretrained(model: nnx.Module, cfg: Config | ModelConfig, directory: str | Path) -> Path:
    """Write ``config.yaml`` + ``model.safetensors`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    full = cfg if isinstance(cfg, Config) else Config(model=cfg)
    dump_config(full, directory / CONFIG_FILE)
    # a merged LoRA model is saved unmerged: the config still says "adapters on", so load applies them once
    params = {**named_params(model), **unmerged_kernels(model)}
    write_safetensors(directory / WEIGHTS_FILE, {k: np.asarray(v) for k, v in params.items()},
                      metadata={"format": "g4v_jax"})
    return directory


def load_model_config(directory: str | Path, overrides=()) -> Config:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a g4v_jax model directory: {CONFIG_FILE} is missing")
    return load_config(path, overrides)


def load(directory: str | Path, overrides=()) -> nnx.Module:
    """Load a converted or trained model directory: ``model = g4v_jax.load("ckpt/")``, in eval mode.

    Returns a ``GPT4Video``, ``VideoEncoder`` or ``LlamaForCausalLM`` according to the saved ``model.kind``.

    ``overrides`` are ``key=value`` strings applied to the saved config, e.g. ``["model.compute_dtype=bfloat16"]``.
    """
    directory = Path(directory)
    cfg = load_model_config(directory, overrides)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{directory}: {WEIGHTS_FILE} is missing")
    model = assign_params(abstract_model(cfg.model), read_safetensors(weights), str(weights))
    model.eval()  # inference by default: LoRA dropout off; training calls model.train()
    return model


__all__ = [
    "CheckpointMismatchError", "SafetensorsError", "assign_params", "from_dict", "load", "load_model_config",
    "materialize", "named_params", "param_shapes", "read_safetensors", "save_pretrained", "write_safetensors",
]
