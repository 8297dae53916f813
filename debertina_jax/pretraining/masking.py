"""Choosing and corrupting the tokens the generator must predict, on device, inside the train step.

How many: as in the official DeBERTa-v3 RTD task (NGramMaskGenerator with max_gram=1,
mask_prob=1, keep_prob=0), a sequence of n non-padding tokens ([CLS] and [SEP] included) gets
exactly max(1, round(mask_prob * n)) predictions, never more than it has maskable tokens and
never more than `max_predictions`. Special tokens and padding are never chosen.

Which: a uniformly random subset of that size. The official code instead takes one token from
each window of int(1 / mask_prob) = 6 maskable tokens, left to right, and stops at the count;
since 1/6 > 0.15, the last windows of a long line are never masked (about the final 48 tokens
of a 512-token line). Uniform choice keeps the count and drops that positional bias.

How: strategy "mask" (official v3) replaces every chosen token with [MASK]; "bert" uses BERT's
80% [MASK] / 10% random non-special token / 10% unchanged.

With `max_predictions` set, the chosen positions also come as a fixed-size list `positions`
[B, P] (sorted, unused slots point at 0 with weight 0), so the vocabulary projection can run
on `gather_positions(hidden, positions)` instead of on every token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("mask", "bert")


class MaskedBatch(NamedTuple):
    input_ids: jax.Array  # int32 [B, L], chosen tokens corrupted
    labels: jax.Array  # int32 [B, L], the original ids
    is_masked: jax.Array  # bool [B, L], the tokens the MLM loss is computed on
    positions: jax.Array | None = None  # int32 [B, P], only with max_predictions
    weights: jax.Array | None = None  # float32 [B, P], 1 for a real prediction, 0 for a free slot


def mask_tokens(
    rng: jax.Array,
    input_ids: jax.Array,
    *,
    mask_id: int,
    pad_id: int,
    special_ids: Sequence[int],
    vocab_size: int | None = None,
    mask_prob: float = 0.15,
    strategy: str = "mask",
    max_predictions: int | None = None,
) -> MaskedBatch:
    """Chooses and corrupts the tokens to predict in a batch of int32 ids [B, L].

    `special_ids` are never chosen (pass [CLS], [SEP], [UNK]; pad_id and mask_id are added).
    `vocab_size` is the number of token ids the "bert" strategy may draw from, [0, vocab_size)
    minus the special ones. All keyword arguments are static (Python values) under `jax.jit`.
    """
    _check_args(input_ids, mask_prob, strategy, vocab_size, max_predictions)
    batch, length = input_ids.shape
    excluded = tuple(sorted({int(pad_id), int(mask_id), *map(int, special_ids)}))
    maskable = ~jnp.isin(input_ids, jnp.asarray(excluded, dtype=input_ids.dtype))
    num_tokens = jnp.sum(input_ids != pad_id, axis=1)
    count = jnp.asarray(_prediction_counts(length, mask_prob))[num_tokens]
    num_slots = length if max_predictions is None else max_predictions
    count = jnp.minimum(jnp.minimum(count, jnp.sum(maskable, axis=1)), num_slots)

    choose_rng, replace_rng, token_rng = jax.random.split(rng, 3)
    # The `count` highest random scores among maskable tokens; others score below every draw.
    # Sorts rather than top_k + scatter: XLA partitions a sort along the (sharded) batch axis,
    # while its top_k and scatter gather the whole batch onto every device.
    scores = jnp.where(maskable, jax.random.uniform(choose_rng, (batch, length)), -1.0)
    order = jnp.argsort(-scores, axis=1, stable=True)  # positions, best score first
    rank = jnp.argsort(order, axis=1, stable=True)  # each position's place in `order`
    is_masked = rank < count[:, None]
    used = jnp.arange(num_slots)[None, :] < count[:, None]
    # Sorted positions make the later gathers read memory in order; free slots go last.
    positions = jnp.sort(jnp.where(used, order[:, :num_slots], length), axis=1)
    weights = positions < length

    corrupted = jnp.where(is_masked, jnp.asarray(mask_id, input_ids.dtype), input_ids)
    if strategy == "bert":
        u = jax.random.uniform(replace_rng, (batch, length))
        random_ids = _random_regular_ids(token_rng, (batch, length), vocab_size, excluded)
        corrupted = jnp.where(is_masked & (u >= 0.8), random_ids.astype(input_ids.dtype), corrupted)
        corrupted = jnp.where(is_masked & (u >= 0.9), input_ids, corrupted)

    if max_predictions is None:
        return MaskedBatch(corrupted, input_ids, is_masked)
    positions = jnp.where(weights, positions, 0).astype(jnp.int32)
    return MaskedBatch(corrupted, input_ids, is_masked, positions, weights.astype(jnp.float32))


def default_max_predictions(max_seq_length: int, mask_prob: float = 0.15, multiple: int = 8) -> int:
    """ceil(mask_prob * L) rounded up to `multiple` (a TPU-friendly size), at most L.

    Never smaller than the count `mask_tokens` picks for a full line, so nothing is dropped.
    """
    return min(
        max_seq_length, math.ceil(math.ceil(mask_prob * max_seq_length) / multiple) * multiple
    )


def _prediction_counts(length: int, mask_prob: float) -> np.ndarray:
    # Python's round (half to even, in float64) as in the official code; a table indexed by the
    # number of tokens keeps the float64 arithmetic out of the traced computation.
    counts = [0] + [max(1, round(n * mask_prob)) for n in range(1, length + 1)]
    return np.asarray(counts, dtype=np.int32)


def _random_regular_ids(
    rng: jax.Array, shape: tuple[int, ...], vocab_size: int, excluded: tuple[int, ...]
) -> jax.Array:
    """Uniform over [0, vocab_size) minus `excluded` (sorted): draw an index into the allowed ids
    and step over each excluded id at or below it."""
    skip = [s for s in excluded if s < vocab_size]
    if vocab_size - len(skip) < 1:
        raise ValueError(f"vocab_size {vocab_size} leaves no regular token outside {excluded}")
    ids = jax.random.randint(rng, shape, 0, vocab_size - len(skip), dtype=jnp.int32)
    for s in skip:
        ids = ids + (ids >= s)
    return ids


def _check_args(
    input_ids: jax.Array,
    mask_prob: float,
    strategy: str,
    vocab_size: int | None,
    max_predictions: int | None,
) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must hold integer ids, got dtype {input_ids.dtype}")
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "bert" and vocab_size is None:
        raise ValueError("strategy 'bert' needs vocab_size, the range random tokens come from")
    if max_predictions is not None and not 1 <= max_predictions <= input_ids.shape[1]:
        raise ValueError(
            f"max_predictions must be in [1, sequence length {input_ids.shape[1]}], "
            f"got {max_predictions}"
        )
