"""The whole pretraining run, as users start it: run_pretrain.py in a subprocess.

Covers stopping by SIGTERM, Ctrl-C and SIGKILL and resuming (from the step each stop left, with
the rows logged before it untouched and the losses of an uninterrupted run), and config errors.
Two processes killed together and resumed: tests/test_gcs_runs.py (a pod whose hosts share only
a bucket). What the runs learn: tests/test_run_cli.py.

Kept cheap: a 1-layer discriminator and generator, 8 steps, one device, the session's prepared
data and compilation cache (conftest), and one reference run shared by the tests. The signals
are sent while the run waits before a chosen step (tests/mp_worker.py pause-at), so they land at
a known step however fast the machine.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from deberta_testing import REPO, SHORT_RUN, TINY_YAML
from process_testing import process_env

from debertina_jax.runtime.metrics_log import read_metrics

WORKER = REPO / "tests" / "mp_worker.py"
STEPS = 8  # SHORT_RUN's train.steps


@pytest.fixture(scope="module")
def overrides(small_run_overrides) -> list[str]:
    return small_run_overrides + SHORT_RUN


def _env(devices: int, cache: dict[str, str], **extra: str) -> dict[str, str]:
    """`cache`: conftest's compile_cache_env, so that runs of the same program compile once."""
    return process_env(devices, **cache, **extra)


def _arguments(workdir: Path, overrides: list[str], config: Path | None = TINY_YAML) -> list[str]:
    """run_pretrain.py's arguments; config=None leaves --config out (a resume)."""
    given = [] if config is None else ["--config", str(config)]
    return [*given, "--workdir", str(workdir), *overrides]


def _run(
    arguments: list[str], cache: dict[str, str], devices: int = 1
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(REPO / "run_pretrain.py"), *arguments], env=_env(devices, cache),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _start_paused(
    arguments: list[str], step: int, marker: Path, env: dict[str, str]
) -> subprocess.Popen:
    """run_pretrain.py with `arguments`, waiting before train step `step` (mp_worker.py)."""
    return subprocess.Popen(
        [sys.executable, str(WORKER), "pause-at", str(step), str(marker), *arguments], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for(predicate, processes: list[subprocess.Popen], what: str, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in processes:
            if p.poll() is not None:
                for q in processes:
                    q.kill()
                raise AssertionError(f"run ended before {what}: {p.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            for p in processes:
                p.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _rows(workdir: Path) -> dict[int, dict[str, Any]]:
    """The training rows of metrics.jsonl by step (with their timestamps)."""
    rows = read_metrics(workdir, split="train")
    steps = [row["step"] for row in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {row["step"]: row for row in rows}


def _losses(workdir: Path) -> dict[int, float]:
    return {step: row["loss"] for step, row in _rows(workdir).items()}


def _checkpoints(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _resumed_from(stderr: str) -> list[int]:
    """The steps of the "resumed from the checkpoint of step N" lines the run logged."""
    return [int(n) for n in re.findall(r"resumed from the checkpoint of step (\d+)", stderr)]


@pytest.fixture(scope="module")
def reference(short_run_dir) -> dict[int, float]:
    """The losses of an uninterrupted run (conftest.short_run_dir: these overrides)."""
    losses = _losses(short_run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _stop_with(
    signum: signal.Signals, step: int, arguments: list[str], tmp_path: Path, cache: dict[str, str]
) -> subprocess.CompletedProcess:
    """The run, sent `signum` while it waits before train step `step`, then let go on."""
    marker = tmp_path / f"paused-{signum.name}"
    process = _start_paused(arguments, step, marker, _env(1, cache))
    _wait_for(lambda: Path(f"{marker}.0").exists(), [process], f"step {step}")
    process.send_signal(signum)
    time.sleep(0.2)  # the handler has run in the waiting loop; nothing depends on when
    Path(f"{marker}.go").touch()
    out, err = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_sigterm_then_sigkill_then_resume_gives_the_same_losses(
    reference, overrides, compile_cache_env, tmp_path
):
    """SIGTERM, Ctrl-C, SIGKILL, then the command without --config: each run resumes from the
    checkpoint the previous one left, leaves the rows before it alone, and the losses are
    those of the uninterrupted run."""
    workdir = tmp_path / "run"
    arguments = _arguments(workdir, overrides)

    # SIGTERM (a TPU preemption notice) before step 3: step 3 is trained and saved, exit 0.
    done = _stop_with(signal.SIGTERM, 3, arguments, tmp_path, compile_cache_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training stopped early (resume with the same command) at step 3" in done.stdout
    assert _resumed_from(done.stderr) == []
    assert _checkpoints(workdir) == [2, 3] and sorted(_rows(workdir)) == [1, 2, 3]
    after_sigterm = _rows(workdir)

    # Ctrl-C before step 5 of the same command: resumes from 3, saves 5 and exits 0.
    done = _stop_with(signal.SIGINT, 5, arguments, tmp_path, compile_cache_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Ctrl-C: saving and stopping" in done.stderr
    assert "training stopped early (resume with the same command) at step 5" in done.stdout
    assert _resumed_from(done.stderr) == [3], done.stderr[-3000:]
    assert _checkpoints(workdir) == [2, 3, 4, 5] and sorted(_rows(workdir)) == [1, 2, 3, 4, 5]
    after_ctrl_c = _rows(workdir)

    # SIGKILL (no warning at all) before step 8, once checkpoint 6 is committed: row 7 was
    # logged after the last checkpoint.
    marker = tmp_path / "paused-SIGKILL"
    process = _start_paused(arguments, 8, marker, _env(1, compile_cache_env))
    _wait_for(lambda: Path(f"{marker}.0").exists() and 6 in _checkpoints(workdir), [process],
              "step 8 and checkpoint 6")  # fmt: skip
    process.send_signal(signal.SIGKILL)
    _, err = process.communicate(timeout=60)
    killed_at = time.time()
    assert process.returncode == -signal.SIGKILL
    assert _resumed_from(err) == [5], err[-3000:]
    assert sorted(_rows(workdir)) == list(range(1, 8))
    before_kill = _rows(workdir)

    # The command again, without --config (the workdir's config.yaml holds the overrides).
    done = _run(_arguments(workdir, [], config=None), compile_cache_env)
    assert _resumed_from(done.stderr) == [6], done.stderr[-3000:]
    rows = _rows(workdir)
    assert sorted(rows) == list(range(1, STEPS + 1))  # no step logged twice or missing
    # Each resume left the rows up to its checkpoint as they were, timestamps included...
    for earlier, last in ((after_sigterm, 3), (after_ctrl_c, 5), (before_kill, 6)):
        assert {s: rows[s] for s in range(1, last + 1)} == {
            s: earlier[s] for s in range(1, last + 1)
        }, f"rows up to step {last} were rewritten"
    # ...and trained again what came after it: row 7 is the resumed run's.
    assert rows[7]["time"] > killed_at > before_kill[7]["time"]
    for step in range(1, STEPS + 1):
        assert rows[step]["loss"] == reference[step], f"step {step}"


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
        [sys.executable, str(REPO / "run_pretrain.py"),
         *_arguments(tmp_path / "run", [override])],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert message in done.stderr
    assert not (tmp_path / "run").exists()
