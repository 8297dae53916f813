"""Bad inputs and accidents, as a user meets them through run_pretrain.py: each ends in one
clear line and loses nothing (docs/reliability.md lists them and names these tests).

Kept fast: the session's tokenizer and data (conftest.small_run_overrides) and compilation cache
(compile_cache_env), a 1-layer model, few steps (deberta_testing.SHORT_RUN, the settings of
tests/test_pretrain.py's runs, so that both compile the same program once), --stage prepare
where no training is needed, and one short trained run reused by the checkpoint tests.
"""

from __future__ import annotations

import ast
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from deberta_testing import SHORT_RUN, SMALL_RUN, TINY_YAML
from process_testing import REPO, process_env
from test_workdir_lock import hold_lock

from debertina_jax.runtime.metrics_log import read_metrics


@pytest.fixture(scope="module")
def data_overrides(small_run_overrides) -> list[str]:
    """8 steps of a 1-layer model (checkpoints 2, 4, 6 and 8) on the session's prepared data."""
    return small_run_overrides + SHORT_RUN


def _run(
    workdir: Path,
    overrides: list[str],
    *args: str,
    cache: dict[str, str],
    devices: int = 8,
    file_size_limit: int | None = None,
) -> subprocess.CompletedProcess:
    """run_pretrain.py; the runs that train use 1 device, as tests/test_pretrain.py's do."""
    env = process_env(devices, **cache)

    def limit_file_size() -> None:  # a full disk, as far as files over the limit go
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    command = [sys.executable, str(REPO / "run_pretrain.py"), "--config", str(TINY_YAML),
               "--workdir", str(workdir), *args, *overrides]  # fmt: skip
    return subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=limit_file_size if file_size_limit else None,
    )


def _error_line(done: subprocess.CompletedProcess) -> str:
    """The run failed with exit status 1 and one "error:" line, without a traceback."""
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


