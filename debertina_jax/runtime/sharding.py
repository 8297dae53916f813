"""The device mesh and how parameters, optimizer state and batches are laid out on it.

Mesh axes: "data" (pure data parallel), "fsdp" (data parallel with parameters and optimizer
state sharded, gathered per layer by XLA) and "tensor" (model parallel inside layers). The batch
is split over data x fsdp. Parameters carry logical axis names (layers.py: "vocab", "embed",
"heads", "mlp", "relpos", "layers"); `mesh.rules` in the config maps them onto mesh axes.

The mesh uses Auto axis types: XLA propagates shardings through the model from the parameter
and batch layouts we pin at the jit boundary. (With Explicit axes, the default of
`jax.make_mesh`, every gather on a sharded array would need an explicit out_sharding.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from debertina_jax.config import MeshConfig
from debertina_jax.config.model import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves the (data, fsdp, tensor) sizes; one of them may be -1 = the devices left."""
    sizes = [mesh_config.data, mesh_config.fsdp, mesh_config.tensor]
    named = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes must be positive or -1 (the rest); got {named}")
    if sizes.count(-1) > 1:
        raise ConfigError(f"only one mesh size may be -1 (the rest); got {named}")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(
                f"{num_devices} devices cannot be split by the fixed mesh sizes ({named}): "
                f"{num_devices} is not a multiple of {fixed}"
            )
        sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"the mesh ({named}) needs {fixed} devices but {num_devices} are available; "
            "set one size to -1 to use all the rest"
        )
    return sizes[0], sizes[1], sizes[2]


def make_mesh(mesh_config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axes over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def logical_to_mesh(
    logical_axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]],
) -> PartitionSpec:
    """Maps one array's logical axis names to a PartitionSpec on `mesh`.

    A dimension is replicated when its logical name has no rule, when the mesh axis has size 1,
    when the mesh axis is already used by an earlier dimension, or when the dimension does not
    divide evenly (e.g. a 128100-row vocabulary on 8 tensor shards): a legal layout always wins
    over a partial one.
    """
    if not logical_axes:
        return PartitionSpec()
    if len(logical_axes) != len(shape):
        raise ValueError(
            f"logical axes {tuple(logical_axes)} do not match an array of shape {tuple(shape)}"
        )
    table = dict(rules)
    used: set[str] = set()
    spec: list[str | None] = []
    for name, dim in zip(logical_axes, shape, strict=True):
        axis = table.get(name) if name is not None else None
        size = mesh.shape.get(axis, 1) if axis is not None else 1
        if axis is None or size == 1 or axis in used or dim % size:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return PartitionSpec(*spec)


def _logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    metadata = variable.get_metadata()
    return metadata.get("out_sharding") or metadata.get("sharding_names")


def state_shardings(
    abstract_state: Any, mesh: Mesh, rules: Sequence[tuple[str, str | None]]
) -> Any:
    """NamedShardings for every leaf of a train state (params, optimizer moments, counters).

    nnx.Variables (parameters, and the Adam moments optax builds in their image) are laid out
    by their logical axes; anything else (step counters, scalars) is replicated.
    Works on concrete arrays or on jax.ShapeDtypeStructs (jax.eval_shape output).
    """

    def one(leaf: Any) -> Any:
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            spec = logical_to_mesh(_logical_axes(leaf), value.shape, mesh, rules)
            return leaf.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays: dimension 0 split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch dimension is split."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)
