"""train.prng_impl resumes exactly with each PRNG; every row has seq_per_second (and mfu on a
known chip only); train.profile_steps leaves a jax.profiler trace in the workdir."""

from __future__ import annotations

import jax
import pytest
from deberta_testing import TINY_YAML

from debertina_jax import storage
from debertina_jax.config import load_config
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


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_each_prng_resumes_exactly(impl, small_run_overrides, tmp_path):
    from debertina_jax.pretraining.loop import pretrain

    overrides = small_run_overrides + [
        "model.num_hidden_layers=1", "generator.num_hidden_layers=1", "train.steps=6",
        "train.log_every_steps=1", "train.eval_every_steps=1000", "checkpoint.every_steps=3",
        f"train.prng_impl={impl}", "train.profile_steps=[2, 3]", "mesh.data=8",
    ]  # fmt: skip
    config = load_config(TINY_YAML, overrides)
    # The second run compiles the same programs: JAX's persistent cache spares that.
    cache_dir = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
    try:
        pretrain(config, tmp_path)
        first = {r["step"]: r for r in read_metrics(tmp_path, split="train")}
        storage.remove_tree(str(tmp_path / "checkpoints" / "6"))  # as if killed after step 5
        pretrain(config, tmp_path)
    finally:
        jax.config.update("jax_default_prng_impl", "threefry2x32")  # jax's default again
        jax.config.update("jax_compilation_cache_dir", cache_dir)
    again = {r["step"]: r for r in read_metrics(tmp_path, split="train")}
    assert sorted(again) == list(range(1, 7))
    for step in (4, 5, 6):  # replayed from the checkpoint of step 3
        assert again[step]["loss"] == first[step]["loss"], step
    row = again[6]
    assert row["seq_per_second"] > 0 and "mfu" not in row  # a CPU has no known peak
    traces = [f for f in storage.walk_files(str(tmp_path / "profile")) if f.endswith("xplane.pb")]
    assert traces
