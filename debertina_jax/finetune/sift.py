"""SiFT, the scale-invariant adversarial fine-tuning of the DeBERTa paper (official code:
DeBERTa/sift/sift.py), as a loss added to the task loss.

The word vectors of a batch are normalised by a LayerNorm without affine parameters (so the
noise has the same scale for every model), a perturbation delta is added, and the sum goes
through the model in place of the word vectors:

1. delta ~ N(0, init^2), clipped to [-2 init, 2 init], per token and dimension;
2. one ascent step on the divergence of the perturbed logits from the clean ones (held fixed),
   with the parameters held fixed: delta += step_size * g / (1e-6 + max |g|) per vector;
3. the loss is the symmetric KL between the logits on the perturbed input and the clean logits,
   each direction's probabilities held constant, so its gradient reaches the parameters through
   both passes (the official `symmetric_kl`; written here as a true KL, the same gradient).

How the noise gets in: the model takes a per-call word table, so the perturbed vectors of the
[B, L] batch become a [B*L, E] table read by ids 0..B*L-1, and the model's own embedding
LayerNorm, mask and dropout apply to them as to real word vectors. For DeBERTa-v3 (no absolute
positions, no token types, no embedding projection) this is exactly the official hook before
`embeddings.LayerNorm`; with absolute positions or token types those are added after the noise.
Regression has one output, where a softmax divergence is always 0: it uses the squared
difference instead (the official code's "mse" option). Token classification averages over the
non-padding tokens; sequence tasks over the real rows of the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from debertina_jax.finetune.settings import SiftSettings

NORM_EPS = 1e-7  # the official perturbation LayerNorm's eps


def normalised_word_vectors(model: nnx.Module, input_ids: jax.Array) -> jax.Array:
    """LayerNorm (no scale or bias) of the word vectors of `input_ids`: [B, L, E] float32."""
    table = model.deberta.embeddings.word_embeddings.embedding[...]
    x = jnp.take(table, input_ids, axis=0).astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + NORM_EPS)


def logits_from_vectors(
    model: nnx.Module, vectors: jax.Array, batch: dict, key: jax.Array
) -> jax.Array:
    """The model's logits (train mode, dropout from `key`) with `vectors` [B, L, E] as the
    word vectors of the batch."""
    b, length, e = vectors.shape
    positions = jnp.arange(b * length, dtype=jnp.int32).reshape(b, length)
    return model(
        positions,
        batch["attention_mask"],
        batch["token_type_ids"],
        word_embeddings=vectors.reshape(b * length, e),
        deterministic=False,
        rngs=nnx.Rngs(dropout=key),
    )


def _row_weights(logits: jax.Array, batch: dict) -> jax.Array:
    if logits.ndim == 3:  # token classification: real tokens of real rows
        return batch["attention_mask"].astype(jnp.float32) * batch["weights"][:, None]
    return batch["weights"]


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def divergence(perturbed: jax.Array, clean: jax.Array, *, both: bool) -> jax.Array:
    """Per-row divergence. both=False: KL(p_clean || p_perturbed) with p_clean constant (the
    ascent objective); both=True: the symmetric KL, each side's probabilities constant."""
    if perturbed.shape[-1] == 1:
        diff = perturbed[..., 0] - (clean[..., 0] if both else jax.lax.stop_gradient(clean[..., 0]))
        return jnp.square(diff)
    log_p = jax.nn.log_softmax(perturbed.astype(jnp.float32), -1)
    log_q = jax.nn.log_softmax(clean.astype(jnp.float32), -1)
    sg = jax.lax.stop_gradient
    forward = jnp.sum(jnp.exp(sg(log_q)) * (sg(log_q) - log_p), -1)
    if not both:
        return forward
    backward = jnp.sum(jnp.exp(sg(log_p)) * (sg(log_p) - log_q), -1)
    return forward + backward


def sift_loss(
    model: nnx.Module,
    batch: dict,
    clean_logits: jax.Array,
    key: jax.Array,
    settings: SiftSettings,
) -> jax.Array:
    """The SiFT loss of one batch (see the module doc); differentiate it with the task loss."""
    noise_key, ascent_key, final_key = jax.random.split(key, 3)
    base = jax.lax.stop_gradient(normalised_word_vectors(model, batch["input_ids"]))
    init = settings.init_perturbation
    delta = jnp.clip(init * jax.random.normal(noise_key, base.shape), -2 * init, 2 * init)
    weights = _row_weights(clean_logits, batch)
    target = jax.lax.stop_gradient(clean_logits)

    def ascent_objective(d: jax.Array) -> jax.Array:
        # Only delta is differentiated here; the step below is cut from the parameters'
        # gradient by stop_gradient, so the parameters act as constants.
        logits = logits_from_vectors(model, base + d, batch, ascent_key)
        return jnp.sum(divergence(logits, target, both=False) * weights)

    grad = jax.grad(ascent_objective)(delta)
    step = grad / (1e-6 + jnp.max(jnp.abs(grad), axis=-1, keepdims=True))
    finite = jnp.all(jnp.isfinite(grad))
    delta = jax.lax.stop_gradient(jnp.where(finite, delta + settings.step_size * step, delta))
    logits = logits_from_vectors(model, base + delta, batch, final_key)
    return _weighted_mean(divergence(logits, clean_logits, both=True), weights)
