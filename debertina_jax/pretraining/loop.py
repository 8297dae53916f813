"""The pretraining loop: prepared data in; checkpoints, metrics and evaluations out.

The order of things, file by file: `data/workdir.py` makes the tokenizer and shards,
`data/loader.py` reads them, `train_step.py` masks, runs the generator and the
discriminator and updates both (inside one jitted function), `checkpointing.py` saves
everything needed to resume exactly, `metrics_log.py` records progress.

What a run checks before it writes anything (docs/reliability.md): the batch fits the mesh,
no other run holds the workdir (runtime/workdir_lock.py), the prepared data fits the config,
the checkpoint to resume from restores into this config's state. Only then is
WORKDIR/config.yaml (re)written, so a refused command leaves the workdir as it was.

WORKDIR and the data directories may be gs:// URLs (a pod's hosts share nothing else): every
bucket the run names is checked first (it exists, these credentials may use it), before
anything is compiled. A resumed run restores its checkpoint straight into the sharded layout
of the state (nothing is initialised first, so the parameters are in memory once).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import yaml

from debertina_jax import storage
from debertina_jax.config import (
    CONFIG_FILE,
    Config,
    ConfigError,
    InitConfig,
    phase_config,
    phase_of_step,
    sequence_phases,
    tokens_seen,
)
from debertina_jax.data.loader import make_eval_loader
from debertina_jax.data.phased import phase_loader
from debertina_jax.data.workdir import PreparedData, data_paths, ensure_data, ensure_tokenizer
from debertina_jax.pretraining.chips import peak_flops_per_second
from debertina_jax.pretraining.flops import train_step_flops
from debertina_jax.pretraining.optimizer import decay_start_step
from debertina_jax.pretraining.state import abstract_train_state, create_train_state, shardings_of
from debertina_jax.pretraining.step import make_eval_step, make_train_step, step_rng
from debertina_jax.runtime import distributed
from debertina_jax.runtime.batch_layout import check_batch_layout
from debertina_jax.runtime.checkpointing import Checkpointer, CheckpointSaveError, short_reason
from debertina_jax.runtime.metrics_log import MetricsLogger
from debertina_jax.runtime.sharding import batch_sharding, make_mesh
from debertina_jax.runtime.workdir_lock import WorkdirLock, lock_store_for

logger = logging.getLogger(__name__)

PROFILE_DIR = "profile"
# train.prng_impl -> jax's name for it
PRNG_IMPLS = {"threefry": "threefry2x32", "rbg": "rbg", "unsafe_rbg": "unsafe_rbg"}
T = TypeVar("T")


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite); the last checkpoint is intact."""


@dataclass
class RunResult:
    workdir: Path | str  # a Path, or a gs:// URL
    stage: str
    step: int = 0
    stopped_early: bool = False  # preempted (SIGTERM) or interrupted
    last_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    last_eval: dict[str, float] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        if self.stage != "all":
            return f"{self.stage} ready in {self.workdir}"
        how = "stopped early (resume with the same command)" if self.stopped_early else "finished"
        checkpoints = storage.join(self.workdir, "checkpoints")
        text = f"training {how} at step {self.step}; checkpoints in {checkpoints}"
        if self.last_eval:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(self.last_eval.items()))
            text += f"\nlast eval: {shown}"
        return text


def _write_config(config: Config, workdir: Path | str) -> None:
    """Keeps the run's config next to it, so `run_pretrain.py --workdir DIR` can resume."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    storage.write_text(storage.join(workdir, CONFIG_FILE), text)  # atomic, local or gs://


def _main_first(action: Callable[[], T], what: str) -> T | None:
    """Runs `action` on process 0 only; every process learns whether it worked, so that a
    failure there stops them all instead of leaving the others waiting in a collective."""
    if jax.process_count() == 1:
        return action()
    from jax.experimental import multihost_utils

    result, failure = None, None
    if jax.process_index() == 0:
        try:
            result = action()
        except Exception as e:
            failure = e
    worked = multihost_utils.broadcast_one_to_all(np.int32(failure is None))
    if failure is not None:
        raise failure
    if not int(worked):
        raise TrainingStopped(f"process 0 could not {what}; its error says why")
    return result


def _lock(workdir: Path | str) -> WorkdirLock | None:
    """Process 0 takes the workdir's lock (creating the workdir); None on the others."""

    def take() -> WorkdirLock:
        storage.makedirs(workdir)
        lock = WorkdirLock(lock_store_for(workdir))
        lock.acquire()
        return lock

    return _main_first(take, f"lock {workdir}")


