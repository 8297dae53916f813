"""Decoupled generator/discriminator optimizers (optimizer.decoupled) against the single one, on a
toy pair: which gradients each model gets, and each optimizer's clip, learning rate and weight
decay, checked against values computed by hand in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from debertina_jax.config import config_from_dict
from debertina_jax.pretraining import optimizer
from debertina_jax.pretraining.pair import build_pair
from debertina_jax.pretraining.step import electra_loss, step_rng

B, L, RTD_WEIGHT = 4, 12, 50.0
EPS = 1e-3  # large, so that Adam's first step g / (|g| + eps) shows how much g was clipped


def _config(sharing="gdes", train=None, mesh=None, **opt):
    return config_from_dict(
        {
            "model": {
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 32,
                "max_position_embeddings": 16,
                "position_buckets": 4,
                "position_biased_input": False,
                "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0,
            },
            "generator": {"num_hidden_layers": 1, "embedding_sharing": sharing},
            "data": {"vocab_size": 40, "max_seq_length": L},
            "optimizer": {"warmup_steps": 0, "eps": EPS, "b2": 0.99, **opt},
            "train": {"steps": 10, "batch_size": B, "rtd_weight": RTD_WEIGHT, **(train or {})},
            "mesh": mesh or {},
        }
    )


@pytest.fixture(scope="module")
def toy():
    """(params, gradient of the total loss, of the MLM loss, of rtd_weight x the RTD loss)."""
    config = _config()
    graphdef, params = nnx.split(build_pair(config, 0))
    ids = np.random.default_rng(0).integers(4, 40, size=(B, L)).astype(np.int32)
    ids[:, 0], ids[:, -1], ids[1, 8:] = 1, 2, 0

    def losses(p):
        loss, metrics = electra_loss(nnx.merge(graphdef, p), ids, step_rng(0, 1), config,
                                     train=True)  # fmt: skip
        parts = jnp.stack([metrics["mlm_loss"], RTD_WEIGHT * metrics["rtd_loss"]])
        return parts, (loss, parts)

    # One compile: the Jacobian of (MLM loss, weighted RTD loss). The step's loss is their sum,
    # so its gradient is the sum of the two rows.
    jacobian, (loss, parts) = jax.jit(jax.jacrev(losses, has_aux=True))(params)
    np.testing.assert_allclose(float(loss), float(parts.sum()), rtol=1e-6)
    mlm, rtd = (jax.tree.map(lambda j, i=i: j[i], jacobian) for i in range(2))
    return params, {"total": jax.tree.map(jnp.add, mlm, rtd), "mlm": mlm, "rtd": rtd}


def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(leaf, np.float64) for path, leaf in leaves}


def _group(path: str) -> str:
    return "discriminator" if path.startswith("['discriminator']") else "generator"


def _norm(grads: dict[str, np.ndarray], group: str | None = None) -> float:
    return float(np.sqrt(sum((g**2).sum() for p, g in grads.items() if group in (None, _group(p)))))


def test_each_model_gets_only_its_own_loss_gradient(toy):
    # The hand-computed split that makes decoupling possible: the generator's parameters get
    # the MLM loss's gradient only (GDES stops the RTD gradient at E_G; sampling is not
    # differentiable), the discriminator's (E_delta included) rtd_weight x the RTD loss's.
    _, grads = toy
    total, mlm, rtd = (_flat(grads[k]) for k in ("total", "mlm", "rtd"))
    delta = "['discriminator']['deberta']['embeddings']['word_embeddings']['embedding'].value"
    assert np.abs(total[delta]).max() > 0  # E_delta learns, from the RTD loss
    for path, g in total.items():
        own, other = (mlm, rtd) if _group(path) == "generator" else (rtd, mlm)
        np.testing.assert_allclose(g, own[path], rtol=1e-5, atol=1e-7, err_msg=path)
        np.testing.assert_array_equal(other[path], 0.0, err_msg=path)
    norms = optimizer.group_norms(_config(), grads["total"])
    for group in optimizer.GROUPS:
        assert float(norms[group]) == pytest.approx(_norm(total, group), rel=1e-5)


def _expected_update(g, p, decays, lr, wd, scale):
    """AdamW's first update after a clip that scaled the gradient by `scale`: the bias-corrected
    moments are exactly g' and g'^2, so the step is -lr (g' / (|g'| + eps) + wd p)."""
    clipped = scale * g
    return -lr * (clipped / (np.abs(clipped) + EPS) + (wd * p if decays else 0.0))


def _decays(path: str) -> bool:
    return not any(f"['{n}']" in path for n in optimizer.NO_DECAY_NAMES)


def _first_updates(config, params, grads) -> dict[str, np.ndarray]:
    tx = optimizer.make_optimizer(config)
    updates, _ = tx.update(grads, tx.init(params), params)  # eager: no compile to wait for
    return _flat(updates)


def test_single_optimizer_clips_both_models_by_one_global_norm(toy):
    params, grads = toy
    total, flat_params = _flat(grads["total"]), _flat(params)
    clip = 0.3 * _norm(total)
    config = _config(learning_rate=1e-3, weight_decay=0.01, clip_norm=clip)
    got = _first_updates(config, params, grads["total"])
    for path, g in total.items():
        want = _expected_update(g, flat_params[path], _decays(path), 1e-3, 0.01, 0.3)
        np.testing.assert_allclose(got[path], want, rtol=2e-4, atol=1e-9, err_msg=path)


def test_decoupled_optimizers_clip_and_step_each_model_on_its_own(toy):
    params, grads = toy
    total, flat_params = _flat(grads["total"]), _flat(params)
    clips = {"generator": 0.5 * _norm(total, "generator"),
             "discriminator": 0.25 * _norm(total, "discriminator")}  # fmt: skip
    config = _config(
        decoupled=True,
        learning_rate=1e-3,
        weight_decay=0.01,
        clip_norm=clips["generator"],
        discriminator_learning_rate=2e-3,
        discriminator_weight_decay=0.1,
        discriminator_clip_norm=clips["discriminator"],
    )
    settings = {"generator": (1e-3, 0.01, 0.5), "discriminator": (2e-3, 0.1, 0.25)}
    got = _first_updates(config, params, grads["total"])
    for path, g in total.items():
        lr, wd, scale = settings[_group(path)]
        want = _expected_update(g, flat_params[path], _decays(path), lr, wd, scale)
        np.testing.assert_allclose(got[path], want, rtol=2e-4, atol=1e-9, err_msg=path)


def test_decoupled_state_has_two_adam_states_and_learning_rates(toy):
    params, grads = toy
    config = _config(decoupled=True, learning_rate=1e-3, discriminator_learning_rate=3e-3)
    tx = optimizer.make_optimizer(config)
    _, state = tx.update(grads["total"], tx.init(params), params)
    rates = {k: float(v) for k, v in optimizer.current_learning_rates(state).items()}
    assert rates == pytest.approx({"learning_rate": 1e-3, "discriminator_learning_rate": 3e-3})
    for group, other in (("generator", "discriminator"), ("discriminator", "generator")):
        # Only the group's own parameters have moments; the other model's are masked out.
        nu = optax.tree_utils.tree_get(state.inner_states[group], "nu")
        assert jax.tree.leaves(nu[other]) == []
        assert jax.tree.leaves(nu[group])


@pytest.mark.parametrize("sharing, owner", [("es", "generator"), ("gdes", "discriminator"),
                                            ("nes", "discriminator")])  # fmt: skip
def test_the_discriminator_word_table_belongs_to(sharing, owner):
    # Under ES the one shared table is the generator's (nnx lists it under the discriminator);
    # under GDES the discriminator's table is E_delta, trained with the discriminator.
    config = _config(sharing)
    params = nnx.state(nnx.eval_shape(lambda: build_pair(config, 0)), nnx.Param)
    labels = optimizer.parameter_groups(config)(params)
    table = labels["discriminator"]["deberta"]["embeddings"]["word_embeddings"]["embedding"]
    assert table == owner
    assert set(jax.tree.leaves(labels)) == {"generator", "discriminator"}
