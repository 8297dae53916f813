"""Checkpointer failures: a failed save is one clear error, a damaged checkpoint is skipped
(and kept), a checkpoint of another structure is refused. The runs themselves: test_reliability.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from debertina_jax.runtime.checkpointing import (
    Checkpointer,
    CheckpointRestoreError,
    CheckpointSaveError,
    CheckpointStructureError,
    _OrbaxErrors,
)


def _state(scale: float = 1.0) -> dict:
    # Arrays of 1.2 MB: larger than the file size limit below.
    return {f"w{i}": jnp.arange(300_000, dtype=jnp.float32) * (i + scale) for i in range(3)}


def _abstract(state: dict) -> dict:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)  # noqa: E501


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writing past `limit` bytes into a file fails with EFBIG, as a full disk fails with
    ENOSPC (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _steps_on_disk(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def _save(checkpointer: Checkpointer, step: int, state: dict) -> None:
    checkpointer.save(step, state, {"step": step}, {"config": {}}, force=True)


def test_a_failed_background_save_is_one_error_naming_the_last_good_checkpoint(tmp_path, capfd):
    checkpointer = Checkpointer(tmp_path, every_steps=1, keep=1)
    _save(checkpointer, 1, _state())
    checkpointer.wait()
    with file_size_limit(200_000):
        _save(checkpointer, 2, _state(2.0))  # returns at once; the writing fails behind it
        deadline = time.monotonic() + 60
        with pytest.raises(CheckpointSaveError) as failed:
            while time.monotonic() < deadline:
                checkpointer.check()  # what the training loop calls every step
                time.sleep(0.05)
    checkpointer.close()  # quiet: the failure was reported
    directory = tmp_path / "checkpoints"
    assert str(failed.value) == (
        f"could not write the checkpoint of step 2 to {directory / '2'}: File too large "
        f"[errno 27]. The last good checkpoint is step 1 ({directory / '1'}): fix the cause "
        "(e.g. free disk space) and run the same command to resume from it."
    )
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err
    # keep=1 did not delete the good checkpoint for the failed one.
    with Checkpointer(tmp_path, every_steps=1, keep=1) as again:
        assert again.all_steps() == [1]
        restored = again.restore(1, _abstract(_state()))
        np.testing.assert_array_equal(restored.state["w2"], _state()["w2"])


def _never_retrieved(error: BaseException) -> logging.LogRecord:
    # What asyncio logs when a future with an exception is collected unawaited; an error
    # TensorStore raised in native code has no Python frame, so nothing in it names orbax.
    return logging.LogRecord(
        "asyncio", logging.ERROR, "base_events.py", 1, "Future exception was never retrieved",
        None, (type(error), error, None),
    )


def test_asyncio_reports_of_abandoned_futures_are_aftermath_only_after_a_failure():
    # CI once printed pages of these after the one-line error of a failed save (the collector
    # runs when it likes): a failure's aftermath is dropped, anything else still shown.
    errors = _OrbaxErrors()
    record = _never_retrieved(ValueError('OUT_OF_RANGE: Error writing "w0" in OCDBT database'))
    assert errors.filter(record)  # no save in flight, none failed: someone else's error
    errors.active = 1
    assert not errors.filter(record) and errors.held == [record]  # held while a save writes
    errors.active, errors.held, errors.failed = 0, [], True
    assert not errors.filter(record)
    other = logging.LogRecord("asyncio", logging.ERROR, "x.py", 1, "Unclosed client", None, None)
    assert errors.filter(other)


def test_a_failed_save_without_an_earlier_checkpoint(tmp_path):
    checkpointer = Checkpointer(tmp_path, every_steps=1, keep=2, async_save=False)
    with file_size_limit(200_000), pytest.raises(CheckpointSaveError) as failed:
        _save(checkpointer, 5, _state())
    checkpointer.close()
    assert "checkpoint of step 5" in str(failed.value)
    assert str(failed.value).endswith(
        "There is no earlier checkpoint: the same command starts over."
    )


def _make_run(workdir: Path, steps=(1, 2, 3), keep: int = 5) -> dict:
    state = _state()
    with Checkpointer(workdir, every_steps=1, keep=keep) as checkpointer:
        for step in steps:
            _save(checkpointer, step, state)
    return state


def _damage_arrays(step_dir: Path) -> None:
    largest = max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(1000)


def test_a_damaged_latest_checkpoint_is_skipped_and_kept(tmp_path, caplog):
    state = _make_run(tmp_path)
    _damage_arrays(tmp_path / "checkpoints" / "3")
    checkpointer = Checkpointer(tmp_path, every_steps=1, keep=3)
    with caplog.at_level(logging.WARNING, logger="debertina_jax"):
        restored, step = checkpointer.restore_newest_readable(_abstract(state))
    assert step == 2 and restored.data_state == {"step": 2}
    kept = tmp_path / "checkpoints" / "3.unreadable"
    assert _steps_on_disk(tmp_path) == ["1", "2", "3.unreadable"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"skipped checkpoint {tmp_path / 'checkpoints' / '3'}, which ")
    assert f"resuming from step 2 instead. It is kept as {kept}; rename it back" in warning
    # The resumed run saves step 3 again and goes on; `keep` never touches the kept one.
    for step in (3, 4, 5):
        _save(checkpointer, step, state)
    checkpointer.close()
    assert _steps_on_disk(tmp_path) == ["3", "3.unreadable", "4", "5"]
    with Checkpointer(tmp_path, every_steps=1, keep=3) as again:  # start-up cleanup too
        assert again.all_steps() == [3, 4, 5]
    assert kept.is_dir()


def test_damaged_metadata_is_skipped_too(tmp_path):
    state = _make_run(tmp_path, steps=(1, 2))
    metadata = tmp_path / "checkpoints" / "2" / "state" / "_METADATA"
    metadata.write_bytes(metadata.read_bytes()[:50])
    with Checkpointer(tmp_path, every_steps=1, keep=3) as checkpointer:
        _, step = checkpointer.restore_newest_readable(_abstract(state))
    assert step == 1 and _steps_on_disk(tmp_path) == ["1", "2.unreadable"]


def test_when_nothing_restores_nothing_is_moved(tmp_path):
    state = _make_run(tmp_path, steps=(1, 2))
    for step in ("1", "2"):
        _damage_arrays(tmp_path / "checkpoints" / step)
    with Checkpointer(tmp_path, every_steps=1, keep=3) as checkpointer:
        nothing = r"no checkpoint in .* can be restored \(step 2: .*; step 1: "
        with pytest.raises(CheckpointRestoreError, match=nothing):
            checkpointer.restore_newest_readable(_abstract(state))
    assert _steps_on_disk(tmp_path) == ["1", "2"]


def test_another_structure_is_refused_not_skipped(tmp_path):
    _make_run(tmp_path, steps=(1, 2))
    other = {f"w{i}": jnp.zeros((1000,), jnp.float32) for i in range(3)}
    with Checkpointer(tmp_path, every_steps=1, keep=3) as checkpointer:
        with pytest.raises(CheckpointStructureError) as refused:
            checkpointer.restore_newest_readable(_abstract(other))
    assert "w0 is (300000,) on disk, (1000,) here" in str(refused.value)
    assert "WORKDIR/config.yaml" in str(refused.value)
    assert _steps_on_disk(tmp_path) == ["1", "2"]


READ = """
import sys
from debertina_jax.runtime.checkpointing import CheckpointRestoreError, restore_checkpoint
try:
    restore_checkpoint(sys.argv[1])
except CheckpointRestoreError as e:
    print(e)
"""


def test_reading_a_damaged_checkpoint_gives_a_short_error(tmp_path):
    _make_run(tmp_path, steps=(1, 2))
    _damage_arrays(tmp_path / "checkpoints" / "2")
    # In a fresh process, as load_checkpoint and the export read it: what else gets printed
    # (orbax's abandoned coroutines, TensorStore's callbacks) shows on stderr.
    done = subprocess.run(
        [sys.executable, "-c", READ, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    message = done.stdout.strip()
    assert message.startswith(f"cannot restore checkpoint {tmp_path / 'checkpoints' / '2'} ")
    assert "Other checkpoints: steps [1] (choose one with step=N, --step N)" in message
    assert len(message) < 600 and "TensorStore(" not in message
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
