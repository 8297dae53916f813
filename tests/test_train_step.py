"""The mesh, state shardings and the jitted train / eval steps on 1 and 8 simulated devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from debertina_jax.config import MeshConfig, config_from_dict
from debertina_jax.config.model import ConfigError
from debertina_jax.pretraining import pair as pair_lib
from debertina_jax.pretraining import state as state_lib
from debertina_jax.pretraining import step as ts
from debertina_jax.runtime import sharding

BATCH, LENGTH = 8, 16


def _config(train=None, optimizer=None, model=None, mesh=None):
    return config_from_dict(
        {
            "model": {
                "vocab_size": 128,
                "hidden_size": 32,
                "num_hidden_layers": 1,  # compile time grows with depth
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 32,
                "relative_attention": True,
                "position_buckets": 8,
                "norm_rel_ebd": "layer_norm",
                "share_att_key": True,
                "pos_att_type": "p2c|c2p",
                "position_biased_input": False,
                # Dropout off: exact comparisons, and much faster compiles on CPU; one test
                # below turns it on.
                "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0,
                **(model or {}),
            },
            "generator": {"num_hidden_layers": 1},
            "data": {"vocab_size": 120, "max_seq_length": LENGTH},
            "optimizer": {"learning_rate": 3e-3, "warmup_steps": 0, **(optimizer or {})},
            "train": {"steps": 100, "batch_size": BATCH, **(train or {})},
            "mesh": mesh or {},
        }
    )


def _batch(seed=0):
    ids = np.random.default_rng(seed).integers(4, 120, size=(BATCH, LENGTH)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 1, 2
    ids[1, 10:] = 0  # a short line, padded
    ids[2, 6:] = 0
    return {"input_ids": ids}


def _mesh(data=1, fsdp=1, tensor=1):
    devices = jax.devices()[: data * fsdp * tensor]
    return sharding.make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), devices)


class Runner:
    """A compiled step on one mesh plus a host copy of the initial state to restart from.

    `initial` (a host state) skips the sharded initialisation, whose compile costs time.
    """

    def __init__(self, config, mesh, initial=None):
        self.config, self.mesh = config, mesh
        if initial is None:
            self.graphdef, state = state_lib.create_train_state(config, mesh, rng_seed=0)
            self.shardings = state_lib.shardings_of(state)
            self.initial = jax.device_get(state)
        else:
            self.graphdef, abstract, _ = state_lib.abstract_train_state(config, mesh)
            self.shardings = state_lib.shardings_of(abstract)
            self.initial = initial
        self.step = ts.make_train_step(config, mesh, self.graphdef, self.shardings)

    def fresh(self):
        return jax.device_put(self.initial, self.shardings)

    def run(self, steps, batch=None, state=None):
        state = self.fresh() if state is None else state
        history = []
        for i in range(steps):
            state, metrics = self.step(state, batch or _batch(), ts.step_rng(0, i))
            history.append({k: float(v) for k, v in metrics.items()})
        return state, history


@pytest.fixture(scope="module")
def single():
    return Runner(_config(), _mesh())


@pytest.fixture(scope="module")
def reference(single):
    return single.run(2)[1]


# ---- mesh and shardings ---------------------------------------------------------------------


def test_mesh_fills_the_minus_one_axis_and_is_auto():
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
    "mesh, message",
    [
        (MeshConfig(data=3), "needs 3 devices but 8"),
        (MeshConfig(data=-1, fsdp=3), "not a multiple of 3"),
        (MeshConfig(data=-1, fsdp=-1), "only one"),
        (MeshConfig(data=0), "positive or -1"),
    ],
)
def test_mesh_errors_name_the_sizes(mesh, message):
    with pytest.raises(ConfigError, match=message):
        sharding.make_mesh(mesh)


def test_logical_axes_fall_back_to_replication():
    mesh = _mesh(2, 2, 2)
    rules = MeshConfig().rules
    spec = sharding.logical_to_mesh(("vocab", "embed"), (128, 32), mesh, rules)
    assert spec == PartitionSpec("tensor", "fsdp")
    # 2001 rows do not split in two; an unknown name and None stay replicated.
    spec = sharding.logical_to_mesh(("vocab", "embed"), (2001, 32), mesh, rules)
    assert spec == PartitionSpec(None, "fsdp")
    spec = sharding.logical_to_mesh(("whatever", None), (4, 4), mesh, rules)
    assert spec == PartitionSpec(None, None)
    # One mesh axis is never used for two dimensions.
    spec = sharding.logical_to_mesh(("mlp", "heads"), (64, 64), mesh, rules)
    assert spec == PartitionSpec("tensor", None)


def test_params_and_adam_moments_are_sharded_by_the_rules():
    config = _config()
    _, abstract, _ = state_lib.abstract_train_state(config, _mesh(2, 2, 2))
    kernel = abstract["params"]["discriminator"]["deberta"]["encoder"]["layers"][0]["intermediate"]
    assert kernel["kernel"].sharding.spec == PartitionSpec("fsdp", "tensor")
    mu = jax.tree.leaves(
        abstract["opt_state"], is_leaf=lambda s: hasattr(s, "mu") and hasattr(s, "nu")
    )
    adam = next(s for s in mu if hasattr(s, "mu"))
    layer = adam.mu["discriminator"]["deberta"]["encoder"]["layers"][0]["intermediate"]
    assert layer["kernel"].sharding.spec == PartitionSpec("fsdp", "tensor")
    assert abstract["step"].sharding.spec == PartitionSpec()


# ---- the train step -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)], ids=["data8", "fsdp8", "2x2x2"]
)
def test_same_losses_on_one_and_eight_devices(single, reference, shape):
    if shape == (2, 2, 2):
        # Created directly sharded: the same numbers as the single-device initialisation.
        runner = Runner(_config(), _mesh(*shape))
        jax.tree.map(np.testing.assert_array_equal, runner.initial, single.initial)
    else:
        runner = Runner(_config(), _mesh(*shape), initial=single.initial)
    _, history = runner.run(2)
    for ours, ref in zip(history, reference, strict=True):
        for key in ("loss", "mlm_loss", "rtd_loss", "grad_norm", "rtd_accuracy"):
            assert ours[key] == pytest.approx(ref[key], rel=1e-5), key


def test_metrics_are_complete_and_sane(reference):
    first = reference[0]
    assert set(first) == set(ts.TRAIN_METRICS)
    assert first["nonfinite"] == 0
    assert first["learning_rate"] == pytest.approx(3e-3 * (1 - 0 / 100))
    assert first["loss"] == pytest.approx(first["mlm_loss"] + 50.0 * first["rtd_loss"], rel=1e-6)
    # At initialisation the MLM loss is near log(vocab) and ~15% of tokens are replaced.
    assert abs(first["mlm_loss"] - np.log(128)) < 1.0
    assert 0.05 < first["replaced_fraction"] < 0.25


def test_loss_falls_on_a_repeated_batch(single):
    _, history = single.run(12)
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert history[-1]["mlm_loss"] < history[0]["mlm_loss"]


def test_nonfinite_loss_skips_the_update(single):
    state = jax.device_get(single.fresh())
    bias = state["params"]["discriminator"]["mask_predictions"]["classifier"]["bias"]
    bias.set_value(np.full(bias.get_value().shape, np.nan, np.float32))
    before = jax.tree.map(np.asarray, state)
    after, metrics = single.step(
        jax.device_put(state, single.shardings), _batch(), ts.step_rng(0, 0)
    )
    assert int(metrics["nonfinite"]) == 1
    after = jax.device_get(after)
    assert int(after["step"]) == 1  # the step counter still advances
    jax.tree.map(np.testing.assert_array_equal, after["params"], before["params"])
    jax.tree.map(np.testing.assert_array_equal, after["opt_state"], before["opt_state"])


def test_eval_step_matches_the_train_forward_and_changes_nothing(single, reference, evaluate):
    state = single.fresh()
    first = evaluate(state, _batch(), ts.step_rng(0, 0))
    again = evaluate(state, _batch(), ts.step_rng(0, 0))
    assert set(first) == set(ts.LOSS_METRICS)
    for key in ts.LOSS_METRICS:
        assert float(first[key]) == float(again[key])
        # Without dropout the eval forward is the train step's forward before its update.
        assert float(first[key]) == pytest.approx(reference[0][key], rel=1e-5), key


def test_gradient_accumulation_averages_the_micro_batches(single):
    config = _config(optimizer={"grad_accum_steps": 2})
    runner = Runner(config, single.mesh, initial=single.initial)
    _, history = runner.run(1)
    # Micro-batch i is rows i, i+2, ... with rng fold_in(rng, i); forward = eval without dropout.
    evaluate = ts.make_eval_step(config, single.mesh, runner.graphdef, runner.shardings)
    ids = _batch()["input_ids"]
    rng = ts.step_rng(0, 0)
    micro = [
        float(
            evaluate(runner.fresh(), {"input_ids": ids[i::2]}, jax.random.fold_in(rng, i))["loss"]
        )
        for i in range(2)
    ]
    assert history[0]["loss"] == pytest.approx(np.mean(micro), rel=1e-5)


def _forward(config):
    """(params, jit(params, rng -> metrics)) of the training forward (dropout as configured)."""
    graphdef, params = nnx.split(pair_lib.build_pair(config, 0), nnx.Param)
    ids = jnp.asarray(_batch()["input_ids"])

    @jax.jit
    def metrics(p, rng):
        return ts.electra_loss(nnx.merge(graphdef, p), ids, rng, config, train=True)[1]

    return params, metrics


def test_dropout_comes_from_the_step_rng_only():
    # The pair holds no rng state (build_pair checks it), so the step's rng is the only source.
    config = _config(model={"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1})
    params, metrics = _forward(config)
    first = float(metrics(params, ts.step_rng(0, 5))["loss"])
    assert first == float(metrics(params, ts.step_rng(0, 5))["loss"])
    assert first != float(metrics(params, ts.step_rng(0, 6))["loss"])


@pytest.fixture(scope="module")
def evaluate(single):
    return ts.make_eval_step(single.config, single.mesh, single.graphdef, single.shardings)


def test_bfloat16_compute_keeps_float32_weights(single, evaluate):
    config = _config(train={"dtype": "bfloat16"})
    graphdef, abstract, _ = state_lib.abstract_train_state(config, single.mesh)
    assert {x.dtype for x in jax.tree.leaves(abstract["params"])} == {jnp.dtype(jnp.float32)}
    rough_eval = ts.make_eval_step(config, single.mesh, graphdef, single.shardings)
    state, rng = single.fresh(), ts.step_rng(0, 0)
    exact, rough = evaluate(state, _batch(), rng), rough_eval(state, _batch(), rng)
    assert float(rough["mlm_loss"]) == pytest.approx(float(exact["mlm_loss"]), rel=0.02)
    assert float(rough["rtd_loss"]) == pytest.approx(float(exact["rtd_loss"]), rel=0.02)
    assert float(rough["loss"]) != float(exact["loss"])  # really computed in bfloat16


def test_bad_batches_and_configs_are_rejected(single):
    config = _config(optimizer={"grad_accum_steps": 2})
    mesh = _mesh(4)
    graphdef, abstract, _ = state_lib.abstract_train_state(config, mesh)
    step = ts.make_train_step(config, mesh, graphdef, state_lib.shardings_of(abstract))
    rows = jax.ShapeDtypeStruct((4, LENGTH), jnp.int32)  # 4 rows: 4 shards x 2 micro-batches
    with pytest.raises(ValueError, match="multiple of mesh.data x mesh.fsdp"):
        step.lower(abstract, {"input_ids": rows}, ts.step_rng(0, 0))
    with pytest.raises(ValueError, match="needs 'input_ids'"):
        step.lower(abstract, {"ids": rows}, ts.step_rng(0, 0))
    with pytest.raises(ConfigError, match="must exceed data.vocab_size"):
        state_lib.abstract_train_state(_config(model={"vocab_size": 120}), single.mesh)
