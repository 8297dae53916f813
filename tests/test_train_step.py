"""The mesh, state shardings and the jitted train / eval steps on 1 and 8 simulated devices."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from debertina_jax.config import MeshConfig, config_from_dict
from debertina_jax.config.model import ConfigError
from debertina_jax.pretraining import optimizer as optimizer_lib
from debertina_jax.pretraining import pair as pair_lib
from debertina_jax.pretraining import state as state_lib
from debertina_jax.pretraining import step as ts
from debertina_jax.runtime import sharding

BATCH, LENGTH = 8, 16


def _config(train=None, optimizer=None, model=None, mesh=None, generator=None, data=None):
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
            "generator": {"num_hidden_layers": 1, **(generator or {})},
            "data": {"vocab_size": 120, "max_seq_length": LENGTH, **(data or {})},
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


def test_enhanced_mask_decoder_trains(single):
    # A 2-layer generator whose last layer is the EMD's (test_gdes.py checks its formula).
    config = _config(generator={"num_hidden_layers": 2, "enhanced_mask_decoder": True})
    _, history = Runner(config, single.mesh).run(12)
    assert all(h["nonfinite"] == 0 for h in history)
    # Measured: loss 39.6 -> 31.8 in 12 steps; the MLM loss is noisy step to step (new masks
    # each step), its mean over the first and last 3 steps 4.83 -> 4.65.
    mlm = [h["mlm_loss"] for h in history]
    assert np.mean(mlm[-3:]) < np.mean(mlm[:3]) - 0.08
    assert history[-1]["loss"] < 0.88 * history[0]["loss"]


def test_bert_masking_strategy_trains(single, reference):
    # 80/10/10: some masked positions keep their token or get a random one (test_masking.py
    # checks the proportions); here the strategy runs inside the step and learns.
    config = _config(data={"mask_strategy": "bert"})
    _, history = Runner(config, single.mesh, initial=single.initial).run(8)
    assert all(h["nonfinite"] == 0 for h in history)
    assert history[0]["mlm_loss"] != reference[0]["mlm_loss"]  # another input than "mask"
    assert 0.02 < history[0]["replaced_fraction"] < 0.25
    assert history[-1]["loss"] < 0.93 * history[0]["loss"]  # measured 39.5 -> 34.8 in 8 steps


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


def _micro_batch_gradients(runner, batch, rng, accum):
    """(loss, d loss / d params) of each micro-batch, computed apart from the step: micro-batch
    i is rows i, i + accum, ... with rng fold_in(rng, i) (the step's contract)."""
    config, graphdef = runner.config, runner.graphdef

    @jax.jit
    def loss_and_grad(params, ids, key):
        def loss(p):
            return ts.electra_loss(nnx.merge(graphdef, p), ids, key, config, train=True)[0]

        return jax.value_and_grad(loss)(params)

    ids = batch["input_ids"]
    params = runner.initial["params"]
    # On the host: the test's own arithmetic on them then compiles nothing per leaf.
    return [
        jax.device_get(loss_and_grad(params, ids[i::accum], jax.random.fold_in(rng, i)))
        for i in range(accum)
    ]


def test_gradient_accumulation_updates_with_the_mean_micro_batch_gradient(single):
    # A clip of 1e6 never acts (and keeps the initial state's optimizer structure): clipping and
    # Adam's normalisation would hide a summed gradient, but Adam's first moment after one
    # update is exactly (1 - b1) x the gradient it was given, and grad_norm is its norm.
    config = _config(optimizer={"grad_accum_steps": 2, "clip_norm": 1e6})
    runner = Runner(config, single.mesh, initial=single.initial)
    batch, rng = _batch(), ts.step_rng(0, 0)
    after, metrics = runner.step(runner.fresh(), batch, rng)
    after = jax.device_get(after)
    micro = _micro_batch_gradients(runner, batch, rng, 2)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, micro[0][1], micro[1][1])

    assert float(metrics["loss"]) == pytest.approx(np.mean([float(m[0]) for m in micro]), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(mean)), rel=1e-5)
    scale = float(max(np.abs(g).max() for g in jax.tree.leaves(mean)))
    mu = optax.tree_utils.tree_get(after["opt_state"], "mu")
    for got, grad in zip(jax.tree.leaves(mu), jax.tree.leaves(mean), strict=True):
        np.testing.assert_allclose(got, 0.1 * np.asarray(grad), rtol=1e-4, atol=1e-6 * scale)
    # The parameters are one optax update with the mean gradient.
    tx = optimizer_lib.make_optimizer(config)
    initial = runner.initial

    @jax.jit  # one program, not one per leaf and operation
    def update(grads, opt_state, params):
        return optax.apply_updates(params, tx.update(grads, opt_state, params)[0])

    expected = update(mean, initial["opt_state"], initial["params"])
    for got, want in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


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


