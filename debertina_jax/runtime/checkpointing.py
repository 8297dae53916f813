"""Training checkpoints: WORKDIR/checkpoints/<step>/ with three items, written by orbax.

- "state": a pytree of jax.Arrays (model and optimizer state, PRNG keys), sharded or not,
  each host writing its own shards. Restored onto whatever shardings the caller asks for.
- "data": the data iterator state of *each process* (a JSON value or bytes), one file per
  process, because every host reads its own slice of the data.
- "meta": small JSON written once (config, step, tokens seen, ...); "step" is always set.

A step directory appears only when all of it is written (orbax writes into a temporary
directory and renames it), so a run killed mid-save leaves the previous checkpoint as the
latest one (on GCS, which has no rename, orbax marks a finished step with commit_success.txt).
All processes must call `save` and `restore` together. In a multi-host run, WORKDIR must be
storage every host sees: a gs:// bucket (orbax writes it natively) or NFS.

Failures are turned into one clear error each, without orbax's pages of tracebacks:
- a save that fails (full disk, lost permissions) raises CheckpointSaveError, naming the
  checkpoint and the last good one, from `check` (the training loop calls it every step, so
  a background save failure stops the run at once), `save`, `wait` or `close`;
  `retry_save` then saves the caller's current state again, `save_retries` times at most;
- `restore_newest_readable` skips checkpoints that cannot be read (truncated, corrupted),
  moves each aside to <step>.unreadable (never deleting one) and says so; a checkpoint of
  another state structure (a changed model) is an error, not something to skip.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import re
import sys
import threading
import time
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from debertina_jax import storage

DataState = Any  # a JSON value (dict, list, str, number, None) or bytes
UNREADABLE_SUFFIX = ".unreadable"

logger = logging.getLogger(__name__)


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint at all, or not the requested step."""


class CheckpointRestoreError(ValueError):
    """A checkpoint exists but cannot be read into the requested structure."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message  # the short why, without the checkpoint's name


class CheckpointStructureError(CheckpointRestoreError):
    """The checkpoint holds another state structure (e.g. the model changed): not damage."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the message names it and the last good one."""


def _root_cause(error: BaseException) -> BaseException:
    """The TensorStore status error ("OUT_OF_RANGE: Error reading ...") that orbax wraps in
    vaguer ones ("Encountered error while reading array index"), if there is one."""
    seen, chain = set(), error
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if re.match(r"[A-Z][A-Z_]+: ", str(chain)):
            return chain
        chain = chain.__cause__ or chain.__context__
    return error


def short_reason(error: BaseException) -> str:
    """One line on why orbax/TensorStore failed, without the page of TensorStore spec."""
    error = _root_cause(error)
    text = str(error)
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
        return f"{os.strerror(int(code[1]))} [errno {code[1]}]"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror} [errno {error.errno}]"
    lines = text.split("See full TensorStore details")[0].strip().splitlines()
    line = lines[0].rstrip(". ") if lines else ""
    line = line if len(line) <= 300 else line[:300] + " ..."
    if not line:
        return type(error).__name__
    return line if re.match(r"[A-Z][A-Z_]+: ", line) else f"{type(error).__name__}: {line}"


def _raised_in_orbax(record: logging.LogRecord) -> bool:
    traceback = record.exc_info[2] if record.exc_info else None
    while traceback is not None:
        if "orbax" in traceback.tb_frame.f_code.co_filename:
            return True
        traceback = traceback.tb_next
    return False


def _never_retrieved(record: logging.LogRecord) -> bool:
    """asyncio's report of a future or task whose exception nobody awaited."""
    return "exception was never retrieved" in record.getMessage()


class _OrbaxErrors(logging.Filter):
    """Holds back orbax's error tracebacks while a save is in flight: a failed save becomes
    one CheckpointSaveError instead. Records of a save that succeeds are let through later.

    asyncio's "exception was never retrieved" for orbax's abandoned futures is aftermath of a
    failed save or restore, which is reported on its own: always dropped. Such a future may
    hold an error TensorStore raised in native code, with no orbax frame in its traceback, so
    after a failure every such record is aftermath; during a save they are held like orbax's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.failed = False  # a save or restore failed and was reported
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio":
            if _raised_in_orbax(record) or (self.failed and _never_retrieved(record)):
                return False
            if self.active and _never_retrieved(record):
                self.held.append(record)
                return False
            return True
        if self.active and record.levelno >= logging.ERROR and "orbax" in record.pathname:
            self.held.append(record)
            return False
        return True


_ORBAX_ERRORS = _OrbaxErrors()
logging.getLogger("absl").addFilter(_ORBAX_ERRORS)
logging.getLogger("asyncio").addFilter(_ORBAX_ERRORS)
_HOOK_LOCK = threading.Lock()


def _is_aftermath(unraisable: Any) -> bool:
    """An error printed after a failed save or restore that says nothing the real one does
    not: TensorStore calling back into orbax's closed asyncio loop ("Event loop is closed"),
    or orbax's abandoned read coroutines raising when they are closed (GeneratorExit)."""
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return True
    code = getattr(unraisable.object, "cr_code", None)
    return (
        code is not None
        and "orbax" in code.co_filename
        and isinstance(value.__cause__ or value.__context__, GeneratorExit)
    )


