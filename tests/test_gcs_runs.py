"""Runs whose workdir and data live in a bucket: the GCS emulator (tests/gcs_emulator.py).

One bucket for the module: an uninterrupted reference run, which prepares the data into the
bucket (tokenizer and shards, read by every later run through its own local copy); a simulated
pod (2 processes x 1 CPU device, each with only its own private local directories), both killed
with SIGKILL after a checkpoint and started again, must log the same losses as one process on 2
devices, read back from the bucket; an export from the bucket, verified, loads in
transformers.

Two devices and one layer: what is tested is the storage, not the sharding (test_distributed.py
and the tiny run do that), and each of these processes compiles on the 2 shared cores.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from deberta_testing import REPO, SMALL_RUN, TINY_YAML
from process_testing import compilation_cache_env, process_env

from debertina_jax import storage
from debertina_jax.runtime.metrics_log import read_metrics

# They train runs: scripts/test.sh starts them first (tests/conftest.py).
pytestmark = pytest.mark.slow

STEPS = 8
RUN = SMALL_RUN + [
    "model.num_hidden_layers=1",
    "generator.num_hidden_layers=1",
    "data.prepare_workers=1",
    f"train.steps={STEPS}",
    "train.log_every_steps=1",
    "train.eval_every_steps=1000",
    f"checkpoint.every_steps={STEPS}",  # the runs that are not killed save only their last
    "mesh.data=2",
    # The PRNG that is not resumed elsewhere (threefry: test_pretrain.py, rbg: test_phases.py).
    "train.prng_impl=unsafe_rbg",
]
KILLED_AFTER = 4  # the checkpoint the killed run has written when it is killed
IN_THIS_PROCESS = RUN + ["mesh.data=-1"]  # the 8 devices of the test process (conftest.py)
DEVICES = 2


def _env(private: Path, devices: int = DEVICES, **extra: str) -> dict[str, str]:
    """A process's environment with nothing local shared: its own cache, temp and XLA cache."""
    for name in ("cache", "tmp", "xla"):
        (private / name).mkdir(parents=True, exist_ok=True)
    return process_env(
        devices,
        DEBERTINA_CACHE=str(private / "cache"),
        TMPDIR=str(private / "tmp"),
        **compilation_cache_env(private / "xla"),
        **extra,
    )


def _arguments(workdir: str, overrides: list[str], *extra: str) -> list[str]:
    """run_pretrain.py's arguments (also what tests/mp_worker.py's pause-at passes on)."""
    return ["--config", str(TINY_YAML), "--workdir", workdir, *extra, *overrides]


def _command(workdir: str, overrides: list[str], *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "run_pretrain.py"), *_arguments(workdir, overrides, *extra)]


def _run(workdir: str, overrides: list[str], env: dict[str, str], *extra: str) -> str:
    """The run's output and log."""
    done = subprocess.run(_command(workdir, overrides, *extra), env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _losses(workdir: str) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(workdir, split="train")}


