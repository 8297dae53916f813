"""Test setup and the fixtures that several test files share.

8 simulated CPU devices, so mesh and sharding code runs as on a small TPU slice. What is costly
to make (a trained run, its export, prepared data) is made once per test session, also when
pytest-xdist runs the tests in several processes (scripts/test.sh does): the first process
that needs it makes it, under a file lock, and the others wait for it and reuse it.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from process_testing import (
    REPO,
    compilation_cache_env,
    compilation_cache_settings,
    process_env,
    xla_flags,
)

# Must be set before jax is imported anywhere. Flags given by the caller come last, so they win.
os.environ["XLA_FLAGS"] = f"{xla_flags(8)} {os.environ.get('XLA_FLAGS', '')}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A test that uses one of these fixtures trains or converts model runs: it is marked `slow`.
# The order is that of their work: several pretraining processes for each test that uses
# small_run_overrides, one shared run for the users of tiny_run_dir.
RUN_FIXTURES = ("small_run_overrides", "tiny_run_dir")


# The two longest files start first, one on each worker: test_export.py makes the tiny run and
# its export, which later files reuse (a file that needs them while another worker makes them
# waits idle), and test_gcs_runs.py shares nothing with the others.
FIRST_FILES = ("test_export.py", "test_gcs_runs.py")


def _run_fixture_rank(item: pytest.Item) -> int:
    """The index in RUN_FIXTURES of the first run fixture the test uses; len() if none."""
    used = [i for i, name in enumerate(RUN_FIXTURES) if name in item.fixturenames]
    return min(used, default=len(RUN_FIXTURES))


def pytest_itemcollected(item: pytest.Item) -> None:
    if _run_fixture_rank(item) < len(RUN_FIXTURES):
        item.add_marker(pytest.mark.slow)


@pytest.hookimpl(trylast=True)  # after pytest's own ordering by fixture
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist, FIRST_FILES, then the files with slow tests (in the order of
    RUN_FIXTURES), so that the long work starts at once and the short files even out the end:
    scripts/test.sh hands out whole files (`--dist loadfile`) in the order of their first test
    (`--no-loadscope-reorder`). A plain run keeps the order of the files.

    (Not `--dist loadgroup`: with pytest 9.2 it silently ignores the groups,
    pytest-dev/pytest-xdist#1386.)
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank: dict[Path, int] = {}
    for item in items:
        rank[item.path] = min(rank.get(item.path, len(RUN_FIXTURES)), _run_fixture_rank(item))
    for item in items:
        if item.path.name in FIRST_FILES:
            rank[item.path] = FIRST_FILES.index(item.path.name) - len(FIRST_FILES)
    # Stable: the files of one rank, and each file's tests, keep their order.
    items.sort(key=lambda item: rank[item.path])


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary directory of this session that every xdist worker sees: the parent of
    the workers' own ones."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _made_once(tmp_path_factory: pytest.TempPathFactory, name: str,
               make: Callable[[Path], None]) -> Path:  # fmt: skip
    """The directory `name` of this session, filled by `make` in the first process that asks
    for it."""
    root = _session_dir(tmp_path_factory)
    path, done, failed = root / name, root / f"{name}.done", root / f"{name}.failed"
    with _locked(root / f"{name}.lock"):
        if failed.exists():
            pytest.fail(f"making {name} failed in another test process:\n{failed.read_text()}")
        if not done.exists():
            path.mkdir()
            try:
                make(path)
            except BaseException as error:
                failed.write_text(f"{type(error).__name__}: {error}"[-3000:])
                raise
            done.touch()
    return path


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workdir of deberta_testing.TINY_RUN, trained on 8 devices: 20 steps, checkpoints at
    steps 10 and 20, its tokenizer in tokenizer/."""

    def train(workdir: Path) -> None:
        from deberta_testing import TINY_RUN, TINY_YAML

        from debertina_jax.config import load_config
        from debertina_jax.pretraining.loop import pretrain

        pretrain(load_config(TINY_YAML, TINY_RUN), workdir)

    return _made_once(tmp_path_factory, "tiny_run", train)


