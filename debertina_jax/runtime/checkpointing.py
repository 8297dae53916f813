"""Training checkpoints: WORKDIR/checkpoints/<step>/ with three items, written by orbax.

- "state": a pytree of jax.Arrays (model and optimizer state, PRNG keys), sharded or not,
  each host writing its own shards. Restored onto whatever shardings the caller asks for.
- "data": the data iterator state of *each process* (a JSON value or bytes), one file per
  process, because every host reads its own slice of the data.
- "meta": small JSON written once (config, step, tokens seen, ...); "step" is always set.

A step directory appears only when all of it is written (orbax writes into a temporary
directory and renames it), so a run killed mid-save leaves the previous checkpoint as the
latest one. All processes must call `save` and `restore` together. In a multi-host run,
WORKDIR must be a filesystem every host sees (a GCS bucket or NFS).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from etils import epath

DataState = Any  # a JSON value (dict, list, str, number, None) or bytes


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint at all, or not the requested step."""


class CheckpointRestoreError(ValueError):
    """A checkpoint exists but cannot be read into the requested structure."""


class Restored(NamedTuple):
    state: Any
    data_state: DataState
    meta: dict[str, Any]


def _encode_data_state(value: DataState) -> dict[str, Any]:
    if isinstance(value, bytes):
        return {"bytes_base64": base64.b64encode(value).decode("ascii")}
    return {"json": value}


def _decode_data_state(record: dict[str, Any]) -> DataState:
    if "bytes_base64" in record:
        return base64.b64decode(record["bytes_base64"])
    return record["json"]


def _process_file(directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class _PerProcessJsonHandler(ocp.CheckpointHandler):
    """Every process writes (and reads back) its own small JSON file."""

    def save(self, directory: epath.Path, args: _DataSave) -> None:
        _process_file(directory).write_text(json.dumps(_encode_data_state(args.value)))

    def restore(self, directory: epath.Path, args: _DataRestore | None = None) -> DataState:
        path = _process_file(directory)
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir())
            raise CheckpointRestoreError(
                f"{path} not found: the data iterator states in {directory} ({found}) were "
                f"written by a different number of processes than this run's "
                f"{jax.process_count()}; restore without the data state to change it"
            )
        return _decode_data_state(json.loads(path.read_text()))


@ocp.args.register_with_handler(_PerProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
    value: DataState


@ocp.args.register_with_handler(_PerProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
    pass


def _cpu_abstract_state(metadata_tree: Any) -> Any:
    """ShapeDtypeStructs on one CPU device, from the shapes and dtypes stored on disk."""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), metadata_tree
    )


class Checkpointer:
    """Saves and restores training checkpoints under WORKDIR/checkpoints.

    Keyword names match `config.CheckpointConfig`, so
    `Checkpointer(workdir, **dataclasses.asdict(config.checkpoint))` works.
    With `async_save`, `save` returns once the arrays are copied off the devices (the state
    may be donated or changed right after) and writing goes on in the background;
    the next `save`, `wait` or `close` waits for it.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        every_steps: int,
        keep: int,
        async_save: bool = True,
        read_only: bool = False,
    ) -> None:
        if every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1, got {every_steps}")
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        self.every_steps = every_steps
        # orbax refuses relative paths; a workdir like runs/tiny is relative to the cwd.
        self.directory = epath.Path(os.path.abspath(workdir)) / "checkpoints"
        if read_only and not self.directory.exists():
            raise CheckpointNotFoundError(
                f"no checkpoints in {workdir}: {self.directory} is missing"
            )
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=0 if read_only else 1,  # we decide when to save (should_save)
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            # Leftovers of a save that was killed; they never count as checkpoints anyway.
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": _PerProcessJsonHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def all_steps(self) -> list[int]:
        """The steps of all complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """True on every `every_steps`-th step that has no checkpoint yet."""
        return step > 0 and step % self.every_steps == 0 and step not in self.all_steps()

    def save(
        self,
        step: int,
        state: Any,
        data_state: DataState,
        meta: dict[str, Any],
        *,
        force: bool = False,
    ) -> bool:
        """Saves when `should_save(step)` or `force`; returns whether a save started.

        `force` is for the last step and for preemption; a step that already has a
        checkpoint is never written twice.
        """
        if not (force or self.should_save(step)) or step in self.all_steps():
            return False
        if "step" in meta and meta["step"] != step:
            raise ValueError(f"meta['step'] is {meta['step']} but the checkpoint is for {step}")
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=_DataSave(data_state),
                meta=ocp.args.JsonSave({**meta, "step": step}),
            ),
            force=True,
        )

    def restore(
        self,
        step: int | None = None,
        abstract_state: Any = None,
        *,
        restore_data: bool = True,
    ) -> Restored:
        """Reads checkpoint `step` (default: the latest).

        abstract_state: the state's pytree of jax.ShapeDtypeStruct with `.sharding`, which
          decides where each array lands (resharding is fine). None: every array on one
          CPU device, with the structure stored on disk (dict keys come back as strings).
        restore_data: False skips the data iterator state (data_state is then None), e.g.
          for exporting, or to resume with a different number of processes.
        """
        step = self._existing_step(step)
        step_dir = self.directory / str(step)
        try:
            if abstract_state is None:
                abstract_state = _cpu_abstract_state(self._manager.item_metadata(step)["state"])
            items = {
                "state": ocp.args.StandardRestore(abstract_state),
                "meta": ocp.args.JsonRestore(),
            }
            if restore_data:
                items["data"] = _DataRestore()
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except CheckpointRestoreError:
            raise
        except Exception as e:  # orbax/tensorstore raise many types for unreadable files
            detail = str(e) if len(str(e)) < 800 else str(e)[:800] + " ..."
            raise CheckpointRestoreError(
                f"cannot restore checkpoint {step_dir} (corrupted or incomplete, or saved "
                f"with a different state structure): {type(e).__name__}: {detail}"
            ) from e
        data_state = restored["data"] if restore_data else None
        return Restored(restored["state"], data_state, restored["meta"])

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """Only the small JSON part of checkpoint `step` (default: the latest): config, step..."""
        step = self._existing_step(step)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
        except Exception as e:  # same policy as restore(): name the checkpoint
            raise CheckpointRestoreError(
                f"cannot read {self.directory / str(step)}/meta: {type(e).__name__}: {e}"
            ) from e
        return restored["meta"]

    def _existing_step(self, step: int | None) -> int:
        """`step`, or the latest when None; a clear error when there is no such checkpoint."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointNotFoundError(f"no checkpoint in {self.directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available steps: {steps}"
            )
        return step

    def wait(self) -> None:
        """Blocks until a background save has finished (and raises its error, if any)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_checkpoint_meta(workdir: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The JSON part (config, step, tokens seen) of a run's checkpoint, without any arrays."""
    with Checkpointer(workdir, every_steps=1, keep=1, read_only=True) as checkpointer:
        return checkpointer.read_meta(step)


def restore_checkpoint(
    workdir: str | os.PathLike,
    step: int | None = None,
    abstract_state: Any = None,
    *,
    restore_data: bool = False,
) -> Restored:
    """One-shot read-only restore (for load_checkpoint and export); see `Checkpointer.restore`."""
    with Checkpointer(workdir, every_steps=1, keep=1, read_only=True) as checkpointer:
        return checkpointer.restore(step, abstract_state, restore_data=restore_data)
