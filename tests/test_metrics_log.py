"""MetricsLogger: JSON lines, TensorBoard scalars, progress line, resume and main-process rules."""

import json
import math
import struct
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from process_testing import process_env
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from debertina_jax.runtime.metrics_log import MetricsLogger, read_metrics


def tensorboard_events(workdir):
    """All events of the TFRecord-framed event files, in order, read without TensorFlow and
    checked with tensorboardX's own protobufs and CRC: each file starts with its version."""
    events = []
    for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos, first = 0, True
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            payload = data[pos + 12 : pos + 12 + length]
            assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == masked_crc32c(header)
            crc = data[pos + 12 + length : pos + 16 + length]
            assert struct.unpack("<I", crc)[0] == masked_crc32c(payload), path
            event = event_pb2.Event.FromString(payload)
            if first:
                assert event.file_version == "brain.Event:2" and event.wall_time > 0, event
            else:
                events.append(event)
            pos, first = pos + 16 + length, False
    return events


def tensorboard_scalars(workdir):
    """{(tag, step): value}; later files win, as in TensorBoard after a purge."""
    return {
        (value.tag, event.step): value.simple_value
        for event in tensorboard_events(workdir)
        for value in event.summary.value
    }


def test_rows_tensorboard_and_progress_line(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=100, is_main_process=True) as log:
        train = {"loss": jnp.float32(2.5), "mlm_accuracy": np.float64(0.25), "skipped": 1}
        log.update(10, {**train, "tokens_per_second": 12345.6, "grad_norm": jnp.nan})
        log.log_eval(10, {"loss": 3.0, "rtd_accuracy": jnp.array([0.75])})
        log.update(20, {"loss": 2.0, "tokens_per_second": 2e4})

    rows = read_metrics(tmp_path)
    assert [(r["step"], r["split"]) for r in rows] == [(10, "train"), (10, "eval"), (20, "train")]
    first = rows[0]
    assert first["loss"] == 2.5 and first["mlm_accuracy"] == 0.25 and first["skipped"] == 1
    assert first["grad_norm"] is None  # non-finite: null, so strict JSON readers work
    assert math.isfinite(first["time"])
    assert read_metrics(tmp_path, split="eval") == [rows[1]]
    assert rows[1]["rtd_accuracy"] == 0.75

    scalars = tensorboard_scalars(tmp_path)
    assert scalars[("train/loss", 10)] == 2.5 and scalars[("train/loss", 20)] == 2.0
    assert scalars[("eval/rtd_accuracy", 10)] == 0.75
    assert ("train/grad_norm", 10) not in scalars

    captured = capsys.readouterr()
    assert "20/100" in captured.err and "loss=2.0000" in captured.err
    assert "tok/s=20,000" in captured.err
    assert "eval step 10: loss=3 rtd_accuracy=0.75" in captured.out


def test_resume_drops_rows_written_after_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, total_steps=50, is_main_process=True, progress=False) as log:
        for step in (10, 20, 30):
            log.update(step, {"loss": float(step)})
            if step == 20:
                log.log_eval(step, {"loss": 1.0})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 40, "split": "tr')  # the crash hit mid-row

    # Read before the restart: the cut-off row is skipped.
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 20, 30]
    # The run restarts from its checkpoint at step 20 and logs steps 30, 40 again.
    with MetricsLogger(
        tmp_path, total_steps=50, start_step=20, is_main_process=True, progress=False
    ) as log:
        log.update(30, {"loss": 0.3})
        log.update(40, {"loss": 0.4})
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["split"]) for r in rows] == [
        (10, "train"),
        (20, "train"),
        (20, "eval"),
        (30, "train"),
        (40, "train"),
    ]
    assert rows[3]["loss"] == 0.3
    assert tensorboard_scalars(tmp_path)[("train/loss", 30)] == pytest.approx(0.3)
    # TensorBoard is told to forget the old run's events from step 21 on.
    purges = [
        e.step
        for e in tensorboard_events(tmp_path)
        if e.session_log.status == event_pb2.SessionLog.START
    ]
    assert 21 in purges


def test_only_the_main_process_writes(tmp_path):
    with MetricsLogger(tmp_path / "run", total_steps=10, is_main_process=False) as log:
        log.update(1, {"loss": 1.0})
        log.log_eval(1, {"loss": 1.0})
    assert not (tmp_path / "run").exists()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_metrics(tmp_path / "run")


def test_bad_values_and_corrupt_file(tmp_path):
    with MetricsLogger(tmp_path, total_steps=10, is_main_process=True, progress=False) as log:
        with pytest.raises(ValueError, match="'note' must be a single number"):
            log.update(1, {"note": "hello"})
        with pytest.raises(ValueError, match="'loss' must be a single number"):
            log.update(1, {"loss": np.ones(3)})
        with pytest.raises(ValueError, match="'step' is reserved"):
            log.update(1, {"step": 3})
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(tmp_path)
    assert json.loads(path.read_text().splitlines()[0]) == {"step": 1}


def test_bucket_workdir_rewrites_one_file_per_flush(gcs_bucket, tmp_path):
    from debertina_jax import storage

    workdir = f"{gcs_bucket}/run"
    with MetricsLogger(workdir, total_steps=30, is_main_process=True, progress=False,
                       flush_seconds=3600) as log:  # fmt: skip
        log.update(1, {"loss": 3.0})
        assert not storage.exists(f"{workdir}/metrics.jsonl")  # waits for flush_seconds
        log.update(2, {"loss": 2.5})
        log.flush()  # what the loop does before a checkpoint
        assert [r["step"] for r in read_metrics(workdir)] == [1, 2]
        log.log_eval(2, {"loss": 2.7})  # evaluations are uploaded at once
        assert [r["split"] for r in read_metrics(workdir)] == ["train", "train", "eval"]
        log.update(3, {"loss": 2.0})
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 2, 3]  # closing flushes

    # A resume from step 2 drops the rows a killed run logged after its checkpoint.
    with MetricsLogger(workdir, total_steps=30, start_step=2, is_main_process=True,
                       progress=False) as log:  # fmt: skip
        log.update(3, {"loss": 1.5})
    rows = read_metrics(workdir, split="train")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 3.0), (2, 2.5), (3, 1.5)]

    local = tmp_path / "copy"
    storage.copy_tree(workdir, str(local))
    scalars = tensorboard_scalars(local)  # both runs' event files, the purge applied by order
    assert scalars[("train/loss", 3)] == 1.5
    assert scalars[("eval/loss", 2)] == pytest.approx(2.7)


def test_writing_tensorboard_events_loads_no_torch():
    # tensorboardX imports torch when it is installed: 2.5 s more in every training process.
    code = (
        "import sys, tempfile\n"
        "from debertina_jax.runtime.tensorboard_events import EventFile\n"
        "EventFile(tempfile.mkdtemp()).add_scalar('train/loss', 1.0, 1)\n"
        "print(sorted({'torch', 'tensorboardX'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=process_env(1), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