@pytest.fixture(scope="module")
def bucket_runs(gcs_emulator, tmp_path_factory):
    """(bucket, overrides with the bucket's data, the reference run's losses, a private dir
    whose XLA cache the single-process runs share)."""
    bucket = gcs_emulator.create_bucket()
    overrides = RUN + [f"data.tokenizer_dir={bucket}/tokenizer", f"data.prepared_dir={bucket}/data"]
    private = tmp_path_factory.mktemp("one-host")
    _run(f"{bucket}/reference", overrides, _env(private))
    assert storage.is_file(f"{bucket}/data/metadata.json")
    reference = _losses(f"{bucket}/reference")
    assert sorted(reference) == list(range(1, STEPS + 1))
    return bucket, overrides, reference, private


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_pod(
    workdir: str, overrides: list[str], hosts: Path, *pause: str
) -> list[subprocess.Popen]:
    """The 2 processes of a simulated pod, each with only its own private directories under
    `hosts`; `pause`: tests/mp_worker.py's "pause-at STEP MARKER" before the run's arguments."""
    pod = {"JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}", "JAX_NUM_PROCESSES": "2"}
    command = _command(workdir, overrides)
    if pause:
        command = [sys.executable, str(REPO / "tests" / "mp_worker.py"), "pause-at", *pause,
                   *_arguments(workdir, overrides)]  # fmt: skip
    return [
        subprocess.Popen(
            command, env=_env(hosts / f"host{i}", DEVICES // 2, **pod, JAX_PROCESS_ID=str(i)),
            cwd=hosts, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for i in range(2)
    ]


def test_two_processes_sharing_only_the_bucket_killed_and_resumed_log_the_same_losses(
    bucket_runs, tmp_path
):
    """kill -9 of both processes of a pod once checkpoint 4 is in the bucket, then the same
    command on both: they resume from step 4, keep the rows before it, and log the losses of
    one process on 2 devices."""
    bucket, overrides, reference, _ = bucket_runs
    workdir = f"{bucket}/pod"
    overrides = overrides + [f"checkpoint.every_steps={KILLED_AFTER}"]
    marker, pause_at = tmp_path / "paused", KILLED_AFTER + 2
    processes = _start_pod(workdir, overrides, tmp_path, str(pause_at), str(marker))
    try:
        deadline = time.monotonic() + 300
        while not (
            all(Path(f"{marker}.{i}").exists() for i in range(2))
            and storage.exists(f"{workdir}/checkpoints/{KILLED_AFTER}/commit_success.txt")
        ):
            for p in processes:
                assert p.poll() is None, p.stderr.read()[-3000:]
            assert time.monotonic() < deadline, f"no pause before step {pause_at} in time"
            time.sleep(0.1)
        for p in processes:
            p.send_signal(signal.SIGKILL)
        for p in processes:
            p.communicate(timeout=60)
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [-signal.SIGKILL] * 2
    assert storage.exists(f"{workdir}/run.lock")  # a killed run cannot release its lock
    # The rows up to the checkpoint are in the bucket (later ones may not be: flushed later).
    assert set(range(1, KILLED_AFTER + 1)) <= set(_losses(workdir)) < set(range(1, pause_at + 1))
    kept = [r for r in read_metrics(workdir) if r["step"] <= KILLED_AFTER]

    processes = _start_pod(workdir, overrides, tmp_path)  # the lock is stale: its process is gone
    try:
        outputs = [p.communicate(timeout=500) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, (_, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert f"resumed from the checkpoint of step {KILLED_AFTER}" in err, err[-3000:]
    assert f"training finished at step {STEPS}" in outputs[0][0]
    assert not storage.exists(f"{workdir}/run.lock")
    events = storage.glob(f"{workdir}/tensorboard/events.out.tfevents.*")
    assert len(events) == 2  # one per start of process 0; TensorBoard reads them in the bucket
    assert [r for r in read_metrics(workdir) if r["step"] <= KILLED_AFTER] == kept
    got = _losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))  # no step logged twice or missing
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)],
                               [reference[s] for s in range(1, STEPS + 1)], rtol=2e-5)  # fmt: skip
    # Each host read the bucket's shards through its own copy, and saved its own data state.
    for i in range(2):
        assert any((tmp_path / f"host{i}" / "cache" / "prepared").iterdir())
        state = f"{workdir}/checkpoints/{STEPS}/data/process_{i}-of-2.json"
        assert json.loads(storage.read_text(state))

    # The checkpoint the two processes wrote loads in one process, from the bucket.
    from debertina_jax.export.checkpoint import load_checkpoint

    loaded = load_checkpoint(workdir)
    assert loaded.step == STEPS
    ids = np.array([[1, 20, 30, 40, 2, 0]], np.int32)
    logits = loaded.discriminator(ids, attention_mask=(ids != 0).astype(np.int32))
    assert logits.shape == (1, 6) and np.isfinite(np.asarray(logits)).all()


def test_export_from_the_bucket_loads_in_transformers(bucket_runs, tmp_path):
    from debertina_jax.export.export import export

    bucket = bucket_runs[0]
    output = f"{bucket}/export"
    # In this process (JAX and the emulator's address are here already): read from the bucket,
    # verified locally, uploaded.
    result = export(f"{bucket}/reference", output)
    assert result.step == STEPS and result.output == output
    assert len(result.checks) == 10 and all(c.passed for c in result.checks)
    local = tmp_path / "export"
    storage.copy_tree(output, str(local))

    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer, DebertaV2Model

    tokenizer = AutoTokenizer.from_pretrained(local / "discriminator")
    model = DebertaV2Model.from_pretrained(local / "discriminator")
    batch = tokenizer(["O gato dorme no sofá."], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape[-1] == 64 and torch.isfinite(hidden).all()
    assert AutoModelForMaskedLM.from_pretrained(local / "generator") is not None


@pytest.mark.parametrize(
    "workdir, extra, status, message",
    [
        ("gs://no-such-bucket/run", [], 1, "bucket gs://no-such-bucket does not exist"),
        ("gs://denied-bucket/run", [], 1, "permission denied for gs://denied-bucket"),
        ("gs:/bucket/run", [], 2, "did you mean gs://bucket/run"),
        ("{bucket}/run", ["data.prepared_dir=gs://Bad_Bucket/data"], 1,
         "data.prepared_dir 'gs://Bad_Bucket/data': 'Bad_Bucket' is not a valid bucket name"),
        ("{bucket}/run", ["data.train_files=[gs://no-such-bucket/c4/*.json.gz]"], 1,
         "bucket gs://no-such-bucket does not exist"),
    ],
)  # fmt: skip
def test_bad_storage_input_is_refused_before_anything_compiles(
    gcs_bucket, workdir, extra, status, message, capsys
):
    from debertina_jax.cli.pretrain import main

    workdir = workdir.format(bucket=gcs_bucket)
    code = main(["--config", str(TINY_YAML), "--workdir", workdir, *IN_THIS_PROCESS, *extra])
    err = capsys.readouterr().err
    assert code == status and message in err, err
    assert "Traceback" not in err
    assert not storage.walk_files(gcs_bucket)  # nothing was written


def test_stage_outputs_go_to_the_bucket(gcs_bucket, capsys):
    from debertina_jax.cli.pretrain import main

    workdir = f"{gcs_bucket}/stage"
    arguments = ["--config", str(TINY_YAML), "--workdir", workdir, "--stage", "tokenizer"]
    assert main(arguments + IN_THIS_PROCESS) == 0
    assert "tokenizer ready in gs://" in capsys.readouterr().out
    assert storage.is_file(f"{workdir}/tokenizer/tokenizer.json")
    assert storage.is_file(f"{workdir}/config.yaml")
    assert not storage.exists(f"{workdir}/run.lock")
