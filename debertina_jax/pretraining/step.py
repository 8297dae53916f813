"""The sharded, jitted pretraining step: mask -> generator -> MLM -> sample -> discriminator -> RTD
-> gradients -> AdamW, all inside one XLA program.

Only what runs under jit lives here; the train state (its form, initialisation and sharding)
is state.py's. The pair holds no rng state: dropout keys come from the step's `rng` argument
(use `step_rng(seed, step)`), so a resumed run replays exactly.

Batches are dicts of int32 arrays with at least "input_ids" [B, L] (padding = pad_token_id),
B the global batch; extra keys (the eval loader's "weights") are accepted and ignored: pad rows
are all padding and contribute nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from debertina_jax.config import Config
from debertina_jax.model.blocks import gather_positions
from debertina_jax.model.electra import ElectraPair
from debertina_jax.pretraining import losses
from debertina_jax.pretraining.masking import default_max_predictions, mask_tokens
from debertina_jax.pretraining.optimizer import current_learning_rates, group_norms, make_optimizer
from debertina_jax.pretraining.state import TrainState, ema_decay_at, merge_pair
from debertina_jax.runtime.sharding import batch_sharding, batch_shards

Metrics = dict[str, jax.Array]

# Fixed ids of the DeBERTa-v3 vocabulary (tokenizer.py): [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3;
# [MASK] = data.vocab_size, right after the SentencePiece pieces.
CLS_ID, SEP_ID, UNK_ID = 1, 2, 3

LOSS_METRICS = (
    "loss",
    "mlm_loss",
    "mlm_accuracy",
    "rtd_loss",
    "rtd_accuracy",
    "rtd_precision",
    "rtd_recall",
    "replaced_fraction",
)
TRAIN_METRICS = LOSS_METRICS + ("grad_norm", "learning_rate", "nonfinite")
# What a decoupled optimizer adds: each model's gradient norm (what its clip sees) and the
# discriminator's learning rate.
DECOUPLED_METRICS = (
    "generator_grad_norm",
    "discriminator_grad_norm",
    "discriminator_learning_rate",
)


def train_metric_names(config: Config) -> tuple[str, ...]:
    """The keys of the train step's metrics under `config`."""
    return TRAIN_METRICS + (DECOUPLED_METRICS if config.optimizer.decoupled else ())


def step_rng(seed: int, step: int | jax.Array) -> jax.Array:
    """The rng of train step `step`: a pure function of (seed, step), so resuming replays it."""
    return jax.random.fold_in(jax.random.key(seed), step)


