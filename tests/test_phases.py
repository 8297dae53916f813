"""Sequence-length phases (train.phases): the config and its arithmetic, lines of a shorter length
cut from the same prepared data (data/phased.py), a model that behaves the same at every length,
and a two-phase run killed with SIGKILL that resumes exactly, inside a phase and at the boundary.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from deberta_testing import TINY_YAML
from flax import nnx
from process_testing import process_env

from debertina_jax import storage
from debertina_jax.config import ConfigError, load_config, sequence_phases, tokens_seen
from debertina_jax.config.phases import phase_of_step
from debertina_jax.data import format as fmt
from debertina_jax.data.loader import LoaderError, line_stream, make_loader
from debertina_jax.data.phased import make_phase_loader, phase_start_slot
from debertina_jax.model.relative_position import build_relative_positions
from debertina_jax.pretraining.pair import build_pair
from debertina_jax.runtime.metrics_log import read_metrics

# As a dotted override in YAML flow style; the second phase takes train.batch_size (8).
PHASES = (
    "[{until_step: 4, max_seq_length: 32, batch_size: 16}, {until_step: 10, max_seq_length: 64}]"
)


# ---- config ------------------------------------------------------------------------------------
def test_phases_from_a_flow_style_override_and_their_arithmetic():
    overrides = ["train.steps=10", "train.batch_size=8", "data.max_seq_length=64"]
    config = load_config(TINY_YAML, [*overrides, f"train.phases={PHASES}"])
    phases = sequence_phases(config)
    assert [(p.first_step, p.last_step, p.max_seq_length, p.batch_size) for p in phases] == [
        (1, 4, 32, 16),
        (5, 10, 64, 8),  # batch_size left out: train.batch_size
    ]
    assert [phase_of_step(phases, s).index for s in (1, 4, 5, 10)] == [0, 0, 1, 1]
    assert tokens_seen(phases, 3) == 3 * 16 * 32
    assert tokens_seen(phases, 7) == 4 * 16 * 32 + 3 * 8 * 64
    # Phase 1 starts where phase 0's 4 x 16 rows of 30 text ids ended.
    assert phase_start_slot(phases, 1) == 4 * 16 * 30
    # The run's config.yaml keeps them, and reads back the same.
    from debertina_jax.config import config_from_dict

    assert config_from_dict(config.to_dict()) == config
    plain = load_config(TINY_YAML, ["train.steps=10"])
    assert [(p.first_step, p.last_step, p.max_seq_length) for p in sequence_phases(plain)] == [
        (1, 10, 128)
    ]


@pytest.mark.parametrize(
    "phases, message",
    [
        ("[{until_step: 8, max_seq_length: 32}]", "must end at train.steps"),
        ("[{until_step: 10, max_seq_length: 256}]", "exceeds data.max_seq_length (128)"),
        ("[{until_step: 6, max_seq_length: 32}, {until_step: 6, max_seq_length: 64}]",
         "train.phases[1].until_step (6) must be larger"),
        ("[{until_step: 10, max_seq_len: 64}]", "train.phases[0]: unknown key 'max_seq_len'"),
        ("[{until_step: 10}]", "train.phases[0]: max_seq_length is missing"),
        ("[{until_step: 10, max_seq_length: 64, batch_size: 6}]",
         "train.phases[0].batch_size (6) must be a multiple of optimizer.grad_accum_steps (4)"),
    ],
)  # fmt: skip
def test_bad_phases_are_refused_by_name(phases, message):
    with pytest.raises(ConfigError) as error:
        load_config(TINY_YAML, ["train.steps=10", "optimizer.grad_accum_steps=4",
                                f"train.phases={phases}"])  # fmt: skip
    assert message in str(error.value)


# ---- lines cut from the prepared data ----------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(small_run_overrides) -> Path:
    """Train lines of 64 tokens (62 text ids); the last line of the corpus is short."""
    prepared = next(o for o in small_run_overrides if o.startswith("data.prepared_dir="))
    return Path(prepared.split("=", 1)[1])


def _text(rows: np.ndarray) -> list[np.ndarray]:
    """The text ids of each [CLS] ... [SEP] row (padding dropped)."""
    out = []
    for row in rows:
        n = int((row != 0).sum())
        assert row[0] == 1 and row[n - 1] == 2 and not row[n:].any()
        out.append(row[1 : n - 1])
    return out


def test_one_phase_at_the_prepared_length_is_the_plain_loader(data_dir):
    plain = make_loader(data_dir, "train", 8, seed=3, shard_index=0, shard_count=1)
    phased = make_phase_loader(data_dir, "train", 8, seed=3, seq_length=64, shard_index=0,
                               shard_count=1)  # fmt: skip
    with plain, phased:
        for _ in range(310):  # past the end of the first epoch (2357 lines / 8)
            np.testing.assert_array_equal(next(phased)["input_ids"], next(plain)["input_ids"])


def test_phases_continue_the_token_stream_without_repeating_or_skipping(data_dir):
    lines = list(fmt.iter_lines(data_dir, "train"))
    assert len(lines[-1]) < 64  # the short last line is in the stream too
    stream = line_stream(len(lines), seed=5)
    text = np.concatenate([lines[stream[i]][1:-1] for i in range(2 * len(lines))])
    # Phase 0: 32-token lines past a whole epoch; phase 1 at 64 tokens from where it stopped.
    first_batches = len(lines) * 62 // (16 * 30) + 5
    got = []
    with make_phase_loader(data_dir, "train", 16, seed=5, seq_length=32, shard_index=0,
                           shard_count=1) as loader:  # fmt: skip
        for _ in range(first_batches):
            got += _text(next(loader)["input_ids"])
    start = first_batches * 16 * 30
    with make_phase_loader(data_dir, "train", 8, seed=5, seq_length=64, start_slot=start,
                           shard_index=0, shard_count=1) as loader:  # fmt: skip
        for _ in range(20):
            got += _text(next(loader)["input_ids"])
    got = np.concatenate(got)
    # Every id of the stream once, in order: only the short line's empty slots are not rows'.
    np.testing.assert_array_equal(got, text[: len(got)])
    used = start + 20 * 8 * 62
    shorts = sum(stream[i] == len(lines) - 1 for i in range(-(-used // 62)))
    assert shorts >= 1
    assert len(got) == used - shorts * (62 - (len(lines[-1]) - 2))


def test_phase_loader_resumes_and_splits_over_processes(data_dir):
    def loader(**kw):
        return make_phase_loader(data_dir, "train", 8, seed=1, seq_length=40, start_slot=77, **kw)

    with loader(shard_index=0, shard_count=1) as whole:
        for _ in range(3):
            next(whole)
        state = whole.get_state()
        expected = [next(whole)["input_ids"] for _ in range(2)]
    with loader(shard_index=0, shard_count=2) as p0, loader(shard_index=1, shard_count=2) as p1:
        for _ in range(3):
            next(p0), next(p1)
        for want in expected:
            both = np.concatenate([next(p0)["input_ids"], next(p1)["input_ids"]])
            np.testing.assert_array_equal(both, want)
    with loader(shard_index=0, shard_count=1) as resumed:
        resumed.set_state(state)
        for want in expected:
            np.testing.assert_array_equal(next(resumed)["input_ids"], want)
    other = make_phase_loader(data_dir, "train", 8, seed=1, seq_length=64, start_slot=77,
                              shard_index=0, shard_count=1)  # fmt: skip
    with other, pytest.raises(LoaderError, match="seq_length: saved 40, now 64"):
        other.set_state(state)


# ---- the model does not depend on the length ---------------------------------------------------
def test_the_model_gives_the_same_outputs_at_both_lengths():
    # Relative positions are bucketed from j - i alone: a 32-token line sees the top-left block
    # of what a 64-token one sees, and the same line padded to 64 gives the same logits.
    config = load_config(TINY_YAML, ["model.num_hidden_layers=1", "generator.num_hidden_layers=1",
                                     "data.vocab_size=100"])  # fmt: skip
    m = config.model
    short = build_relative_positions(32, 32, m.position_buckets, m.max_position_embeddings)
    long = build_relative_positions(64, 64, m.position_buckets, m.max_position_embeddings)
    np.testing.assert_array_equal(long[:32, :32], short)
    assert len(np.unique(long)) > len(np.unique(short)) > m.position_buckets  # log buckets used

    pair = build_pair(config, 0)
    ids = np.random.default_rng(0).integers(4, 100, size=(2, 32)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 1, 2
    padded = np.pad(ids, ((0, 0), (0, 32)))

    @nnx.jit
    def logits(pair, ids):
        mask = (ids != 0).astype(jnp.int32)
        positions = jnp.tile(jnp.arange(1, 9)[None], (ids.shape[0], 1))
        return pair.discriminator_logits(ids, mask), pair.generator_logits(ids, mask, positions)

    (d32, g32), (d64, g64) = logits(pair, ids), logits(pair, padded)
    np.testing.assert_allclose(np.asarray(d64)[:, :32], np.asarray(d32), atol=2e-5)
    np.testing.assert_allclose(np.asarray(g64), np.asarray(g32), atol=2e-5)


# ---- a two-phase run, killed and resumed --------------------------------------------------------
# Runs run_pretrain's main in a child that saves each checkpoint synchronously and SIGKILLs
# itself when about to log step KILL_AT: it dies in the middle of training, the checkpoint of
# the step before durable, nothing cleaned up.
KILLER = """
import os, signal, sys
from debertina_jax.cli.pretrain import main
from debertina_jax.runtime.checkpointing import Checkpointer
from debertina_jax.runtime.metrics_log import MetricsLogger
kill_at = int(os.environ["KILL_AT"])
save, update = Checkpointer.save, MetricsLogger.update
def save_now(self, step, *args, **kwargs):
    started = save(self, step, *args, **kwargs)
    self.wait()
    return started
