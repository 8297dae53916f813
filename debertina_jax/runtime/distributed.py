"""Multi-host start-up and preemption handling.

A TPU pod slice runs one Python process per host. Every process must call
`maybe_initialize` before anything touches a JAX backend (`jax.devices()`, `jax.make_mesh`,
any array), so that the processes find each other and `jax.devices()` lists the devices of
all hosts. The same code runs unchanged on one host, where it does nothing.

`PreemptionWatcher` turns SIGTERM (the TPU preemption notice) and Ctrl-C into "save and
stop at this step", agreed on by every process, so that all of them save the same step.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from typing import Literal

import jax
import numpy as np

logger = logging.getLogger(__name__)

Mode = Literal["auto", "on", "off"]


class DistributedInitError(RuntimeError):
    """`jax.distributed.initialize` could not run or failed; the message says why."""


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedInitError(
            f"environment variable {name} must be an integer, got {value!r}"
        ) from None


def _attached_tpu_chips() -> int:
    # Reads PCI ids from /sys only: no network, no backend initialisation.
    from jax._src import hardware_utils

    try:
        return hardware_utils.num_available_tpu_chips_and_device_id()[0]
    except OSError:
        return 0


def detect_cluster(
    env: Mapping[str, str] | None = None, tpu_chips: int | None = None
) -> str | None:
    """Names the multi-process environment this process runs in, or None for a lone process.

    Only cheap local evidence is used (environment variables and attached TPU chips), so the
    answer is the same on every host and costs nothing on a laptop.
    """
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS is set"
    slurm_tasks = _env_int(env, "SLURM_NTASKS")
    if "SLURM_JOB_ID" in env and slurm_tasks is not None and slurm_tasks > 1:
        return f"SLURM job with {slurm_tasks} tasks"
    mpi_size = _env_int(env, "OMPI_COMM_WORLD_SIZE")
    if mpi_size is not None and mpi_size > 1:
        return f"Open MPI job with {mpi_size} processes"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "multi-slice TPU (MEGASCALE_COORDINATOR_ADDRESS is set)"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return f"TPU pod slice with {len(hosts)} hosts (TPU_WORKER_HOSTNAMES)"
    chips = _attached_tpu_chips() if tpu_chips is None else tpu_chips
    if chips > 0:
        # A single-host TPU VM initialises fine as a 1-process cluster (jax reads the
        # worker list from the VM metadata); on a pod slice this is what finds the others.
        return f"Cloud TPU VM with {chips} TPU chips attached"
    return None


def maybe_initialize(
    mode: Mode = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = 300,
) -> bool:
    """Calls `jax.distributed.initialize` when asked ("on") or when a cluster is detected.

    Must run before any other JAX call that creates a backend (`jax.devices()`,
    `jax.make_mesh`, creating arrays, ...). Arguments left as None come from the environment
    variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, and otherwise
    from jax's own cluster detection (TPU, SLURM, Open MPI). Returns True when JAX runs as a
    distributed system afterwards; calling it again is harmless.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"mesh.distributed must be one of auto, on, off; got {mode!r}")
    if jax.distributed.is_initialized():
        return True
    if mode == "off":
        return False
    if mode == "on":
        reason = "mesh.distributed=on"
    elif coordinator_address is not None:
        reason = f"coordinator address {coordinator_address} given"
    else:
        reason = detect_cluster()
    if reason is None:
        return False

    env = os.environ
    num_processes = (
        num_processes if num_processes is not None else _env_int(env, "JAX_NUM_PROCESSES")
    )
    process_id = process_id if process_id is not None else _env_int(env, "JAX_PROCESS_ID")
    # gloo gives CPU backends cross-process collectives (how a pod is simulated locally);
    # the setting is ignored by TPU and GPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logger.info("initialising jax.distributed (%s)", reason)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=initialization_timeout,
        )
    except (RuntimeError, ValueError, TypeError) as e:
        raise DistributedInitError(
            f"jax.distributed.initialize failed ({reason}): {e}. It must be called before any "
            "other JAX use; outside a detected cluster set JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID, or use mesh.distributed=off."
        ) from e
    logger.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def is_main_process() -> bool:
    """True on the one process (index 0) that writes logs and prints progress."""
    return jax.process_index() == 0


class PreemptionWatcher:
    """Says when to save and stop: after SIGTERM (the TPU preemption notice) or Ctrl-C.

    Call `should_stop(step)` on every process at every step, with the same step numbers
    everywhere; when it returns True, save a checkpoint of that step and exit. Signals set
    a local flag; every `sync_every` steps the processes OR their flags with one tiny
    all-gather, so all of them stop at the same step even when only one host got the
    signal. Pick `sync_every` so that it takes a few seconds at most (the notice comes
    about 30 s before the VM goes away); the loop's logging interval is a good choice, as
    the loop waits for the devices there anyway. Create it in the main thread.
    A second Ctrl-C raises KeyboardInterrupt at once, for when saving itself hangs.

    jax's own preemption service (`multihost_utils.reached_preemption_sync_point`) is not
    used: orbax calls it from its background finalize thread with older step numbers,
    which can move the agreed step into the past; then no host ever stops.
    """

    def __init__(self, sync_every: int = 1) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.sync_every = sync_every
        self._stop = False
        # Replaces jax's C-level SIGTERM notifier in distributed runs (see above).
        self._previous = {
            signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_sigterm),
            signal.SIGINT: signal.signal(signal.SIGINT, self._on_sigint),
        }

    def _on_sigterm(self, signum: int, frame: object) -> None:
        logger.warning("SIGTERM received: saving and stopping at the next agreed step")
        self._stop = True

    def _on_sigint(self, signum: int, frame: object) -> None:
        logger.warning("Ctrl-C: saving and stopping at the next agreed step; again to abort")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self._stop = True

    def should_stop(self, step: int) -> bool:
        """True when every process should save this step and exit (same answer on all)."""
        if step % self.sync_every != 0:
            return False
        if jax.process_count() == 1:
            return self._stop
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([self._stop], dtype=np.int32))
        return bool(np.any(flags))

    def close(self) -> None:
        """Puts back the signal handlers that were there before."""
        for signum, handler in self._previous.items():
            # None: the old handler was installed by C code (jax's notifier), not Python.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __enter__(self) -> PreemptionWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