def electra_loss(
    pair: ElectraPair, input_ids: jax.Array, rng: jax.Array, config: Config, *, train: bool
) -> tuple[jax.Array, Metrics]:
    """Total loss and the loss metrics of one batch [B, L]; dropout only when `train`."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    pad_id = _pad_id(config)
    attention_mask = (input_ids != pad_id).astype(jnp.int32)
    mask_key, sample_key, gen_key, disc_key = jax.random.split(rng, 4)
    data = config.data
    masked = mask_tokens(
        mask_key,
        input_ids,
        mask_id=data.vocab_size,
        pad_id=pad_id,
        special_ids=(CLS_ID, SEP_ID, UNK_ID),
        vocab_size=data.vocab_size,
        mask_prob=data.mask_prob,
        strategy=data.mask_strategy,
        max_predictions=data.max_predictions
        or default_max_predictions(input_ids.shape[1], data.mask_prob),
    )

    def dropout(key: jax.Array) -> nnx.Rngs | None:
        return nnx.Rngs(dropout=key) if train else None

    mlm_logits = pair.generator_logits(
        masked.input_ids, attention_mask, masked.positions, rngs=dropout(gen_key)
    )
    mlm_labels = gather_positions(input_ids, masked.positions)
    mlm_loss = losses.mlm_loss(mlm_logits, mlm_labels, masked.weights)

    samples = losses.sample_replacements(sample_key, mlm_logits, config.generator.temperature)
    disc_ids = losses.replace_positions(input_ids, masked.positions, samples, masked.weights)
    rtd_labels = losses.rtd_labels(disc_ids, input_ids)
    rtd_logits = pair.discriminator_logits(disc_ids, attention_mask, rngs=dropout(disc_key))
    rtd_loss = losses.rtd_loss(rtd_logits, rtd_labels, attention_mask)

    loss = losses.total_loss(mlm_loss, rtd_loss, config.train.rtd_weight)
    metrics = {
        "loss": loss,
        "mlm_loss": mlm_loss,
        "mlm_accuracy": losses.mlm_accuracy(mlm_logits, mlm_labels, masked.weights),
        "rtd_loss": rtd_loss,
        **losses.rtd_metrics(rtd_logits, rtd_labels, attention_mask),
    }
    return loss, metrics


def make_train_step(
    config: Config, mesh: Mesh, graphdef: nnx.GraphDef, state_shardings: Any
) -> Callable[[TrainState, dict[str, Any], jax.Array], tuple[TrainState, Metrics]]:
    """jit(step(state, batch, rng) -> (state, metrics)), state donated.

    Gradient accumulation: with optimizer.grad_accum_steps = k the global batch is split into
    k interleaved micro-batches (rows i, i+k, ...: each device keeps its own rows), their
    gradients and metrics are averaged, and one update is made.
    A non-finite loss or gradient norm skips the update: params, opt_state (and the EMA) come
    back unchanged, metrics["nonfinite"] = 1; "step" counts every call, skipped or not.
    With train.ema_decay the state's "ema" follows the parameters after each update
    (state.py: ema_decay_at).
    """
    tx = make_optimizer(config)
    accum = config.optimizer.grad_accum_steps

    def grads_and_metrics(params: nnx.State, ids: jax.Array, rng: jax.Array):
        def loss_fn(p):
            return electra_loss(nnx.merge(graphdef, p), ids, rng, config, train=True)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, metrics

    def step(state: TrainState, batch: dict[str, Any], rng: jax.Array):
        ids = _input_ids(batch, mesh, accum)
        params, opt_state = state["params"], state["opt_state"]
        if accum == 1:
            grads, metrics = grads_and_metrics(params, ids, rng)
        else:
            rows, length = ids.shape
            micro = ids.reshape(rows // accum, accum, length).swapaxes(0, 1)

            def body(total, xs):
                index, micro_ids = xs
                out = grads_and_metrics(params, micro_ids, jax.random.fold_in(rng, index))
                return jax.tree.map(jnp.add, total, out), None

            zeros = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype),
                jax.eval_shape(grads_and_metrics, params, micro[0], rng),
            )
            total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
            grads, metrics = jax.tree.map(lambda x: x / accum, total)

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        ema = state.get("ema")

        def update(_):
            updates, new_opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            if ema is None:
                return new_params, new_opt_state, None
            decay = ema_decay_at(config, state["step"])
            new_ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, new_params)
            return new_params, new_opt_state, new_ema

        params, opt_state, ema = jax.lax.cond(
            finite, update, lambda _: (params, opt_state, ema), None
        )
        metrics = {
            **metrics,
            "grad_norm": grad_norm,
            **current_learning_rates(opt_state),
            "nonfinite": (~finite).astype(jnp.int32),
        }
        if config.optimizer.decoupled:
            norms = group_norms(config, grads)
            metrics.update({f"{name}_grad_norm": norm for name, norm in norms.items()})
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        if ema is not None:
            new_state["ema"] = ema
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding(mesh), replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


def make_eval_step(
    config: Config, mesh: Mesh, graphdef: nnx.GraphDef, state_shardings: Any
) -> Callable[[TrainState, dict[str, Any], jax.Array], Metrics]:
    """jit(eval(state, batch, rng) -> loss metrics): no dropout, no update.

    Masking and sampling still draw from `rng`: pass the same rng per eval batch (e.g.
    step_rng(seed, batch_index)) to compare evaluations across training.
    """

    def evaluate(state: TrainState, batch: dict[str, Any], rng: jax.Array) -> Metrics:
        ids = _input_ids(batch, mesh, 1)
        _, metrics = electra_loss(merge_pair(graphdef, state), ids, rng, config, train=False)
        return metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        evaluate,
        in_shardings=(state_shardings, batch_sharding(mesh), replicated),
        out_shardings=replicated,
    )


def _pad_id(config: Config) -> int:
    return 0 if config.model.pad_token_id is None else config.model.pad_token_id


def _input_ids(batch: dict[str, Any], mesh: Mesh, accum: int) -> jax.Array:
    if "input_ids" not in batch:
        raise ValueError(f"a batch needs 'input_ids', got keys {sorted(batch)}")
    ids = batch["input_ids"]
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integer [batch, length], got {ids.dtype}{ids.shape}")
    per_micro = batch_shards(mesh) * accum
    if ids.shape[0] % per_micro:
        raise ValueError(
            f"batch size {ids.shape[0]} must be a multiple of mesh.data x mesh.fsdp "
            f"({batch_shards(mesh)}) x optimizer.grad_accum_steps ({accum})"
        )
    return ids.astype(jnp.int32)