def test_a_batch_that_does_not_fit_the_mesh_names_the_key(
    tmp_path, data_overrides, compile_cache_env
):
    done = _run(tmp_path / "run", data_overrides + ["train.batch_size=7"], cache=compile_cache_env)
    assert _error_line(done) == (
        "error: train.batch_size=7 does not fit the mesh (data=8, fsdp=1, tensor=1 on 8 "
        "devices): the batch is split over mesh.data (8) x mesh.fsdp (1) = 8 devices, so it "
        "must be a multiple of 8. Use train.batch_size=8, or change the mesh sizes"
    )
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_second_run_on_a_workdir_is_refused_and_a_killed_one_does_not_block(
    tmp_path, data_overrides, compile_cache_env
):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = hold_lock(workdir)  # a run in progress, as far as the lock goes
    try:
        prepare = ("--stage", "prepare")
        line = _error_line(_run(workdir, data_overrides, *prepare, cache=compile_cache_env))
        assert line.startswith(
            f"error: workdir {workdir} is in use by another run: pid {holder.pid} on host "
        )
        assert not (workdir / "config.yaml").exists()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        done = _run(workdir, data_overrides, *prepare, cache=compile_cache_env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "took over the stale lock" in done.stderr and "is gone" in done.stderr
        assert not (workdir / "run.lock").exists()  # released at the end
    finally:
        holder.kill()
        holder.wait()


def test_a_refused_resume_leaves_config_yaml_alone(tmp_path, data_overrides, compile_cache_env):
    workdir = tmp_path / "run"
    done = _run(workdir, data_overrides, "--stage", "prepare", cache=compile_cache_env)
    assert done.returncode == 0, done.stderr[-3000:]
    before = (workdir / "config.yaml").read_bytes()
    line = _error_line(
        _run(workdir, data_overrides + ["data.max_seq_length=128"], cache=compile_cache_env)
    )
    assert "max_seq_length" in line and "128" in line
    assert (workdir / "config.yaml").read_bytes() == before
    assert not (workdir / "run.lock").exists()


def test_a_bad_corpus_names_the_file_and_leaves_no_workdir(tmp_path, compile_cache_env):
    # (The empty corpus's message is tests/test_tokenizer.py::test_empty_corpus.)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "um documento"}\n{"text": "aberto\n', encoding="utf-8")
    overrides = [o for o in SMALL_RUN + SHORT_RUN if not o.startswith("data.")]
    overrides += ["data.max_seq_length=64", f"data.train_files={bad}"]
    line = _error_line(_run(tmp_path / "run", overrides, cache=compile_cache_env))
    assert line == (
        f"error: {bad}: invalid JSON at byte offset 25 (the line starting there): "
        "Invalid control character at byte offset 41"
    )
    assert not (tmp_path / "run").exists()  # not even a config.yaml


@pytest.fixture(scope="module")
def trained(short_run_dir) -> Path:
    """A run of data_overrides (conftest.short_run_dir): checkpoints 2, 4, 6 and 8; tests work
    on copies."""
    return short_run_dir


def _copy(trained: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    return workdir


def _losses(workdir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(workdir, split="train")}


def _damage(step_dir: Path) -> None:
    largest = max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(1000)


def test_a_damaged_latest_checkpoint_is_skipped_kept_and_the_run_resumes(
    trained, tmp_path, data_overrides, compile_cache_env
):
    workdir = _copy(trained, tmp_path)
    checkpoints = workdir / "checkpoints"
    _damage(checkpoints / "8")
    # The same command, as after a crash.
    done = _run(workdir, data_overrides, cache=compile_cache_env, devices=1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (warning,) = [line for line in done.stderr.splitlines() if "WARNING" in line]
    assert re.search(
        rf"WARNING skipped checkpoint {checkpoints / '8'}, which cannot be restored "
        r"\(OUT_OF_RANGE: .*\): resuming from step 6 instead\. It is kept as "
        rf"{checkpoints / '8.unreadable'}; rename it back to 8 to use it\.$",
        warning,
    ), warning
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4", "6", "8", "8.unreadable"]
    # Steps 7 and 8 were trained again from checkpoint 6, exactly as the first time.
    assert _losses(workdir) == _losses(trained)


def test_a_failed_save_stops_the_run_at_once_naming_the_last_good_checkpoint(
    trained, tmp_path, data_overrides, compile_cache_env
):
    workdir = _copy(trained, tmp_path)
    checkpoints = workdir / "checkpoints"
    for step in ("4", "6", "8"):  # back to a run that has saved only step 2
        shutil.rmtree(checkpoints / step)
    # Checkpoint files (~600 KB) no longer fit; the metrics, the config and the lock do.
    # No retries (checkpoint.save_retries, by default 2): the stop itself is what is checked
    # here; retrying is tests/test_gcs_checkpoints.py's.
    overrides = data_overrides + ["checkpoint.save_retries=0"]
    done = _run(workdir, overrides, cache=compile_cache_env, devices=1, file_size_limit=200_000)
    assert _error_line(done) == (
        f"error: could not write the checkpoint of step 4 to {checkpoints / '4'}: File too large "
        f"[errno 27]. The last good checkpoint is step 2 ({checkpoints / '2'}): fix the cause "
        "(e.g. free disk space) and run the same command to resume from it."
    )
    lines = [line for line in done.stderr.split("\n") if line.strip() and "%|" not in line]
    assert len(lines) <= 3, done.stderr  # no pages of orbax tracebacks
    assert max(_losses(workdir)) < 8  # it stopped, rather than training on unsaved
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["2"]
    assert not (workdir / "run.lock").exists()


def test_the_reliability_table_names_existing_tests():
    """docs/reliability.md's table and these tests stay in sync: every test a row names
    exists (and every test of this file has a row)."""
    text = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", text))
    assert named
    for path, name in named:
        tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
        functions = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in functions, f"docs/reliability.md names {path}::{name}, which is gone"
    mine = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    here = {n.name for n in mine.body if isinstance(n, ast.FunctionDef)}
    here = {n for n in here if n.startswith("test_")} - {sys._getframe().f_code.co_name}
    assert here <= {name for path, name in named if path == "tests/test_reliability.py"}
