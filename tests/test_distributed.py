"""Multi-host start-up and preemption: env detection, signals, and a real 2-process run."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from process_testing import REPO, xla_flags

from debertina_jax.runtime import distributed as dist

WORKER = Path(__file__).with_name("mp_worker.py")


def run_workers(args_per_process, env_per_process, timeout=60):
    """Runs the worker processes together; on any failure kills all and shows their output."""
    procs = []
    for args, extra_env in zip(args_per_process, env_per_process, strict=True):
        env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **extra_env}
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), *args],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outputs = [p.communicate() for p in procs]
        pytest.fail("worker processes timed out:\n" + _describe(procs, outputs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return procs, outputs


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _describe(procs, outputs):
    return "\n".join(
        f"--- process {i} (exit {p.returncode})\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
        for i, (p, (out, err)) in enumerate(zip(procs, outputs, strict=True))
    )


def _result(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :]) if lines else None


# --- environment detection (pure) ---


@pytest.mark.parametrize(
    "env, chips, expected",
    [
        ({}, 0, None),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, 0, "JAX_COORDINATOR_ADDRESS"),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, 0, "SLURM"),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, 0, None),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, 0, "Open MPI"),
        ({"MEGASCALE_COORDINATOR_ADDRESS": "h0"}, 0, "multi-slice"),
        ({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}, 0, "4 hosts"),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, 0, None),
        ({}, 4, "Cloud TPU VM"),
    ],
)
def test_detect_cluster(env, chips, expected):
    found = dist.detect_cluster(env, tpu_chips=chips)
    if expected is None:
        assert found is None
    else:
        assert expected in found


def test_detect_cluster_bad_number():
    with pytest.raises(dist.DistributedInitError, match="SLURM_NTASKS"):
        dist.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "many"}, tpu_chips=0)


def test_maybe_initialize_single_process(monkeypatch):
    for name in (
        "JAX_COORDINATOR_ADDRESS",
        "SLURM_JOB_ID",
        "OMPI_COMM_WORLD_SIZE",
        "MEGASCALE_COORDINATOR_ADDRESS",
        "TPU_WORKER_HOSTNAMES",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dist, "_attached_tpu_chips", lambda: 0)
    assert dist.maybe_initialize("auto") is False
    assert dist.maybe_initialize("off") is False
    assert dist.is_main_process()
    with pytest.raises(ValueError, match="mesh.distributed"):
        dist.maybe_initialize("yes")


def test_initialize_after_backend_use_is_a_clear_error():
    import jax

    jax.devices()  # the backend now exists, too late to join a cluster
    with pytest.raises(dist.DistributedInitError, match="before any"):
        dist.maybe_initialize("on", "localhost:1", num_processes=2, process_id=0)
    assert not jax.distributed.is_initialized()


# --- preemption signals in one process ---


def test_sigterm_sets_stop_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with dist.PreemptionWatcher(sync_every=2) as watcher:
        assert not watcher.should_stop(2)
        os.kill(os.getpid(), signal.SIGTERM)
        assert not watcher.should_stop(3)  # only every sync_every steps
        assert watcher.should_stop(4)
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_ctrl_c_interrupts_at_once():
    with dist.PreemptionWatcher() as watcher:
        os.kill(os.getpid(), signal.SIGINT)
        assert watcher.should_stop(1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


# --- two real processes x 4 CPU devices, gloo collectives ---


def test_two_processes_collectives_checkpoint_and_preemption(tmp_path):
    address = f"localhost:{free_port()}"
    common = {"XLA_FLAGS": xla_flags(4)}
    envs = [
        {
            **common,
            "JAX_COORDINATOR_ADDRESS": address,
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(i),
        }
        for i in range(2)
    ]
    procs, outputs = run_workers([["distributed", str(tmp_path)]] * 2, envs)
    results = [_result(out) for out, _ in outputs]
    assert all(p.returncode == 0 for p in procs) and None not in results, _describe(procs, outputs)

    # Both hosts agreed on the preemption step and saved it.
    assert results[0]["stop_step"] == results[1]["stop_step"] == 8
    assert results[0]["steps"] == results[1]["steps"] == [2, 8]

    # This (single) process reads the 2-process checkpoint back onto its CPU.
    from debertina_jax.runtime.checkpointing import CheckpointRestoreError, restore_checkpoint

    restored = restore_checkpoint(tmp_path, step=2)
    assert restored.state["batch"].shape == (16, 3)
    assert float(restored.state["batch"].sum()) == pytest.approx(sum(range(48)))
    assert restored.meta["step"] == 2 and restored.data_state is None
    with pytest.raises(CheckpointRestoreError, match="different number of processes"):
        restore_checkpoint(tmp_path, step=2, restore_data=True)