def _prepare(config: Config, workdir: Path | str) -> PreparedData:
    """Process 0 builds the tokenizer and shards; the others wait and then read them."""
    if jax.process_count() == 1:
        return ensure_data(config, workdir)
    _main_first(lambda: ensure_data(config, workdir), "prepare the data")
    return ensure_data(config, workdir, prepare_missing=False)


def _close_all(closers: list[tuple[str, Callable[[], None]]], failure: BaseException | None):
    """Closes everything, in order. With the run already failing, a closing error (a full
    disk again, in the logger) is one warning line: it must not replace the real error."""
    first: BaseException | None = None
    for name, close in closers:
        try:
            close()
        except Exception as e:
            if failure is None and first is None:
                first = e
            else:
                logger.warning("while stopping, closing the %s failed too: %s", name,
                               short_reason(e))  # fmt: skip
    if first is not None:
        raise first


def _global_batch(local: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict:
    """Each process's slice of the batch -> one global array sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def evaluate(eval_step, state, prepared: PreparedData, config: Config, sharding) -> dict:
    """Mean metrics over the first `train.eval_batches` batches of the held-out split."""
    loader = make_eval_loader(
        prepared.data_dir,
        "eval",
        config.train.batch_size,
        max_seq_length=config.data.max_seq_length,
    )
    totals: dict[str, float] = {}
    count = 0
    try:
        for i, batch in enumerate(loader):
            if i >= config.train.eval_batches:
                break
            # The eval step is deterministic (no dropout); a fixed key keeps masks comparable
            # from one evaluation to the next.
            metrics = jax.device_get(
                eval_step(state, _global_batch(batch, sharding), jax.random.key(i))
            )
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + float(value)
            count += 1
    finally:
        loader.close()
    return {name: total / max(count, 1) for name, total in totals.items()}


def check_storage(config: Config, workdir: str | Path) -> None:
    """Every bucket the run will touch exists and may be used with these credentials; a
    malformed gs:// path is refused. Cheap (one listing each), so it runs before anything."""
    tokenizer_dir, data_dir = data_paths(config, workdir)
    named = [("--workdir", workdir), ("data.tokenizer_dir", tokenizer_dir)]
    named += [("data.prepared_dir", data_dir)]
    named += [("data.train_files", f) for f in config.data.train_files]
    named += [(f"init.{k}", v) for k, v in dataclasses.asdict(config.init).items() if v]
    for key, path in named:
        path = storage.check_path(path, key)
        if storage.is_remote(path):
            storage.check_access(path.split("*")[0].rsplit("/", 1)[0] if "*" in path else path)


def pretrain(config: Config, workdir: str | Path, *, stage: str = "all") -> RunResult:
    """Runs (or resumes) the pretraining described by `config` in `workdir` (local or gs://)."""
    workdir = storage.check_path(workdir, "workdir")
    remote = storage.is_remote(workdir)
    workdir = workdir.rstrip("/") if remote else Path(workdir)
    check_storage(config, workdir)
    # The PRNG of every key the run makes (masks, sampling, dropout, eval): set before any.
    jax.config.update("jax_default_prng_impl", PRNG_IMPLS[config.train.prng_impl])
    distributed.maybe_initialize(config.mesh.distributed)
    mesh = make_mesh(config.mesh)
    check_batch_layout(config.train.batch_size, config.optimizer.grad_accum_steps, mesh)
    for phase in sequence_phases(config) if config.train.phases else ():
        try:
            check_batch_layout(phase.batch_size, config.optimizer.grad_accum_steps, mesh)
        except ConfigError as e:
            raise ConfigError(f"train.phases[{phase.index}] (batch size): {e}") from None
    created = not remote and not workdir.exists()
    lock = _lock(workdir)
    try:
        result = RunResult(workdir, stage)
        if stage == "tokenizer":  # the shards are left for a later command
            _main_first(lambda: ensure_tokenizer(config, workdir), "train the tokenizer")
        else:
            prepared = _prepare(config, workdir)
        if stage != "all":
            if distributed.is_main_process():
                _write_config(config, workdir)
            return result
        return _train(config, workdir, mesh, prepared, result, lock)
    finally:
        if lock is not None:
            lock.release()
            # A refused fresh run (e.g. a bad corpus) leaves no empty workdir behind.
            if created and workdir.is_dir() and not any(workdir.iterdir()):
                workdir.rmdir()


class _Profiler:
    """A jax.profiler trace of steps [start, stop) (train.profile_steps) into
    WORKDIR/profile/: traced to a local directory, then copied there (for a bucket too)."""

    def __init__(self, steps: tuple[int, int] | None, workdir: Path | str) -> None:
        self.steps = steps
        self.target = storage.join(workdir, PROFILE_DIR)
        self._local: str | None = None

    def before(self, step: int) -> None:
        if self.steps is not None and step == self.steps[0]:
            self._local = tempfile.mkdtemp(prefix="debertina-profile-")
            jax.profiler.start_trace(self._local)

    def after(self, step: int, outputs: Any) -> None:
        if self._local is not None and step + 1 == self.steps[1]:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self._local is None:
            return
        local, self._local = self._local, None
        jax.profiler.stop_trace()
        storage.copy_tree(local, self.target)
        shutil.rmtree(local, ignore_errors=True)
        logger.info("profile of steps %s in %s", list(self.steps), self.target)


def _throughput(config: Config, steps: int, elapsed: float) -> dict[str, float]:
    """tokens/s, sequences/s and, on a device with a known peak (pretraining/chips.py), MFU."""
    train = config.train
    rows = {
        "tokens_per_second": steps * train.batch_size * config.data.max_seq_length / elapsed,
        "seq_per_second": steps * train.batch_size / elapsed,
    }
    peak = peak_flops_per_second(jax.devices()[0].device_kind)
    if peak is not None:
        flops = train_step_flops(config, train.batch_size, config.data.max_seq_length).total
        rows["mfu"] = steps * flops / elapsed / (peak * jax.device_count())
    return rows


def _train(
    config: Config,
    workdir: Path | str,
    mesh: jax.sharding.Mesh,
    prepared: PreparedData,
    result: RunResult,
    lock: WorkdirLock | None,
) -> RunResult:
    train = config.train
    # wsd: the last checkpoint before the decay is saved and kept, to continue the run from.
    decay_start = decay_start_step(config)
    kept = () if decay_start is None else (decay_start,)
    checkpointer = Checkpointer(
        workdir, **dataclasses.asdict(config.checkpoint), preserve_steps=kept
    )
    # Closed in this order: the checkpointer first, so that a failing last save is the error.
    closers: list[tuple[str, Callable[[], None]]] = [("checkpointer", checkpointer.close)]

    def last_good() -> str:
        step = checkpointer.last_good_step()
        if step is None:
            return "there is no checkpoint yet"
        path = checkpointer.directory / str(step)
        return f"the last good checkpoint (step {step}, {path}) is intact"

    try:
        resume = bool(checkpointer.all_steps())
        if resume:
            # Straight into the sharded layout: no state is initialised only to be replaced
            # (that would hold the parameters twice). The HF directories of `init` are only
            # read for a fresh start (and may be gone by now).
            graphdef, abstract, _ = abstract_train_state(
                dataclasses.replace(config, init=InitConfig()), mesh, train.seed
            )
            state_shardings = shardings_of(abstract)
        else:
            graphdef, state = create_train_state(config, mesh, train.seed)
            state_shardings = shardings_of(state)
        phases = sequence_phases(config)
        start = 0
        if resume:
            restored, start = checkpointer.restore_newest_readable(abstract)
            state = restored.state
            logger.info("resumed from the checkpoint of step %d", start)
        # Each sequence-length phase has its own loader (and compile of the step).
        phase = phase_of_step(phases, start + 1)
        loader = phase_loader(config, prepared.data_dir, phases, phase)
        closers.append(("data loader", lambda: loader.close()))  # the current phase's
        if resume and start >= phase.first_step:  # at a boundary the next phase starts afresh
            loader.set_state(restored.data_state)
        # Everything this run can check is checked: from now on the workdir is this config's.
        if distributed.is_main_process():
            _write_config(config, workdir)
        result.step = start

        train_step = make_train_step(config, mesh, graphdef, state_shardings)
        eval_step = make_eval_step(config, mesh, graphdef, state_shardings)
        sharding = batch_sharding(mesh)
        metrics_logger = MetricsLogger(workdir, total_steps=train.steps, start_step=start)
        closers.append(("metrics logger", metrics_logger.close))
        profiler = _Profiler(train.profile_steps, workdir)
        closers.append(("profiler", profiler.close))
        watcher = distributed.PreemptionWatcher(sync_every=train.log_every_steps)
        closers.append(("preemption watcher", watcher.close))
        bad_in_a_row = 0
        pending: dict[str, Any] | None = None
        window_start, window_steps = time.perf_counter(), 0

        def meta(step: int) -> dict[str, Any]:
            return {"config": config.to_dict(), "tokens_seen": tokens_seen(phases, step)}

        def retry(step: int, failure: CheckpointSaveError) -> None:
            """A failed save: this step's state is saved again (a few times at most)."""
            checkpointer.retry_save(step, state, loader.get_state(), meta(step), failure)

        for step in range(start + 1, train.steps + 1):
            if step > phase.last_step:  # the next phase: its loader, shapes and compile
                loader.close()
                phase = phase_of_step(phases, step)
                loader = phase_loader(config, prepared.data_dir, phases, phase)
                window_start, window_steps = time.perf_counter(), 0
                logger.info("phase %d from step %d: %d lines of %d tokens per step",
                            phase.index, step, phase.batch_size, phase.max_seq_length)  # fmt: skip
            batch = _global_batch(next(loader), sharding)
            profiler.before(step)
            # A pure function of (seed, step): a resumed run draws the same masks and dropout.
            state, metrics = train_step(state, batch, step_rng(train.seed, step))
            profiler.after(step, metrics)
            window_steps += 1
            try:
                checkpointer.check()  # a save that failed in the background: retried now
            except CheckpointSaveError as failure:
                retry(step, failure)
            if lock is not None and lock.lost:
                raise TrainingStopped(
                    f"another run took over the lock of {workdir} (this one was stopped for "
                    f"longer than the lock's stale limit); stopping at step {step}: "
                    f"{last_good()}"
                )

            # Look at the previous step's flag, so the host never waits on the step it has
            # just dispatched; a skipped update left the state unchanged anyway.
            if pending is not None:
                bad_in_a_row = bad_in_a_row + 1 if pending["nonfinite"] else 0
            pending = {"nonfinite": metrics["nonfinite"]}
            if bad_in_a_row >= train.max_consecutive_nonfinite:
                raise TrainingStopped(
                    f"{bad_in_a_row} non-finite losses or gradients in a row before step "
                    f"{step}; {last_good()}. Lower optimizer.learning_rate or check the data."
                )

            try:
                if step % train.log_every_steps == 0 or step == train.steps:
                    row = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    elapsed = time.perf_counter() - window_start
                    row.update(_throughput(phase_config(config, phase), window_steps, elapsed))
                    row["tokens_seen"] = tokens_seen(phases, step)
                    row["max_seq_length"] = phase.max_seq_length
                    row["batch_size"] = phase.batch_size
                    metrics_logger.update(step, row)
                    result.last_metrics = row
                    window_start, window_steps = time.perf_counter(), 0

                if step % train.eval_every_steps == 0 or step == train.steps:
                    result.last_eval = evaluate(eval_step, state, prepared, config, sharding)
                    if "ema" in state:  # the moving average, on the same batches and masks
                        ema = {**state, "params": state["ema"]}
                        averaged = evaluate(eval_step, ema, prepared, config, sharding)
                        result.last_eval.update({f"ema_{k}": v for k, v in averaged.items()})
                    result.last_eval["max_seq_length"] = config.data.max_seq_length
                    metrics_logger.log_eval(step, result.last_eval)
                    window_start, window_steps = time.perf_counter(), 0
            except OSError as e:  # the metrics files: a full disk often shows up here first
                raise TrainingStopped(
                    f"cannot write {e.filename or workdir}: {short_reason(e)}; stopping at "
                    f"step {step}: {last_good()}. Free space and run the same command to resume."
                ) from None

            stop = watcher.should_stop(step)
            if checkpointer.should_save(step) or stop or step in (train.steps, decay_start):
                # The rows up to a checkpoint are durable before it is (a bucket's metrics
                # are uploaded in batches): a resume from it then misses none of them.
                metrics_logger.flush()
                try:
                    checkpointer.save(step, state, loader.get_state(), meta(step), force=True)
                except CheckpointSaveError as failure:
                    retry(step, failure)
            result.step = step
            if stop:
                result.stopped_early = True
                break
        try:
            checkpointer.wait()  # the last save: its failure is this run's error
        except CheckpointSaveError as failure:
            retry(result.step, failure)
    except BaseException as failure:
        _close_all(closers, failure)
        raise
    _close_all(closers, None)
    return result
