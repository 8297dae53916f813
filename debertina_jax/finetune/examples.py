"""Rows of a task file -> examples: the text (one field, a pair of fields, or a word list) and the
label (a class name, a float, or one tag per word), with every problem reported by file and row.

Class labels are kept as strings, whatever the file stores (CSV "1", JSON 1 and 1.0 are the same
label "1"), so that files of different formats agree. With `class_names` (named tasks whose
labels are stored as class indices) an integer or boolean label is the index of its name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from debertina_jax.finetune.tables import Row, TaskFileError

TASK_TYPES = ("classification", "regression", "token-classification")


@dataclass
class Examples:
    """One split of a task. Sequence tasks fill `texts` (1 or 2 strings per example); token
    classification fills `words`. `labels` holds class names, floats, or tag lists."""

    source: str
    texts: list[tuple[str, ...]] | None
    words: list[list[str]] | None
    labels: list[Any]

    def __len__(self) -> int:
        return len(self.labels)


def examples_from_rows(
    rows: Sequence[Row],
    source: str,
    *,
    text_fields: Sequence[str],
    label_field: str,
    task_type: str,
    class_names: Sequence[str] | None = None,
) -> Examples:
    """Checks the fields of every row and converts its text and label (see the module doc)."""
    if task_type not in TASK_TYPES:
        raise TaskFileError(f"task type must be one of {', '.join(TASK_TYPES)}, got {task_type!r}")
    if not rows:
        raise TaskFileError(f"{source}: the file holds no examples")
    token_task = task_type == "token-classification"
    if token_task and len(text_fields) != 1:
        raise TaskFileError(
            f"token classification takes one text field (the word list), got {list(text_fields)}"
        )
    if not 1 <= len(text_fields) <= 2:
        raise TaskFileError(f"give one text field or a pair, got {list(text_fields)}")
    for field in (*text_fields, label_field):
        if field not in rows[0]:
            raise TaskFileError(
                f"{source}: no field {field!r}; the fields are {', '.join(map(str, rows[0]))}"
            )
    texts: list[tuple[str, ...]] = []
    words: list[list[str]] = []
    labels: list[Any] = []
    for number, row in enumerate(rows, start=1):
        where = f"{source}, row {number}"
        values = [_field(row, f, where) for f in (*text_fields, label_field)]
        *text_values, label = values
        if token_task:
            tokens = _string_list(text_values[0], f"{where}, field {text_fields[0]!r}")
            tags = [
                _class_label(t, where, label_field, class_names)
                for t in _string_list(label, f"{where}, field {label_field!r}", keep=True)
            ]
            if len(tags) != len(tokens):
                raise TaskFileError(
                    f"{where}: {len(tokens)} words in {text_fields[0]!r} but {len(tags)} tags "
                    f"in {label_field!r}"
                )
            words.append(tokens)
            labels.append(tags)
        else:
            texts.append(
                tuple(_text(v, where, f) for v, f in zip(text_values, text_fields, strict=True))
            )
            if task_type == "regression":
                labels.append(_float_label(label, where, label_field))
            else:
                labels.append(_class_label(label, where, label_field, class_names))
    return Examples(
        source=source,
        texts=None if token_task else texts,
        words=words if token_task else None,
        labels=labels,
    )


def label_names(train: Examples, task_type: str, class_names: Sequence[str] | None) -> list[str]:
    """The label vocabulary: `class_names` when given, else the training labels, in numeric
    order when they are all integers and in string order otherwise."""
    if task_type == "regression":
        return []
    if class_names is not None:
        return list(class_names)
    seen = (
        {tag for tags in train.labels for tag in tags}
        if train.words is not None
        else set(train.labels)
    )
    if all(_is_int_text(s) for s in seen):
        return sorted(seen, key=int)
    return sorted(seen)


def check_labels(split: Examples, names: Sequence[str]) -> None:
    """Every class label (or tag) of `split` must be one of `names` (the training labels)."""
    known = set(names)
    for number, label in enumerate(split.labels, start=1):
        for value in label if isinstance(label, list) else [label]:
            if value not in known:
                shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
                raise TaskFileError(
                    f"{split.source}, row {number}: label {value!r} is not among the training "
                    f"labels ({shown})"
                )


# ---- one value ---------------------------------------------------------------------------------
def _field(row: Row, field: str, where: str) -> Any:
    if field not in row:
        raise TaskFileError(f"{where}: no field {field!r}")
    value = row[field]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise TaskFileError(f"{where}: field {field!r} is empty")
    return value


def _text(value: Any, where: str, field: str) -> str:
    if isinstance(value, list | dict):
        raise TaskFileError(f"{where}: field {field!r} should be text, got {type(value).__name__}")
    return str(value)


def _string_list(value: Any, where: str, *, keep: bool = False) -> list[Any]:
    """A list (JSON lines, Parquet), or a string of space-separated items (CSV, TSV)."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list | tuple):
        return [v if keep else str(v) for v in value]
    raise TaskFileError(f"{where}: expected a list or space-separated text, got {value!r}")


def _is_int_text(s: str) -> bool:
    return s.lstrip("-").isdigit()


def _class_label(value: Any, where: str, field: str, class_names: Sequence[str] | None) -> str:
    index = None
    if isinstance(value, bool) or (isinstance(value, int)):
        index = int(value)
    elif isinstance(value, float) and value.is_integer():
        index = int(value)
    elif isinstance(value, str) and _is_int_text(value.strip()):
        index = int(value.strip())
    if class_names is not None and index is not None:
        if not 0 <= index < len(class_names):
            raise TaskFileError(
                f"{where}: label {value!r} in {field!r} is not a class index "
                f"0..{len(class_names) - 1}"
            )
        return class_names[index]
    if index is not None and not isinstance(value, bool):
        return str(index)
    if isinstance(value, float):
        raise TaskFileError(
            f"{where}: label {value!r} in {field!r} is a fraction; for a numeric target use "
            "--task-type regression"
        )
    text = str(value).strip()
    if not text:
        raise TaskFileError(f"{where}: field {field!r} is empty")
    return text


def _float_label(value: Any, where: str, field: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TaskFileError(
            f"{where}: regression label {value!r} in {field!r} is not a number"
        ) from None
    if not math.isfinite(number):
        raise TaskFileError(f"{where}: regression label {value!r} in {field!r} is not finite")
    return number
