"""Learning-rate schedule, weight-decay mask and clipping of the AdamW optimizer."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from deberta_testing import tiny_config
from flax import nnx

from debertina_jax.config import Config, DataConfig, OptimizerConfig, TrainConfig, load_config
from debertina_jax.pretraining import optimizer
from debertina_jax.pretraining.pair import build_pair


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


CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
ADAMW_DEFAULTS = {"b1": 0.9, "b2": 0.999, "eps": 1e-6, "weight_decay": 0.01}


def _injected_hyperparams(state) -> list[dict]:
    """The injected AdamW hyperparameters of each optimizer in `state` (one, or two when
    decoupled)."""

    def injected(node) -> bool:
        return isinstance(getattr(node, "hyperparams", None), dict)

    nodes = [n for n in jax.tree.leaves(state, is_leaf=injected) if injected(n)]
    return [{k: float(v) for k, v in n.hyperparams.items()} for n in nodes]


@pytest.mark.parametrize(
    "source", ["defaults"] + sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
)
def test_adamw_defaults_reach_the_optimizer_the_config_builds(source):
    """b1 0.9, b2 0.999, eps 1e-6, weight decay 0.01, clip 1.0 (the official recipe), read back
    from the optax state of make_optimizer(config), for the defaults and every shipped config
    (two AdamW states, the same settings, when a config trains decoupled)."""
    if source == "defaults":
        config = Config(train=TrainConfig(steps=100))
    else:
        config = load_config(CONFIGS_DIR / f"{source}.yaml")
    tx = optimizer.make_optimizer(config)
    params = {"generator": {"w": jnp.zeros((4,))}, "discriminator": {"w": jnp.zeros((4,))}}
    hypers = _injected_hyperparams(tx.init(params))
    assert len(hypers) == (2 if config.optimizer.decoupled else 1)
    for hyper in hypers:
        for key, value in ADAMW_DEFAULTS.items():
            assert hyper[key] == pytest.approx(value, rel=1e-6), key
    # Clip 1.0: the gradients reach Adam scaled to norm 1 (per model when decoupled), so the
    # first moment is 0.1 x g / norm.
    g = jnp.array([3.0, 4.0, 0.0, 0.0])
    _, state = tx.update(
        {"generator": {"w": g}, "discriminator": {"w": g}}, tx.init(params), params
    )
    norm = 5.0 if config.optimizer.decoupled else 5.0 * np.sqrt(2.0)
    moments = [m for _, m in optax.tree_utils.tree_get_all_with_path(state, "mu")]
    assert len(moments) == len(hypers)
    for mu in jax.tree.leaves(moments):
        np.testing.assert_allclose(mu, 0.1 * np.asarray(g) / norm, rtol=1e-6)


def test_decay_mask_of_the_real_pair_skips_every_bias_and_layer_norm():
    # Written from the modules, not the leaf names the mask reads: every parameter of a
    # LayerNorm (any module named *norm*) and every bias is exempt, everything else decays.
    config = Config(
        model=tiny_config(
            vocab_size=40,
            hidden_size=16,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        ),  # fmt: skip
        data=DataConfig(vocab_size=39),
    )
    params = nnx.state(nnx.eval_shape(lambda: build_pair(config, 0)), nnx.Param)
    mask = nnx.to_flat_state(optimizer.weight_decay_mask(params))
    decayed, exempt = set(), set()
    for path, decays in mask:
        names = [str(p) for p in path]
        is_norm = any("norm" in n.lower() for n in names[:-1])
        (decayed if decays.get_value() else exempt).add("/".join(names))
        assert bool(decays.get_value()) == (not is_norm and names[-1] != "bias"), names
    assert any("word_embeddings" in p for p in decayed)
    assert any("norm" in p for p in exempt) and any(p.endswith("bias") for p in exempt)