def update_or_die(self, step, row):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return update(self, step, row)
Checkpointer.save, MetricsLogger.update = save_now, update_or_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def run_settings(small_run_overrides, compile_cache_env) -> tuple[list[str], dict[str, str]]:
    """Overrides of a 10-step run: 4 steps of 16 x 32 tokens, 6 of 8 x 64, with the decoupled
    optimizers, wsd (decay from step 5), the EMA and the rbg PRNG (threefry, the default, is
    resumed in test_pretrain.py, unsafe_rbg in test_gcs_runs.py); and the children's
    environment."""
    overrides = small_run_overrides + [
        "model.num_hidden_layers=1", "generator.num_hidden_layers=1", "model.hidden_size=32",
        "model.intermediate_size=64", "model.num_attention_heads=2", "train.steps=10",
        f"train.phases={PHASES}", "train.log_every_steps=1", "train.eval_every_steps=5",
        "train.ema_decay=0.9", "optimizer.decoupled=true", "optimizer.schedule=wsd",
        "optimizer.wsd_decay_fraction=0.5", "optimizer.discriminator_learning_rate=1e-3",
        "checkpoint.every_steps=2", "checkpoint.keep=3", "train.prng_impl=rbg",
    ]  # fmt: skip
    env = process_env(1, **compile_cache_env)
    return overrides, env


