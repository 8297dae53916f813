"""Predictions on a split and the task's metrics on them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from debertina_jax.finetune import metrics as m
from debertina_jax.finetune.batching import eval_batches
from debertina_jax.finetune.encoding import Encoded
from debertina_jax.finetune.examples import Examples

OUTSIDE = "O"


def predict_logits(
    predict: Callable, params: Any, data: Encoded, batch_size: int, max_length: int, pad_id: int
) -> list[np.ndarray]:
    """Float32 logits per example: [C] for sequence tasks, [length, C] for token tasks."""
    out: list[np.ndarray] = [None] * len(data)  # type: ignore[list-item]
    for rows, batch in eval_batches(data, batch_size, max_length, pad_id):
        logits = np.asarray(jax.device_get(predict(params, batch)), np.float32)
        for slot, i in enumerate(rows):
            out[i] = logits[slot, : len(data.input_ids[i])] if logits.ndim == 3 else logits[slot]
    return out


def predictions(
    logits: list[np.ndarray], data: Encoded, task_type: str, label_names: Sequence[str]
) -> list[Any]:
    """Per example: a label name, a float, or one tag per word (O for words cut off)."""
    if task_type == "regression":
        return [float(x[0]) for x in logits]
    if task_type == "classification":
        return [label_names[int(np.argmax(x))] for x in logits]
    out = []
    for x, positions in zip(logits, data.word_positions, strict=True):
        best = np.argmax(x, axis=-1)
        out.append([label_names[best[p]] if p >= 0 else OUTSIDE for p in positions])
    return out


def score(predicted: list[Any], examples: Examples, task_type: str) -> dict[str, float]:
    """All the metrics of the task type (metrics.TASK_METRICS)."""
    gold = examples.labels
    if task_type == "token-classification":
        return m.entity_scores(predicted, gold)
    if task_type == "regression":
        p, g = np.asarray(predicted), np.asarray(gold)
        return {"pearson": m.pearson(p, g), "mse": m.mse(p, g)}
    p, g = np.asarray(predicted, dtype=object), np.asarray(gold, dtype=object)
    return {"accuracy": m.accuracy(p, g), "macro_f1": m.macro_f1(p.astype(str), g.astype(str))}
