"""Learning-rate schedule, weight-decay mask and clipping of the AdamW optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from debertina_jax.config import Config, OptimizerConfig, TrainConfig
from debertina_jax.pretraining import optimizer


def _config(**opt) -> Config:
    return Config(optimizer=OptimizerConfig(**opt), train=TrainConfig(steps=100))


def test_schedule_warms_up_then_decays_linearly():
    config = _config(learning_rate=1e-3, warmup_steps=10, end_learning_rate=1e-4)
    lr = [optimizer.learning_rate_at(config, s) for s in (0, 5, 10, 55, 100, 150)]
    np.testing.assert_allclose(lr, [0.0, 5e-4, 1e-3, 5.5e-4, 1e-4, 1e-4], rtol=1e-5)


def test_schedule_without_warmup_starts_at_peak():
    config = _config(learning_rate=1e-3, warmup_steps=0)
    assert optimizer.learning_rate_at(config, 0) == pytest.approx(1e-3)
    assert optimizer.learning_rate_at(config, 50) == pytest.approx(5e-4)


class _Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(2, 2, rngs=rngs)
        self.LayerNorm = nnx.LayerNorm(2, rngs=rngs)
        self.word_embeddings = nnx.Embed(3, 2, embedding_init=nnx.initializers.ones, rngs=rngs)


def test_decay_skips_biases_and_layer_norm_but_not_embeddings():
    params = nnx.state(_Tiny(nnx.Rngs(0)), nnx.Param)
    mask = nnx.to_pure_dict(optimizer.weight_decay_mask(params))
    assert mask == {
        "dense": {"kernel": True, "bias": False},
        "LayerNorm": {"scale": False, "bias": False},
        "word_embeddings": {"embedding": True},  # E_delta under GDES: decayed
    }


def test_zero_gradient_update_is_pure_decoupled_weight_decay():
    # With zero gradients Adam's direction is 0, so an update is exactly -lr * wd * param on the
    # decayed leaves and nothing elsewhere.
    config = _config(learning_rate=0.1, warmup_steps=0, weight_decay=0.5)
    params = nnx.state(_Tiny(nnx.Rngs(0)), nnx.Param)
    tx = optimizer.make_optimizer(config)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = tx.update(zeros, tx.init(params), params)
    updates, params = nnx.to_pure_dict(updates), nnx.to_pure_dict(params)
    np.testing.assert_allclose(
        updates["word_embeddings"]["embedding"], -0.05 * np.ones((3, 2)), rtol=1e-6
    )
    np.testing.assert_allclose(
        updates["dense"]["kernel"], -0.05 * params["dense"]["kernel"], rtol=1e-6
    )
    np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)
    np.testing.assert_array_equal(updates["LayerNorm"]["scale"], 0.0)
    assert float(optimizer.current_learning_rate(state)) == pytest.approx(0.1)


@pytest.mark.parametrize("clip_norm, scale", [(1.0, 1.0 / 5e3), (0.0, 1.0)])
def test_gradients_are_clipped_to_the_global_norm_before_adam(clip_norm, scale):
    # Adam's second moment after one update is (1 - b2) * g^2 of the gradient it was given,
    # which shows whether the global-norm clip (norm 5e3 -> 1) ran first; 0 disables it.
    config = _config(learning_rate=1.0, warmup_steps=0, clip_norm=clip_norm, b2=0.9)
    params = {"w": jnp.zeros((4,))}
    grads = {"w": jnp.array([3e3, 4e3, 0.0, 0.0])}
    tx = optimizer.make_optimizer(config)
    _, state = tx.update(grads, tx.init(params), params)
    nu = optax.tree_utils.tree_get(state, "nu")["w"]
    np.testing.assert_allclose(nu, 0.1 * (np.asarray(grads["w"]) * scale) ** 2, rtol=1e-5)