def _train(
    workdir: Path, settings, kill_at: int | None = None, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    overrides, env = settings
    args = ["--config", str(TINY_YAML), "--workdir", str(workdir), *overrides, *extra]
    env = dict(env, KILL_AT=str(kill_at or 0))
    return subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def _rows(workdir: Path) -> dict[int, dict]:
    return {row["step"]: row for row in read_metrics(workdir, split="train")}


def _checkpoints(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(run_settings, tmp_path_factory) -> dict[int, dict]:
    """The uninterrupted run's rows; it also traces steps 2 and 3 with jax.profiler (which
    changes nothing the run computes)."""
    workdir = tmp_path_factory.mktemp("reference")
    done = _train(workdir, run_settings, extra=("train.profile_steps=[2, 3]",))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(workdir)
    assert sorted(rows) == list(range(1, 11))
    traces = storage.walk_files(str(workdir / "profile"))
    assert [f for f in traces if f.endswith("xplane.pb")], traces
    assert rows[10]["seq_per_second"] > 0 and "mfu" not in rows[10]  # a CPU has no known peak
    return rows


def test_two_phases_killed_in_the_second_resume_exactly(reference, run_settings, tmp_path):
    # Every row says its phase's length and batch, and counts the tokens of both phases.
    assert [reference[s]["max_seq_length"] for s in range(1, 11)] == [32] * 4 + [64] * 6
    assert [reference[s]["batch_size"] for s in (4, 5)] == [16, 8]
    assert reference[10]["tokens_seen"] == 4 * 16 * 32 + 6 * 8 * 64
    assert {"generator_grad_norm", "discriminator_learning_rate"} <= set(reference[1])

    killed = _train(tmp_path, run_settings, kill_at=7)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _checkpoints(tmp_path)[-1] == 6 and max(_rows(tmp_path)) == 6

    # Exactly at the boundary: a copy of the workdir whose newest checkpoint is step 4.
    boundary = tmp_path.parent / f"{tmp_path.name}-boundary"
    shutil.copytree(tmp_path, boundary)
    for step in _checkpoints(boundary):
        if step > 4:
            shutil.rmtree(boundary / "checkpoints" / str(step))
    for workdir, resumed_from in ((boundary, 4), (tmp_path, 6)):
        done = _train(workdir, run_settings)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"resumed from the checkpoint of step {resumed_from}" in done.stderr
        rows = _rows(workdir)
        assert sorted(rows) == list(range(1, 11))
        for step in range(1, 11):
            assert rows[step]["loss"] == reference[step]["loss"], (workdir, step)
    # The last checkpoint before the wsd decay (step 5) outlives checkpoint.keep=3.
    assert _checkpoints(tmp_path) == [5, 6, 8, 10]

    evals = read_metrics(tmp_path, split="eval")
    assert [e["step"] for e in evals] == [5, 10]
    assert evals[-1]["max_seq_length"] == 64
    assert evals[-1]["ema_mlm_loss"] != evals[-1]["mlm_loss"]

    # The export reads the EMA instead of the raw weights when asked.
    from debertina_jax.export.checkpoint import load_checkpoint
    from debertina_jax.hf.convert import model_to_state_dict

    raw, ema = (load_checkpoint(tmp_path, weights=w) for w in ("raw", "ema"))
    assert ema.weights == "the EMA of the weights (train.ema_decay 0.9) of step 10"
    a, b = model_to_state_dict(raw.discriminator), model_to_state_dict(ema.discriminator)
    assert a.keys() == b.keys() and any(not np.array_equal(a[k], b[k]) for k in a)
