"""Task metrics, computed on the host in NumPy: accuracy and macro F1 (classification), Pearson
and MSE (regression), entity-level precision/recall/F1 for BIO tags (token classification).

Entities follow the CoNLL evaluation script's reading of BIO tags: an entity starts at B-X, or
at I-X when the previous tag is O or of another type; it ends before O, B-* or a tag of another
type. A predicted entity counts only when its type, start and end all match a gold one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Which direction is better, for early stopping and for picking the best seed.
HIGHER_IS_BETTER = {
    "accuracy": True,
    "macro_f1": True,
    "pearson": True,
    "mse": False,
    "precision": True,
    "recall": True,
    "f1": True,
}
TASK_METRICS = {
    "classification": ("accuracy", "macro_f1"),
    "regression": ("pearson", "mse"),
    "token-classification": ("f1", "precision", "recall", "accuracy"),
}


def seed_std(values: Sequence[float]) -> float:
    """The spread reported over fine-tuning seeds: sample standard deviation (ddof 1), 0 for
    one seed."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def accuracy(predicted: np.ndarray, gold: np.ndarray) -> float:
    predicted, gold = np.asarray(predicted), np.asarray(gold)
    return float(np.mean(predicted == gold)) if gold.size else math.nan


def macro_f1(predicted: np.ndarray, gold: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes seen in `gold` or `predicted`."""
    predicted, gold = np.asarray(predicted), np.asarray(gold)
    classes = np.union1d(np.unique(gold), np.unique(predicted))
    if classes.size == 0:
        return math.nan
    scores = []
    for c in classes:
        tp = np.sum((predicted == c) & (gold == c))
        fp = np.sum((predicted == c) & (gold != c))
        fn = np.sum((predicted != c) & (gold == c))
        scores.append(_f1(tp, fp, fn))
    return float(np.mean(scores))


def pearson(predicted: np.ndarray, gold: np.ndarray) -> float:
    """Pearson's r; NaN when either side is constant (r is undefined there)."""
    x = np.asarray(predicted, np.float64)
    y = np.asarray(gold, np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(np.sum(x * x)) * float(np.sum(y * y)))
    return float(np.sum(x * y) / denominator) if denominator > 0 else math.nan


def mse(predicted: np.ndarray, gold: np.ndarray) -> float:
    diff = np.asarray(predicted, np.float64) - np.asarray(gold, np.float64)
    return float(np.mean(diff * diff)) if diff.size else math.nan


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) of every entity in one BIO tag sequence; end is exclusive."""
    found = set()
    kind, start = None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, name = _split_tag(tag)
        begins = prefix == "B" or (prefix == "I" and name != kind)
        if kind is not None and (prefix == "O" or begins):
            found.add((kind, start, i))
            kind = None
        if begins:
            kind, start = name, i
    return found


def _split_tag(tag: str) -> tuple[str, str | None]:
    """("B" | "I" | "O", entity type); a bare type name without a prefix reads as I-type."""
    if tag == "O":
        return "O", None
    prefix, sep, name = tag.partition("-")
    if sep and prefix in ("B", "I"):
        return prefix, name
    return "I", tag


def entity_scores(
    predicted: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Micro-averaged entity precision, recall and F1 over sentences, plus tag accuracy."""
    tp = fp = fn = 0
    right = total = 0
    for p, g in zip(predicted, gold, strict=True):
        if len(p) != len(g):
            raise ValueError(f"a sentence has {len(g)} gold tags but {len(p)} predictions")
        pe, ge = entities(p), entities(g)
        tp += len(pe & ge)
        fp += len(pe - ge)
        fn += len(ge - pe)
        right += sum(a == b for a, b in zip(p, g, strict=True))
        total += len(g)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": _f1(tp, fp, fn),
        "accuracy": right / total if total else math.nan,
    }


def _f1(tp: float, fp: float, fn: float) -> float:
    return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Whether `value` improves on `best` for `metric` (NaN never does)."""
    if value is None or math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best if HIGHER_IS_BETTER[metric] else value < best