def _quiet_closed_loop_callbacks() -> None:
    """Drops the aftermath errors (above), which come as pages of tracebacks and TensorStore
    specs; every other unraisable error is printed as before."""
    with _HOOK_LOCK:
        previous = sys.unraisablehook
        if getattr(previous, "_debertina_quiet", False):
            return

        def hook(unraisable: Any) -> None:
            if not _is_aftermath(unraisable):
                previous(unraisable)

        hook._debertina_quiet = True  # type: ignore[attr-defined]
        sys.unraisablehook = hook


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
            raise CheckpointStructureError(
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


def _preservation(keep: int, preserve_steps: tuple[int, ...]) -> Any:
    """The newest `keep` checkpoints, and those of `preserve_steps` whatever their age (e.g.
    the last one before a wsd schedule's decay, to continue the run from)."""
    latest = ocp.checkpoint_managers.LatestN(keep)
    if not preserve_steps:
        return latest
    steps = ocp.checkpoint_managers.CustomSteps(list(preserve_steps))
    return ocp.checkpoint_managers.AnyPreservationPolicy([latest, steps])


class Checkpointer:
    """Saves and restores training checkpoints under WORKDIR/checkpoints.

    Keyword names match `config.CheckpointConfig`, so
    `Checkpointer(workdir, **dataclasses.asdict(config.checkpoint))` works; `preserve_steps`
    are kept beyond the newest `keep`.
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
        save_retries: int = 2,
        retry_delay: float = 5.0,
        preserve_steps: tuple[int, ...] = (),
    ) -> None:
        if every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1, got {every_steps}")
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        if save_retries < 0:
            raise ValueError(f"checkpoint.save_retries must be >= 0, got {save_retries}")
        self.every_steps = every_steps
        self.save_retries = save_retries
        self.retry_delay = retry_delay
        # orbax refuses relative paths; a workdir like runs/tiny is relative to the cwd.
        self.directory = epath.Path(storage.absolute(workdir)) / "checkpoints"
        if read_only and not self.directory.exists():
            raise CheckpointNotFoundError(
                f"no checkpoints in {workdir}: {self.directory} is missing"
            )
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=0 if read_only else 1,  # we decide when to save (should_save)
            preservation_policy=_preservation(keep, preserve_steps),
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            # Leftovers of a save that was killed; they never count as checkpoints anyway.
            cleanup_tmp_directories=not read_only,
        )
        _quiet_closed_loop_callbacks()
        self._pending: int | None = None  # the step of a save that may still be writing
        self._failed = False  # a save failed and was reported: close() stays quiet
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

    def last_good_step(self) -> int | None:
        """The newest checkpoint known to be complete (not one still being written)."""
        steps = [s for s in self.all_steps() if s != self._pending]
        return steps[-1] if steps else None

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
        checkpoint is never written twice. Raises CheckpointSaveError when this save, or the
        previous one still writing in the background, fails.
        """
        if not (force or self.should_save(step)) or step in self.all_steps():
            return False
        if "step" in meta and meta["step"] != step:
            raise ValueError(f"meta['step'] is {meta['step']} but the checkpoint is for {step}")
        self.wait()  # the previous save first: its failure is reported as its own
        self._pending = step
        self._failed = False
        _ORBAX_ERRORS.active += 1
        try:
            started = self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=_DataSave(data_state),
                    meta=ocp.args.JsonSave({**meta, "step": step}),
                ),
                force=True,
            )
        except Exception as e:  # the synchronous part failed (e.g. creating the directory)
            raise self._save_failed(step, short_reason(e)) from None
        if not self._manager.is_saving_in_progress():
            self._settle()  # a synchronous save: confirm it now
        return started

    def retry_save(
        self,
        step: int,
        state: Any,
        data_state: DataState,
        meta: dict[str, Any],
        failure: CheckpointSaveError,
    ) -> None:
        """After `failure` (a save that failed), saves `state` as checkpoint `step`, waiting
        for each attempt, up to `save_retries` times with growing pauses (a storage error is
        often brief); raises the last CheckpointSaveError, which names the last good
        checkpoint, when every attempt fails."""
        for attempt in range(1, self.save_retries + 1):
            delay = self.retry_delay * 2 ** (attempt - 1)
            logger.warning(
                "%s Retrying the checkpoint of step %d in %.0f s (%d of %d).",
                failure, step, delay, attempt, self.save_retries,
            )  # fmt: skip
            time.sleep(delay)
            try:
                self.save(step, state, data_state, meta, force=True)
                self.wait()
                logger.warning("the checkpoint of step %d was written on retry %d", step, attempt)
                return
            except CheckpointSaveError as e:
                failure = e
        raise failure

    def check(self) -> None:
        """Raises CheckpointSaveError if a background save has failed; never waits.

        In a multi-process run it does nothing: processes see a save end at different steps,
        and one stopping alone would leave the others waiting in a collective. The failure
        then surfaces at the next `save` or at `close`, which all processes call together.
        """
        if jax.process_count() > 1:
            return
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self._settle()

    def _settle(self) -> None:
        """Confirms that the pending save is on disk, or raises CheckpointSaveError."""
        step = self._pending
        if step is None:
            return
        error: BaseException | None = None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            error = e
        # orbax lists a step as soon as its save starts and may log, rather than raise, a
        # failure to finalize it: only the directory says whether the checkpoint exists.
        self._manager.reload()
        if error is None and step in self.all_steps():
            self._pending = None
            _ORBAX_ERRORS.active -= 1
            held, _ORBAX_ERRORS.held = _ORBAX_ERRORS.held, []
            for record in held:  # errors orbax survived: show them after all
                logging.getLogger(record.name).handle(record)
            return
        if error is None:
            logged = [r.exc_info[1] for r in _ORBAX_ERRORS.held if r.exc_info]
            reason = short_reason(logged[0]) if logged else "orbax did not finalize it"
        else:
            reason = short_reason(error)
        raise self._save_failed(step, reason) from None

    def _save_failed(self, step: int, reason: str) -> CheckpointSaveError:
        self._pending = None
        self._failed = True
        _ORBAX_ERRORS.failed = True
        _ORBAX_ERRORS.active -= 1
        _ORBAX_ERRORS.held = []
        self._manager.reload()
        good = [s for s in self.all_steps() if s != step]
        if good:
            last = (
                f"The last good checkpoint is step {good[-1]} ({self.directory / str(good[-1])}): "
                "fix the cause (e.g. free disk space) and run the same command to resume from it"
            )
        else:
            last = "There is no earlier checkpoint: the same command starts over"
        return CheckpointSaveError(
            f"could not write the checkpoint of step {step} to {self.directory / str(step)}: "
            f"{reason}. {last}."
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
          decides where each array lands (resharding is fine); a checkpoint of another
          structure raises CheckpointStructureError. None: every array on one CPU device,
          with the structure stored on disk (dict keys come back as strings).
        restore_data: False skips the data iterator state (data_state is then None), e.g.
          for exporting, or to resume with a different number of processes.
        """
        step = self._existing_step(step)
        step_dir = self.directory / str(step)
        try:
            stored = self._manager.item_metadata(step)["state"]
        except Exception as e:  # a truncated or missing metadata file
            raise self._unreadable(step, e) from e
        if abstract_state is None:
            abstract_state = _cpu_abstract_state(stored)
        else:
            _check_structure(step_dir, stored, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if restore_data:
            items["data"] = _DataRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except CheckpointRestoreError:
            raise
        except Exception as e:  # orbax/tensorstore raise many types for unreadable files
            raise self._unreadable(step, e) from e
        data_state = restored["data"] if restore_data else None
        return Restored(restored["state"], data_state, restored["meta"])

    def _unreadable(self, step: int, error: BaseException) -> CheckpointRestoreError:
        _ORBAX_ERRORS.failed = True
        others = [s for s in self.all_steps() if s != step]
        reason = short_reason(error)
        return CheckpointRestoreError(
            f"cannot restore checkpoint {self.directory / str(step)} (corrupted or incomplete): "
            f"{reason}. Other checkpoints: steps {others} (choose one with step=N, --step N)",
            reason,
        )

    def restore_newest_readable(
        self, abstract_state: Any, *, restore_data: bool = True
    ) -> tuple[Restored, int]:
        """(restored, step) of the newest checkpoint that restores, for resuming a run.

        A newer checkpoint that cannot be read (damaged, incomplete) is skipped with a
        warning and moved aside to <step>.unreadable: never deleted, and no longer in the
        way of the resumed run's own save of that step nor of `keep`. A checkpoint of
        another state structure stops everything (CheckpointStructureError): the run's
        config changed, and an older checkpoint would not fit either.
        """
        skipped: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                restored = self.restore(step, abstract_state, restore_data=restore_data)
                error = None
            except CheckpointStructureError:
                raise
            except CheckpointRestoreError as e:
                restored, error = None, e
            if not _all_processes_agree(error is None):
                skipped.append((step, error.reason if error else "unreadable on another host"))
                continue
            for bad, reason in skipped:
                moved = self._set_aside(bad)
                logger.warning(
                    "skipped checkpoint %s, which cannot be restored (%s): resuming from step "
                    "%d instead. It is kept as %s; rename it back to %d to use it.",
                    self.directory / str(bad), reason, step, moved, bad,
                )
            return restored, step
        if not skipped:
            raise CheckpointNotFoundError(f"no checkpoint in {self.directory}")
        listed = "; ".join(f"step {s}: {reason}" for s, reason in skipped)
        raise CheckpointRestoreError(
            f"no checkpoint in {self.directory} can be restored ({listed}). Nothing was moved "
            "or deleted; move the checkpoints away to start over"
        )

    def _set_aside(self, step: int) -> epath.Path:
        """Renames a step directory to <step>.unreadable[-N]; orbax no longer sees it."""
        source = self.directory / str(step)
        target = self.directory / f"{step}{UNREADABLE_SUFFIX}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}{UNREADABLE_SUFFIX}-{n}"
        if jax.process_index() == 0:
            # On GCS a copy of every file, then the deletion of the original: commit marker
            # first, so orbax stops listing the step before any of it is gone.
            storage.move_tree(str(source), str(target), last="commit_success.txt")
        _sync_processes(f"debertina_jax: checkpoint {step} set aside")
        self._manager.reload()
        return target

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
        """Blocks until a background save has finished; raises CheckpointSaveError if it failed."""
        self._settle()

    def close(self) -> None:
        """Waits for a pending save (raising CheckpointSaveError if it fails) and releases
        orbax's threads. After a failure was reported, closes quietly."""
        try:
            if not self._failed:
                self._settle()
        finally:
            try:
                self._manager.close()
            except Exception:
                if not self._failed:  # reported by _settle already otherwise
                    raise

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _flat_shapes(tree: Any) -> dict[tuple, tuple[int, ...] | None]:
    """Leaf path -> shape, in orbax's own naming of a pytree's leaves. PRNG keys: None (on
    disk they are their raw data, with a trailing dimension the typed key does not have)."""

    def shape(leaf: Any) -> tuple[int, ...] | None:
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            return None
        return tuple(leaf.shape)

    flat = ocp.tree.to_flat_dict(tree)
    return {path: shape(leaf) for path, leaf in flat.items()}


def _check_structure(step_dir: epath.Path, stored: Any, abstract_state: Any) -> None:
    """Raises CheckpointStructureError when the checkpoint is not a state of this shape."""
    on_disk = _flat_shapes(stored)
    wanted = _flat_shapes(abstract_state)
    name = ".".join
    problems = [f"missing {name(p)}" for p in sorted(set(wanted) - set(on_disk))]
    problems += [f"unexpected {name(p)}" for p in sorted(set(on_disk) - set(wanted))]
    problems += [
        f"{name(p)} is {on_disk[p]} on disk, {wanted[p]} here"
        for p in sorted(set(on_disk) & set(wanted))
        if None not in (on_disk[p], wanted[p]) and on_disk[p] != wanted[p]
    ]
    if not problems:
        return
    more = f" and {len(problems) - 2} more" if len(problems) > 2 else ""
    raise CheckpointStructureError(
        f"checkpoint {step_dir} holds another state than this run builds "
        f"({'; '.join(problems[:2])}{more}): the model or optimizer config differs from the "
        "run's. Resume with the config the run was started with (WORKDIR/config.yaml), or use "
        "another workdir"
    )


def _all_processes_agree(ok: bool) -> bool:
    """True when `ok` on every process: a restore that fails anywhere fails everywhere."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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


def restore_params(
    workdir: str | os.PathLike, step: int | None, abstract_params: Any, item: str = "params"
) -> Any:
    """Only state["params"] of checkpoint `step` (default: the latest), laid out and placed as
    `abstract_params` (ShapeDtypeStructs with shardings) says; `item="ema"` reads the moving
    average of the parameters instead (a run with train.ema_decay keeps it beside them).

    orbax's partial restore reads those arrays and leaves the rest of the state (the optimizer's
    moments, twice the parameters' size) on disk: reading a run back needs no optimizer.
    """
    with Checkpointer(workdir, every_steps=1, keep=1, read_only=True) as checkpointer:
        step_dir = checkpointer.directory / str(checkpointer._existing_step(step))
    target = {item: abstract_params}
    args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
    )
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
            return reader.restore(step_dir / "state", args=args)[item]
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files
        _ORBAX_ERRORS.failed = True
        reason = short_reason(e)
        raise CheckpointRestoreError(
            f"cannot restore checkpoint {step_dir} (corrupted or incomplete, or saved with "
            f"other parameters): {reason}",
            reason,
        ) from e
