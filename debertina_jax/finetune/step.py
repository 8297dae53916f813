"""The jitted fine-tuning step and the prediction function, on the device mesh.

State: {"params": nnx.State of the task model's Params, "opt_state": optax state}, laid out
by the parameters' logical axes and `mesh.rules` (as in pretraining); batches are split over
the mesh's data and fsdp axes. Losses are HF's: cross-entropy for classification (per token,
ignoring label -100, for token classification), mean squared error for regression; rows of
weight 0 (batch padding) count for nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from debertina_jax.finetune.encoding import IGNORE
from debertina_jax.finetune.settings import SiftSettings
from debertina_jax.finetune.sift import sift_loss
from debertina_jax.pretraining.optimizer import current_learning_rate
from debertina_jax.runtime.sharding import batch_sharding, state_shardings

State = dict[str, Any]


def task_loss(logits: jax.Array, batch: dict, task_type: str) -> jax.Array:
    labels, weights = batch["labels"], batch["weights"]
    if task_type == "regression":
        per_row = jnp.square(logits[:, 0] - labels.astype(jnp.float32))
        return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    if task_type == "classification":
        per_row = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    valid = (labels != IGNORE).astype(jnp.float32)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    return jnp.sum(per_token * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def _forward(model: nnx.Module, batch: dict, **kwargs: Any) -> jax.Array:
    return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], **kwargs)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"the task model holds non-parameter state the step would drop: {rest}")
    return graphdef, params


def place_state(
    params: nnx.State, tx: optax.GradientTransformation, mesh: Mesh, rules: Any
) -> tuple[State, Any]:
    """The train state on `mesh` (parameters laid out by their logical axes) and its shardings."""
    shapes = jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p)}, params)
    shardings = state_shardings(shapes, mesh, rules)
    placed = jax.device_put(params, shardings["params"])
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(placed)
    return {"params": placed, "opt_state": opt_state}, shardings


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    task_type: str,
    sift: SiftSettings,
    mesh: Mesh,
    shardings: Any,
) -> Callable[[State, dict, jax.Array], tuple[State, dict]]:
    """jit(step(state, batch, rng) -> (state, metrics)), the state donated. A non-finite loss
    or gradient skips the update (metrics["nonfinite"] = 1)."""

    def loss_fn(params: nnx.State, batch: dict, rng: jax.Array):
        model = nnx.merge(graphdef, params)
        dropout_key, sift_key = jax.random.split(rng)
        logits = _forward(model, batch, deterministic=False, rngs=nnx.Rngs(dropout=dropout_key))
        loss = task_loss(logits, batch, task_type)
        metrics = {"task_loss": loss}
        if sift.enabled:
            adversarial = sift_loss(model, batch, logits, sift_key, sift)
            metrics["sift_loss"] = adversarial
            loss = loss + sift.weight * adversarial
        return loss, {"loss": loss, **metrics}

    def step(state: State, batch: dict, rng: jax.Array):
        params, opt_state = state["params"], state["opt_state"]
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(_):
            updates, new_opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt_state

        params, opt_state = jax.lax.cond(finite, update, lambda _: (params, opt_state), None)
        metrics = {
            **metrics,
            "grad_norm": grad_norm,
            "learning_rate": current_learning_rate(opt_state),
            "nonfinite": (~finite).astype(jnp.int32),
        }
        return {"params": params, "opt_state": opt_state}, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(shardings, batch_sharding(mesh), replicated),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )


def make_predict(
    graphdef: nnx.GraphDef, mesh: Mesh, params_shardings: Any
) -> Callable[[nnx.State, dict], jax.Array]:
    """jit(predict(params, batch) -> float32 logits), no dropout."""

    def predict(params: nnx.State, batch: dict) -> jax.Array:
        return _forward(nnx.merge(graphdef, params), batch)

    return jax.jit(
        predict,
        in_shardings=(params_shardings, batch_sharding(mesh)),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
    )
