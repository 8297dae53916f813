"""The moving average of the weights (train.ema_decay): updated after every step as the formula
says, sharded like the parameters, and restored from a checkpoint exactly."""

import jax
import numpy as np
import pytest
from test_decoupled import B, L, _config

from debertina_jax.config import MeshConfig
from debertina_jax.pretraining import state as state_lib
from debertina_jax.pretraining.step import make_train_step, step_rng
from debertina_jax.runtime.checkpointing import Checkpointer
from debertina_jax.runtime.sharding import make_mesh

DECAY = 0.6  # below the warm-up's (1 + t) / (10 + t) only from t = 13 on: both rules show


def _ema_config():
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    return _config(learning_rate=1e-2, train={"ema_decay": DECAY}, mesh=mesh)


@pytest.fixture(scope="module")
def run():
    """Three steps on a data 2 x fsdp 2 x tensor 2 mesh: (config, mesh, states after 0..3 steps)."""
    config = _ema_config()
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    graphdef, state = state_lib.create_train_state(config, mesh, rng_seed=0)
    step = make_train_step(config, mesh, graphdef, state_lib.shardings_of(state))
    ids = np.random.default_rng(1).integers(4, 40, size=(B, L)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 1, 2
    states = [jax.device_get(state)]
    for i in range(3):
        state, _ = step(state, {"input_ids": ids}, step_rng(0, i + 1))
        states.append(jax.device_get(state))
    return config, mesh, state, states


def test_ema_starts_at_the_parameters_and_follows_the_formula(run):
    config, _, _, states = run
    flat = lambda tree: jax.tree.leaves(tree)  # noqa: E731
    for a, b in zip(flat(states[0]["ema"]), flat(states[0]["params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    ema = [np.asarray(x, np.float64) for x in flat(states[0]["params"])]
    for t in range(3):
        decay = min(DECAY, (1 + t) / (10 + t))
        assert float(state_lib.ema_decay_at(config, t)) == pytest.approx(decay)
        params = flat(states[t + 1]["params"])
        ema = [decay * e + (1 - decay) * np.asarray(p, np.float64)
               for e, p in zip(ema, params, strict=True)]  # fmt: skip
        for got, want in zip(flat(states[t + 1]["ema"]), ema, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # It lags behind: after three steps it is neither the start nor the parameters.
    moved = flat(states[3]["params"])[0] - flat(states[0]["params"])[0]
    assert np.abs(moved).max() > 0
    assert not np.allclose(flat(states[3]["ema"])[0], flat(states[3]["params"])[0])


def test_ema_is_sharded_like_the_parameters_and_restores_exactly(run, tmp_path):
    config, mesh, state, _ = run
    shardings = state_lib.shardings_of(state)
    assert jax.tree.leaves(shardings["ema"]) == jax.tree.leaves(shardings["params"])
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(shardings["ema"]))
    with Checkpointer(tmp_path, every_steps=1, keep=1, async_save=False) as checkpointer:
        checkpointer.save(3, state, {"position": 0}, {})
        _, abstract, _ = state_lib.abstract_train_state(config, mesh)
        restored = checkpointer.restore(3, abstract).state
    for got, want in zip(jax.tree.leaves(restored["ema"]), jax.tree.leaves(state["ema"]),
                         strict=True):  # fmt: skip
        assert got.sharding == want.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
