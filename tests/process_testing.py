"""The environment of the JAX processes the tests run: this one (conftest.py) and the ones they
start (run_pretrain.py, convert_to_pt.py, tests/mp_worker.py). Imports no JAX: conftest.py sets
XLA_FLAGS with it before JAX is first imported.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# XLA's CPU backend with LLVM's optimisations off, and its older LLVM emitter for fusions
# rather than the MLIR fusion emitters (which build and lower an MLIR module per fusion). The
# tests' models are toys: compiling their programs, not running them, is what takes the time.
# Measured on the tiny train step: 10.0 s -> 5.4 s for the optimisation level (2026-12-01), and
# 7.5 s -> 5.4 s for the emitter (1+1 layers; a run process's CPU time 22 s -> 16 s;
# 2026-12-02). The arithmetic is the same IEEE float arithmetic (no fast-math either way);
# programs the tests compare are compiled with the same flags.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int, optimized: bool = False) -> str:
    """XLA_FLAGS for a process with `devices` simulated CPU devices; `optimized` keeps XLA's
    default optimisation, for a process that trains long enough for it to pay."""
    return f"--xla_force_host_platform_device_count={devices}" + (
        "" if optimized else f" {TEST_XLA_FLAGS}"
    )


def compilation_cache_settings(directory: str | Path) -> dict[str, str | int]:
    """JAX options (`jax.config` names) for a persistent compilation cache in `directory` that
    keeps every program, however small or quick to compile: the test processes and the runs
    they start then read back what another of them compiled. The same as environment
    variables for a child process: `compilation_cache_env`."""
    return {
        "jax_compilation_cache_dir": str(directory),
        "jax_persistent_cache_min_compile_time_secs": 0,
        "jax_persistent_cache_min_entry_size_bytes": -1,
    }


def compilation_cache_env(directory: str | Path) -> dict[str, str]:
    """`compilation_cache_settings` as the environment variables JAX reads them from."""
    settings = compilation_cache_settings(directory)
    return {name.upper(): str(value) for name, value in settings.items()}


def process_env(devices: int, optimized: bool = False, **extra: str) -> dict[str, str]:
    """This process's environment for a child JAX process on `devices` CPU devices that
    imports this checkout (compiled as `xla_flags` says), plus `extra`."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices, optimized))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env
