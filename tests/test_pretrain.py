"""The whole pretraining run, as users start it: run_pretrain.py in a subprocess.

Covers resuming after SIGTERM and SIGKILL (same losses as an uninterrupted run),
1 device vs 2 processes (same losses), learning, config errors, and load_checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from deberta_testing import REPO, TINY_YAML

from debertina_jax.config import load_config
from debertina_jax.runtime.metrics_log import read_metrics


@pytest.fixture(scope="session")
def data_overrides(small_run_overrides) -> list[str]:
    """Every run logs each step (the tests compare step by step) and evaluates only at its end."""
    return small_run_overrides + ["train.log_every_steps=1", "train.eval_every_steps=1000"]


def _command(workdir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "run_pretrain.py"), "--config", str(TINY_YAML),
            "--workdir", str(workdir), *overrides]  # fmt: skip


def _env(devices: int, cache: dict[str, str], **extra: str) -> dict[str, str]:
    """`cache`: conftest's compile_cache_env, so that runs of the same program compile once."""
    env = dict(os.environ, **cache)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def _run(
    workdir: Path, overrides: list[str], cache: dict[str, str], devices: int = 8
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        _command(workdir, overrides), env=_env(devices, cache), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _losses(workdir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(workdir, split="train")}


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"run ended early: {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference(data_overrides, compile_cache_env, tmp_path_factory) -> dict[int, float]:
    """The losses of an uninterrupted 40-step run on 8 devices."""
    workdir = tmp_path_factory.mktemp("reference")
    overrides = data_overrides + ["train.steps=40", "checkpoint.every_steps=10"]
    _run(workdir, overrides, compile_cache_env)
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, 41))
    return losses


def _start(workdir: Path, overrides: list[str], cache: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        _command(workdir, overrides), env=_env(8, cache), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _checkpoints(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_sigterm_then_sigkill_then_resume_gives_the_same_losses(
    reference, data_overrides, compile_cache_env, tmp_path
):
    overrides = data_overrides + ["train.steps=40", "checkpoint.every_steps=10"]

    # SIGTERM (a TPU preemption notice): save at the next step boundary and exit cleanly.
    process = _start(tmp_path, overrides, compile_cache_env)
    _wait_for(lambda: (tmp_path / "metrics.jsonl").is_file() and len(_losses(tmp_path)) >= 2,
              process)  # fmt: skip
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    assert "stopped early" in out
    stopped_at = _checkpoints(tmp_path)[-1]
    assert stopped_at == max(_losses(tmp_path)) < 40

    # SIGKILL (no warning at all) after the periodic checkpoint of step 20.
    process = _start(tmp_path, overrides, compile_cache_env)  # resumes from `stopped_at`
    _wait_for(lambda: 20 in _checkpoints(tmp_path), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert max(_losses(tmp_path)) < 40, "the run finished before it could be killed"

    _run(tmp_path, overrides, compile_cache_env)  # the same command again resumes from step 20
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, 41))  # no step logged twice or missing
    for step in range(1, 41):
        assert losses[step] == reference[step], f"step {step}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_same_losses_on_1_device_and_on_2_processes(data_overrides, compile_cache_env, tmp_path):
    overrides = data_overrides + ["train.steps=8", "checkpoint.every_steps=8"]
    _run(tmp_path / "one", overrides, compile_cache_env, devices=1)
    expected = [_losses(tmp_path / "one")[s] for s in range(1, 9)]

    # (Meshes of 8 devices in one process, data=8, fsdp=8 and 2x2x2, are compared with one
    # device in tests/test_train_step.py.)
    # A simulated pod: 2 processes x 4 CPU devices, gloo collectives, one shared workdir.
    port = _free_port()
    processes = [
        subprocess.Popen(
            _command(tmp_path / "pod", overrides),
            env=_env(
                4,
                compile_cache_env,
                JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=400) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, (_, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    got = [_losses(tmp_path / "pod")[s] for s in range(1, 9)]
    np.testing.assert_allclose(got, expected, rtol=2e-5, err_msg="2 processes")
    assert 8 in _checkpoints(tmp_path / "pod")

    # The checkpoint of the sharded two-process run loads on one CPU.
    from debertina_jax.export.checkpoint import load_checkpoint

    loaded = load_checkpoint(tmp_path / "pod")
    assert loaded.step == 8
    ids = np.array([[1, 20, 30, 40, 2, 0]], np.int32)
    logits = loaded.discriminator(ids, attention_mask=(ids != 0).astype(np.int32))
    assert logits.shape == (1, 6) and np.isfinite(np.asarray(logits)).all()
    assert loaded.generator(ids).shape == (1, 6, loaded.config.model.vocab_size)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown key train.stepz"),
        ("train.batch_size=big", "train.batch_size: expected an integer"),
        ("mesh.data", "expected section.key=value"),
    ],
)
def test_bad_overrides_fail_before_anything_starts(override, message, tmp_path):
    done = subprocess.run(
        _command(tmp_path / "run", [override]), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert not (tmp_path / "run").exists()


def test_learning_on_the_sample_corpus(data_overrides, compile_cache_env, tmp_path):
    """A few hundred steps of the tiny config on held-out text: the generator learns well past
    log(vocab), and the discriminator reaches the "everything is original" baseline.

    Beating that baseline needs the models to use context, which a model this small learns only
    after a plateau of several hundred steps (HF PyTorch's DebertaV2 shows the same plateau on
    this corpus); see the closing note of the pretraining issue for the measured curves.
    """
    steps = 250
    _run(tmp_path, data_overrides + [f"train.steps={steps}", "train.batch_size=16",
                                     "train.log_every_steps=50", "train.eval_every_steps=125",
                                     "train.eval_batches=2", "checkpoint.every_steps=1000",
                                     "optimizer.learning_rate=2e-3", "optimizer.warmup_steps=25"],
         compile_cache_env, devices=1)  # fmt: skip
    evals = read_metrics(tmp_path, split="eval")
    assert [row["step"] for row in evals] == [125, 250]
    last = evals[-1]
    vocab = load_config(TINY_YAML, data_overrides).data.vocab_size + 1
    assert last["mlm_loss"] < np.log(vocab) - 0.5, last
    assert last["mlm_accuracy"] > 0.03, last
    baseline = 1.0 - last["replaced_fraction"]
    assert last["rtd_accuracy"] >= baseline - 0.005, last
    # The RTD loss has at least reached the entropy of the replaced fraction (the prior).
    p = last["replaced_fraction"]
    assert last["rtd_loss"] <= -(p * np.log(p) + (1 - p) * np.log(1 - p)) + 0.02, last
