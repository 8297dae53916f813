"""train.prng_impl resumes exactly with each PRNG; every row has seq_per_second (and mfu on a
known chip only); train.profile_steps leaves a jax.profiler trace in the workdir."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from deberta_testing import REPO, TINY_YAML
from process_testing import process_env

from debertina_jax import storage
from debertina_jax.pretraining.chips import peak_flops_per_second
from debertina_jax.runtime.metrics_log import read_metrics


@pytest.mark.parametrize(
    "kind, peak",
    [("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
     ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
     ("cpu", None), ("TPU v3", None)],
)  # fmt: skip
def test_chip_peaks(kind, peak):
    assert peak_flops_per_second(kind) == peak


def _pretrain(workdir: Path, overrides: list[str], env: dict[str, str]) -> None:
    command = [sys.executable, str(REPO / "run_pretrain.py"), "--config", str(TINY_YAML),
               "--workdir", str(workdir), *overrides]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_each_prng_resumes_exactly(impl, small_run_overrides, compile_cache_env, tmp_path):
    # The profiler's part does not depend on the PRNG: traced in one of the two.
    profile = ["train.profile_steps=[2, 3]"] if impl == "rbg" else []
    overrides = small_run_overrides + [
        "model.num_hidden_layers=1", "generator.num_hidden_layers=1", "train.steps=6",
        "train.log_every_steps=1", "train.eval_every_steps=1000", "train.eval_batches=0",
        "checkpoint.every_steps=3",
        f"train.prng_impl={impl}", "mesh.data=1", *profile,
    ]  # fmt: skip
    # One device, in processes of their own: a third of the compile time of the 8 simulated
    # devices of this process (measured), and jax's PRNG setting stays out of this process.
    # The second run compiles the same programs: the session's persistent cache spares that.
    env = process_env(1, **compile_cache_env)
    _pretrain(tmp_path, overrides, env)
    first = {r["step"]: r for r in read_metrics(tmp_path, split="train")}
    storage.remove_tree(str(tmp_path / "checkpoints" / "6"))  # as if killed after step 5
    _pretrain(tmp_path, overrides, env)
    again = {r["step"]: r for r in read_metrics(tmp_path, split="train")}
    assert sorted(again) == list(range(1, 7))
    for step in (1, 2, 3):  # kept from the first run (their times too): it did resume
        assert again[step] == first[step], step
    for step in (4, 5, 6):  # replayed from the checkpoint of step 3
        assert again[step]["loss"] == first[step]["loss"], step
        assert again[step]["time"] > first[6]["time"], step
    row = again[6]
    assert row["seq_per_second"] > 0 and "mfu" not in row  # a CPU has no known peak
    if profile:
        traces = storage.walk_files(str(tmp_path / "profile"))
        assert [f for f in traces if f.endswith("xplane.pb")]
