"""Logical axis names -> mesh axes, the one place that knows the mesh.

Every parameter carries ``logical_axes`` metadata (``("embed", "mlp")`` …, see ``models/layers.py``). A rules table
maps each logical name to zero or more mesh axes, MaxText style: weights are sharded along ``embed`` by FSDP and along
``mlp`` / ``heads`` / ``vocab`` by tensor parallelism; activations' batch goes over ``data`` and ``fsdp``.
A mesh axis is used at most once per array; a logical axis whose size does not divide the mesh axes is replicated
(tiny configs on 8 devices), so one mesh config fits every model config.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from g4v_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (in order of preference)
DEFAULT_RULES: Mapping[str, tuple[str, ...]] = {
    # parameters
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "vocab": ("tensor",),
    "llm_embed": ("tensor",),  # output width of the video projection
    "queries": (),
    "positions": (),
    "patch": (),
    "channels": (),
    "time_kernel": (),
    "norm": (),
    "layers": (),  # the stacked-layers axis of scan_layers: every device holds every layer's slice
    # the batch axis of the inputs: GSPMD propagates every activation's sharding from it and the weights', so no
    # activation inside the model is constrained by hand (none needed one on the meshes measured)
    "activation_batch": ("data", "fsdp"),
}


def axis_rules(cfg: MeshConfig) -> dict[str, tuple[str, ...]]:
    """``DEFAULT_RULES`` with the mesh config's ``rules`` (logical axis -> mesh axes) in place of the defaults'."""
    rules = dict(DEFAULT_RULES)
    for name, axes in cfg.rules.items():
        if name not in DEFAULT_RULES:
            raise ConfigError(f"mesh.rules.{name}: no such logical axis; known: {', '.join(sorted(DEFAULT_RULES))}")
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ConfigError(f"mesh.rules.{name}: {bad} are not mesh axes; use some of {list(MESH_AXES)}")
        rules[name] = tuple(axes)
    return rules


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices.

    The axes' product must divide the device count: a mesh over a subset (``mesh/single.yaml`` on 8 devices) is
    allowed, an uneven one (``mesh.fsdp=3`` on 8) is a ``ConfigError`` naming the axes.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    named = lambda: " ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
    fixed = [f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes) if s not in (-1, 1)]
    if sizes.count(-1) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got {named()}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ConfigError(f"{' x '.join(fixed)} (product {known}) do not divide the {n} devices, so the -1 "
                              f"axis cannot take the rest; choose axes whose product divides {n}")
        sizes[sizes.index(-1)] = n // known
    total = math.prod(sizes)
    if total > n:
        raise ConfigError(f"{named()} needs {total} devices, only {n} present")
    if n % total:
        raise ConfigError(f"{' x '.join(fixed)} (product {total}) do not divide the {n} devices; choose axes whose "
                          f"product divides {n}")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices[:total])


def check_batch_fits_mesh(mesh: Mesh, micro_batch: int, what: str) -> None:
    """Batches are split over the (data, fsdp) axes: ``micro_batch`` rows must divide evenly among them."""
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro_batch % ways:
        raise ConfigError(f"{what} = {micro_batch} rows cannot be split over mesh.data x mesh.fsdp = "
                          f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {ways} devices; make it a multiple of {ways}")


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Mapping[str, tuple[str, ...]] = DEFAULT_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array with the given logical axes.

    With ``shape`` and ``mesh``, mesh axes that do not divide the dimension (or have size 1) are dropped.
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        axes = []
        for mesh_axis in rules[name]:
            if mesh_axis in used:
                continue
            if mesh is not None:
                size = mesh.shape[mesh_axis]
                if size == 1:
                    continue
                if shape is not None and shape[i] % (size * math.prod(mesh.shape[a] for a in axes)):
                    continue
            axes.append(mesh_axis)
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, tuple[str, ...]] = DEFAULT_RULES) -> Any:
    """A tree like ``state`` holding a NamedSharding per parameter (from its ``logical_axes`` metadata)."""

    def one(var):
        axes = var.get_metadata().get("logical_axes")
        shape = np.shape(var.get_value())
        if axes is None:
            return var.replace(NamedSharding(mesh, PartitionSpec()))
        if len(axes) != len(shape):
            raise ValueError(f"logical_axes {axes} do not match parameter shape {shape}")
        return var.replace(NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules)))

    return jax.tree.map(one, state, is_leaf=_is_variable)


def shard_state(state: nnx.State, mesh: Mesh, rules: Mapping[str, tuple[str, ...]] = DEFAULT_RULES) -> nnx.State:
    """Place every parameter of ``state`` on ``mesh`` according to its logical axes."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int, rules: Mapping[str, tuple[str, ...]] = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch-major input: the leading axis over (data, fsdp), the rest replicated."""
    lead = logical_to_spec(("activation_batch",), mesh=mesh, rules=rules)[0]
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))
