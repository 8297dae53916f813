"""Every shipped config (configs/*.yaml) compiles and runs a train step with its own settings.

Only the sizes shrink (2 layers of width 32, a 60-piece vocabulary, 32-token lines, 8 rows on one
device): dtype, scan_layers, remat, attention impl, embedding sharing, masking, the optimizer and
its schedule stay the file's, so the settings the large configs train with (bfloat16 + scan +
remat "dots") are compiled as a train step here, not only as a forward.
"""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from debertina_jax.config import load_config
from debertina_jax.pretraining import state as state_lib
from debertina_jax.pretraining import step as ts
from debertina_jax.pretraining.optimizer import learning_rate_at
from debertina_jax.pretraining.pair import compute_settings
from debertina_jax.pretraining.state import merge_pair
from debertina_jax.runtime import sharding

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
BATCH, LENGTH, PIECES = 8, 32, 60
SHRINK = [
    "model.num_hidden_layers=2",
    "model.hidden_size=32",
    "model.num_attention_heads=2",
    "model.intermediate_size=64",
    f"data.vocab_size={PIECES}",
    f"data.max_seq_length={LENGTH}",
    f"train.batch_size={BATCH}",
]
SIZE_KEYS = {"num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"}


def _program_key(config) -> str:
    """Shrunk, xsmall / small / base / base-128k are the same config (they differ only in
    sizes): they share one compiled step. large differs in its peak learning rate, a constant
    of the program, so it compiles its own."""
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


class _Compiled:
    """One compiled train step and initial state per distinct program, shared by the configs."""

    def __init__(self):
        self._steps = {}

    def get(self, config):
        key = _program_key(config)
        if key not in self._steps:
            mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
            graphdef, state = state_lib.create_train_state(config, mesh, rng_seed=0)
            shardings = state_lib.shardings_of(state)
            step = ts.make_train_step(config, mesh, graphdef, shardings)
            batch = {"input_ids": jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32)}
            compiled = step.lower(state, batch, ts.step_rng(0, 0)).compile()
            self._steps[key] = (graphdef, jax.device_get(state), shardings, compiled)
        return self._steps[key]


@pytest.fixture(scope="module")
def compiled():
    return _Compiled()


def _batch() -> np.ndarray:
    ids = np.random.default_rng(0).integers(4, PIECES, size=(BATCH, LENGTH)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 1, 2
    ids[1, 20:] = 0  # a short line, padded
    return ids


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_compiles_and_steps_at_toy_size(name, compiled):
    path = CONFIGS_DIR / f"{name}.yaml"
    full, config = load_config(path), load_config(path, SHRINK)
    # Only sizes changed: every setting that decides how the step computes is the file's.
    assert config.train == dataclasses.replace(full.train, batch_size=BATCH)
    assert config.generator == full.generator
    assert config.optimizer == full.optimizer
    sizes = dict(vocab_size=full.data.vocab_size, max_seq_length=full.data.max_seq_length)
    assert dataclasses.replace(config.data, **sizes) == full.data
    changed = {k for k, v in config.model.to_dict().items() if full.model.to_dict().get(k) != v}
    assert changed <= SIZE_KEYS | {"vocab_size"}, changed
    assert config.model.vocab_size == PIECES + 1

    graphdef, initial, shardings, step = compiled.get(config)
    pair = merge_pair(graphdef, initial)
    assert pair.compute == compute_settings(full)
    assert pair.sharing == full.generator.embedding_sharing
    state = jax.device_put(initial, shardings)
    history = []
    for i in range(2):  # warmup starts at learning rate 0: the second update moves the weights
        state, metrics = step(state, {"input_ids": _batch()}, ts.step_rng(0, i))
        history.append({k: float(v) for k, v in metrics.items()})
    print(f"\nshipped config | {name} | {pair.compute} | loss {history[0]['loss']:.4f}")
    for metrics in history:
        assert metrics["nonfinite"] == 0 and np.isfinite(metrics["loss"])
    assert abs(history[0]["mlm_loss"] - np.log(PIECES + 1)) < 1.0  # near uniform at init
    assert history[1]["learning_rate"] == pytest.approx(learning_rate_at(config, 1))
    state = jax.device_get(state)
    assert int(state["step"]) == 2
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {np.dtype(np.float32)}
    moved = [
        float(np.abs(a - b).max())
        for a, b in zip(
            jax.tree.leaves(state["params"]), jax.tree.leaves(initial["params"]), strict=True
        )
    ]
    assert max(moved) > 0
