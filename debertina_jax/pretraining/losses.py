"""The ELECTRA / DeBERTa-v3 objective as pure functions: generator MLM, discriminator RTD.

Shapes: B batch, L sequence, P masked positions per row (a fixed budget, padded with weight 0),
V vocabulary. Every mean divides by a count clamped to at least 1, so an all-padding batch gives
0 instead of NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    return num / jnp.maximum(den, 1.0)


def mlm_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted mean cross-entropy of [B, P, V] logits against [B, P] original token ids."""
    logits = logits.astype(jnp.float32)  # log-softmax over a big vocab is fragile in bfloat16
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    return _safe_div(jnp.sum(nll * weights), jnp.sum(weights))


def mlm_accuracy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Fraction of real (weight > 0) masked positions whose arg-max is the original token."""
    hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    return _safe_div(jnp.sum(hit * weights), jnp.sum(weights))


def sample_replacements(rng: jax.Array, logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Token ids drawn from softmax(logits / temperature), one per position.

    The generator is trained by its MLM loss only. Integer draws carry no gradient anyway; the
    stop_gradient states the intent and keeps the tempered softmax out of the backward pass.
    """
    logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
    return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)


def replace_positions(
    input_ids: jax.Array, positions: jax.Array, new_ids: jax.Array, weights: jax.Array
) -> jax.Array:
    """Writes [B, P] `new_ids` into [B, L] `input_ids` at `positions` where weights > 0.

    Padding slots (weight 0) are sent out of range and dropped, so whatever index they carry
    (masking pads them with 0, the [CLS] slot) can never overwrite a real token.
    """
    length = input_ids.shape[1]
    positions = jnp.where(weights > 0, positions, length)
    rows = jnp.arange(input_ids.shape[0])[:, None]
    new_ids = new_ids.astype(input_ids.dtype)
    return input_ids.at[rows, positions].set(new_ids, mode="drop")


def rtd_labels(discriminator_ids: jax.Array, original_ids: jax.Array) -> jax.Array:
    """1 where the discriminator sees a token that differs from the original, else 0.

    A sample that happens to equal the original token is "original" (DeBERTa-v3 and ELECTRA),
    so the label depends on the token, not on whether the position was masked.
    """
    return (discriminator_ids != original_ids).astype(jnp.int32)


def rtd_loss(logits: jax.Array, labels: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Binary cross-entropy of [B, L] logits, averaged over non-padding tokens."""
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.float32)
    # log(1 + e^x) - y x is the numerically stable form of BCE with logits.
    bce = jax.nn.softplus(logits) - labels * logits
    mask = attention_mask.astype(jnp.float32)
    return _safe_div(jnp.sum(bce * mask), jnp.sum(mask))


def rtd_metrics(
    logits: jax.Array, labels: jax.Array, attention_mask: jax.Array
) -> dict[str, jax.Array]:
    """Accuracy over non-padding tokens; precision and recall of the "replaced" class.

    Precision is 0 when nothing is predicted replaced, recall is 0 when nothing was replaced.
    """
    mask = attention_mask.astype(jnp.float32)
    predicted = (logits > 0).astype(jnp.float32) * mask
    actual = labels.astype(jnp.float32) * mask
    correct = (predicted == actual).astype(jnp.float32) * mask
    true_pos = jnp.sum(predicted * actual)
    return {
        "rtd_accuracy": _safe_div(jnp.sum(correct), jnp.sum(mask)),
        "rtd_precision": _safe_div(true_pos, jnp.sum(predicted)),
        "rtd_recall": _safe_div(true_pos, jnp.sum(actual)),
        "replaced_fraction": _safe_div(jnp.sum(actual), jnp.sum(mask)),
    }


def total_loss(mlm: jax.Array, rtd: jax.Array, rtd_weight: float) -> jax.Array:
    """loss = MLM + lambda * RTD (lambda = 50 in the DeBERTa-v3 paper and ELECTRA)."""
    return mlm + rtd_weight * rtd
