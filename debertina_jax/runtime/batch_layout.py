"""Whether the global batch can be laid out on the mesh, checked before anything compiles.

The batch is split over the mesh axes data x fsdp (sharding.BATCH_AXES), and with gradient
accumulation into k micro-batches that are each split the same way; every process reads a
contiguous block of it. A batch that does not divide fails deep inside XLA ("NamedSharding
... implies that array axis 0 is partitioned 8 times"); this names the config keys instead.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from debertina_jax.config.checks import ConfigError
from debertina_jax.runtime.sharding import BATCH_AXES, MESH_AXES, batch_shards


def check_batch_layout(batch_size: int, grad_accum_steps: int, mesh: Mesh) -> None:
    """Raises ConfigError naming train.batch_size and the mesh when the batch does not split."""
    shards = batch_shards(mesh)
    unit = shards * grad_accum_steps
    processes = jax.process_count()
    if batch_size % unit == 0 and batch_size % processes == 0:
        return
    split = " x ".join(f"mesh.{a} ({mesh.shape[a]})" for a in BATCH_AXES)
    layout = ", ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
    why = f"the batch is split over {split} = {shards} devices"
    if grad_accum_steps > 1:
        why += f", in optimizer.grad_accum_steps={grad_accum_steps} micro-batches each"
    if batch_size % unit == 0:  # only the processes disagree (a mesh with tensor across hosts)
        unit = unit * processes
        why += f", and read by {processes} processes"
    lower = batch_size // unit * unit
    options = " or ".join(f"train.batch_size={b}" for b in (lower, lower + unit) if b > 0)
    raise ConfigError(
        f"train.batch_size={batch_size} does not fit the mesh ({layout} on "
        f"{mesh.devices.size} devices): {why}, so it must be a multiple of {unit}. "
        f"Use {options}, or change the mesh sizes"
    )