@pytest.fixture(scope="module")
def bfloat16(single):
    """The train step in bfloat16 compute, from the same float32 initial state."""
    return Runner(_config(train={"dtype": "bfloat16"}), single.mesh, initial=single.initial)


# |bf16 - f32| / f32 of the losses of the first two steps: measured worst 3.2e-5 (rtd_loss,
# step 1) on 2026-12-01; 5x headroom, rounded up.
BF16_LOSS_REL = 2e-4


def test_bfloat16_train_steps_keep_float32_weights_and_track_float32(reference, bfloat16):
    state, history = bfloat16.run(2)
    state = jax.device_get(state)
    float_leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert {x.dtype for x in float_leaves} == {jnp.dtype(jnp.float32)}  # master weights, moments
    moved = jax.tree.map(
        lambda a, b: np.abs(a - b).max(), state["params"], bfloat16.initial["params"]
    )
    assert max(jax.tree.leaves(moved)) > 0  # two updates really happened
    for ours, ref in zip(history, reference, strict=True):
        assert ours["nonfinite"] == 0
        for key in ("loss", "mlm_loss", "rtd_loss"):
            rel = abs(ours[key] - ref[key]) / abs(ref[key])
            print(f"\nbfloat16 train step | {key} | rel diff {rel:.2e}")
            assert rel <= BF16_LOSS_REL, key
        assert ours["loss"] != ref["loss"]  # really computed in bfloat16


_TYPE = re.compile(r"tensor<(?:\d+x)*([a-z]+\d*)>")


def _ops(text, op):
    """(operand element types, result element types, line) of each `stablehlo.<op>` with
    typed operands in a lowered program."""
    found = []
    for line in text.splitlines():
        if f"stablehlo.{op}" in line and " : " in line:
            signature = line.rsplit(" : ", 1)[1]
            operands, _, result = signature.partition("->")
            found.append((set(_TYPE.findall(operands)), set(_TYPE.findall(result)), line))
    return found


def _lowered_text(fn, runner):
    return fn.lower(runner.initial, _batch(), ts.step_rng(0, 0)).as_text()


def test_bfloat16_forward_runs_matmuls_in_bfloat16_and_softmax_and_layer_norm_in_float32(
    bfloat16,
):
    # The eval step is the train step's forward (without dropout), alone in its program.
    evaluate = ts.make_eval_step(
        bfloat16.config, bfloat16.mesh, bfloat16.graphdef, bfloat16.shardings
    )
    text = _lowered_text(evaluate, bfloat16)
    dots = _ops(text, "dot_general")
    assert len(dots) >= 20
    for operands, _, line in dots:  # results may be float32 (the heads' logits)
        assert operands == {"bf16"}, line
    exps = _ops(text, "exponential")
    attention = [e for e in exps if f"x{LENGTH}x{LENGTH}x" in e[2]]
    assert len(attention) == 2  # one softmax per attention layer: generator, discriminator
    for operands, _, line in exps:
        assert operands == {"f32"}, line
    norms = _ops(text, "rsqrt")  # one per LayerNorm: embeddings, rel table, 2 per layer, heads
    assert len(norms) >= 8
    for operands, _, line in norms + _ops(text, "reduce"):
        assert operands <= {"f32", "i32", "i1"}, line  # no statistic summed in bfloat16


def test_bfloat16_train_program_runs_its_matmuls_in_bfloat16(bfloat16):
    text = _lowered_text(bfloat16.step, bfloat16)
    dots = _ops(text, "dot_general")
    in_float32 = [line for operands, _, line in dots if "bf16" not in operands]
    # Backward included: three matmuls per forward one. The only float32 ones are the two
    # gradients of the MLM head's vocabulary projection, whose float32 logits send a float32
    # cotangent back (vocab 128 in every such shape).
    assert len(dots) >= 60
    assert len(in_float32) <= 2 and all("x128x" in line for line in in_float32), in_float32
    for operands, _, line in _ops(text, "exponential"):
        if f"x{LENGTH}x{LENGTH}x" in line:  # attention probabilities
            assert operands == {"f32"}, line


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
