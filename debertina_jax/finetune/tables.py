"""Reading a labelled task file into rows: CSV, TSV, JSON lines or Parquet, by file extension.

Every reader returns a list of dicts (column name -> value). CSV/TSV values are strings; JSON
lines and Parquet keep their types (numbers, booleans, lists for token-level tasks). A missing
file, an unknown extension, a malformed line and a file without rows are errors naming the file.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

Row = dict[str, Any]
SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


class TaskFileError(ValueError):
    """A task file that cannot be read, or whose content does not fit the task."""


def read_rows(path: str | os.PathLike) -> list[Row]:
    """All rows of `path`; the format comes from the extension (.csv .tsv .jsonl .json .parquet)."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise TaskFileError(
            f"{path}: unknown file type {suffix or '(none)'}; use one of {', '.join(SUFFIXES)}"
        )
    if suffix == ".parquet":
        rows = _read_parquet(path)
    elif suffix in (".jsonl", ".json"):
        rows = _read_json_lines(path)
    else:
        rows = _read_delimited(path, "\t" if suffix == ".tsv" else ",")
    if not rows:
        raise TaskFileError(f"{path}: the file holds no examples")
    return rows


def _read_delimited(path: Path, delimiter: str) -> list[Row]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            # QUOTE_NONE for TSV: a quote character inside a tab-separated text is just text.
            quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
            reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
            rows = []
            for line, row in enumerate(reader, start=2):
                if None in row:  # more cells than header columns
                    raise TaskFileError(
                        f"{path}, line {line}: {len(row) - 1 + len(row[None])} cells but the "
                        f"header has {len(reader.fieldnames or [])} columns"
                    )
                rows.append(row)
            return rows
    except UnicodeDecodeError as e:
        raise TaskFileError(f"{path}: not UTF-8 text ({e})") from None
    except csv.Error as e:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise TaskFileError(f"{path}: malformed {kind} ({e})") from None


def _read_json_lines(path: Path) -> list[Row]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise TaskFileError(f"{path}: not UTF-8 text ({e})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{path}, line {number}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise TaskFileError(
                f"{path}, line {number}: expected a JSON object, got {type(row).__name__}"
            )
        rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TaskFileError(
            f"{path}: reading Parquet needs pyarrow (pip install 'debertina-jax[parquet]')"
        ) from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several error types for bad files
        raise TaskFileError(f"{path}: cannot read Parquet ({e})") from None
