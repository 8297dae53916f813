"""Encoded examples -> fixed-size padded batches of NumPy arrays.

Every batch has exactly `batch_size` rows (a short last batch is filled with empty rows of
weight 0, which the losses and metrics skip), and its length is padded up to a power of two
(at least 16, at most max_length), so a whole fine-tuning run compiles a handful of shapes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from debertina_jax.finetune.encoding import IGNORE, Encoded

Batch = dict[str, np.ndarray]
MIN_LENGTH = 16


def padded_length(longest: int, max_length: int) -> int:
    """The smallest power of two >= longest (and >= MIN_LENGTH), capped at max_length."""
    length = MIN_LENGTH
    while length < longest:
        length *= 2
    return min(length, max(max_length, longest))


def make_batch(data: Encoded, rows: np.ndarray, batch_size: int, max_length: int, pad_id: int):
    """The batch of `rows` (indices into `data`), padded to `batch_size` rows."""
    width = padded_length(max(len(data.input_ids[i]) for i in rows), max_length)
    ids = np.full((batch_size, width), pad_id, np.int32)
    types = np.zeros((batch_size, width), np.int32)
    mask = np.zeros((batch_size, width), np.int32)
    weights = np.zeros((batch_size,), np.float32)
    token_labels = isinstance(data.labels, list)
    if token_labels:
        labels = np.full((batch_size, width), IGNORE, np.int32)
    else:
        labels = np.zeros((batch_size,), data.labels.dtype)
    for slot, i in enumerate(rows):
        n = len(data.input_ids[i])
        ids[slot, :n] = data.input_ids[i]
        types[slot, :n] = data.type_ids[i]
        mask[slot, :n] = 1
        weights[slot] = 1.0
        if token_labels:
            labels[slot, :n] = data.labels[i]
        else:
            labels[slot] = data.labels[i]
    return {
        "input_ids": ids,
        "token_type_ids": types,
        "attention_mask": mask,
        "labels": labels,
        "weights": weights,
    }


def train_batches(
    data: Encoded, batch_size: int, max_length: int, pad_id: int, seed: int, epoch: int
) -> Iterator[Batch]:
    """One epoch in an order shuffled by (seed, epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(data))
    for start in range(0, len(order), batch_size):
        yield make_batch(data, order[start : start + batch_size], batch_size, max_length, pad_id)


def eval_batches(
    data: Encoded, batch_size: int, max_length: int, pad_id: int
) -> Iterator[tuple[np.ndarray, Batch]]:
    """(row indices, batch) in file order."""
    order = np.arange(len(data))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        yield rows, make_batch(data, rows, batch_size, max_length, pad_id)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return -(-num_examples // batch_size)