@dataclass(frozen=True)
class ExportRun:
    """`convert_to_pt.py` run on the tiny run: where it wrote, and how it ended."""

    output: Path
    process: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def tiny_export_cli(tmp_path_factory: pytest.TempPathFactory, tiny_run_dir: Path) -> ExportRun:
    """`python convert_to_pt.py` with the defaults (latest step, both models, float32,
    verified) on a machine with one CPU device. It may have failed: see tiny_export_dir."""

    def convert(root: Path) -> None:
        env = process_env(1)
        command = [sys.executable, str(REPO / "convert_to_pt.py"), "--workdir", str(tiny_run_dir),
                   "--output", str(root / "export")]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        ended = {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
        (root / "process.json").write_text(json.dumps(ended))

    root = _made_once(tmp_path_factory, "tiny_export", convert)
    ended = json.loads((root / "process.json").read_text())
    process = subprocess.CompletedProcess(["convert_to_pt.py"], **ended)
    return ExportRun(root / "export", process)


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_export_cli: ExportRun) -> Path:
    """The output of tiny_export_cli (discriminator/ and generator/), which must have worked."""
    done = tiny_export_cli.process
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return tiny_export_cli.output


@pytest.fixture(scope="session")
def compile_cache_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment variables that give the JAX processes a test starts (pretraining runs, say)
    one persistent compilation cache for the session, so that processes that run the same
    program (same config and mesh) compile it once. (JAX reads and writes it safely from
    several processes at once.)"""
    return compilation_cache_env(_compilation_cache_dir(tmp_path_factory))


def _compilation_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _session_dir(tmp_path_factory) / "jax_compilation_cache"


@pytest.fixture(scope="session", autouse=True)
def _shared_compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The test processes compile into the same persistent cache as the runs they start: a
    program that another test process (the other xdist worker) or run compiled already is read
    back, not compiled again (test_decoupled + test_ema: 34 s cold, 16 s from the cache).
    Set before this process's first compilation, which is when JAX reads it."""
    import jax

    for name, value in compilation_cache_settings(_compilation_cache_dir(tmp_path_factory)).items():
        jax.config.update(name, value)


def _small_run_data(root: Path) -> list[str]:
    return [f"data.tokenizer_dir={root}/tokenizer", f"data.prepared_dir={root}/data"]


@pytest.fixture(scope="session")
def small_run_overrides(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """deberta_testing.SMALL_RUN, plus the paths of a tokenizer and shards prepared for it once,
    for runs of configs/tiny.yaml that should not each train a tokenizer."""
    from deberta_testing import SMALL_RUN, TINY_YAML

    def prepare(root: Path) -> None:
        from debertina_jax.config import load_config
        from debertina_jax.data.workdir import ensure_data

        ensure_data(load_config(TINY_YAML, SMALL_RUN + _small_run_data(root)), root)

    return SMALL_RUN + _small_run_data(_made_once(tmp_path_factory, "small_run_data", prepare))


@pytest.fixture(scope="session")
def short_run_dir(
    tmp_path_factory: pytest.TempPathFactory,
    small_run_overrides: list[str],
    compile_cache_env: dict[str, str],
) -> Path:
    """The workdir of `run_pretrain.py` with small_run_overrides + deberta_testing.SHORT_RUN on
    one device, uninterrupted: 8 steps, checkpoints 2, 4, 6 and 8. The runs that are stopped
    and resumed are compared with it; tests that damage it work on a copy."""
    from deberta_testing import SHORT_RUN, TINY_YAML

    def train(workdir: Path) -> None:
        command = [sys.executable, str(REPO / "run_pretrain.py"), "--config", str(TINY_YAML),
                   "--workdir", str(workdir), *small_run_overrides, *SHORT_RUN]  # fmt: skip
        done = subprocess.run(command, env=process_env(1, **compile_cache_env),
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]

    return _made_once(tmp_path_factory, "short_run", train)


# The GCS emulator: gcs_emulator (session) and gcs_bucket (a fresh bucket per test).
from gcs_testing import gcs_bucket, gcs_emulator  # noqa: E402,F401
