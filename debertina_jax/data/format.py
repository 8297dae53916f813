"""The prepared-data format, shared by the prepare step (writer) and the loader (reader).

    OUTPUT_DIR/metadata.json
    OUTPUT_DIR/train-00000.array_record, train-00001.array_record, ...
    OUTPUT_DIR/eval-00000.array_record, ...

metadata.json: {"format_version": 1, "tokenizer_fingerprint", "max_seq_length", "pad_id",
"cls_id", "sep_id", "mask_id", "num_documents", "splits": {"train": {"files": [names relative to
OUTPUT_DIR], "num_lines", "num_tokens"}, "eval": {...}}} plus "prepare" (the settings used).
`num_tokens` counts every stored id, [CLS] and [SEP] included.

Each ArrayRecord record is one line: little-endian int32 ids, [CLS] + up to max_seq_length - 2
text tokens + [SEP], no padding. The text of consecutive documents is concatenated, so lines cross
document boundaries; only the last line of a split may be shorter. Shards are written with
group_size 1, which Grain's ArrayRecordDataSource needs for fast random access.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from debertina_jax import storage

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
SPLITS = ("train", "eval")
WRITER_OPTIONS = "group_size:1"
LINE_DTYPE = np.dtype("<i4")


class PreparedDataError(ValueError):
    """A prepared-data directory that is malformed or does not fit how it is used."""


class IncompatibleDataError(PreparedDataError):
    """Shards prepared with another tokenizer or sequence length."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.array_record"


def encode_line(ids: np.ndarray | list[int]) -> bytes:
    return np.asarray(ids, dtype=LINE_DTYPE).tobytes()


def decode_line(record: bytes) -> np.ndarray:
    if len(record) % LINE_DTYPE.itemsize:
        raise PreparedDataError(f"a record of {len(record)} bytes is not a sequence of int32 ids")
    return np.frombuffer(record, dtype=LINE_DTYPE)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` so that `path` holds either the old or the complete new content."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_metadata(directory: str | os.PathLike, metadata: dict[str, Any]) -> None:
    atomic_write(Path(directory) / METADATA_FILE, json.dumps(metadata, indent=2).encode())


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """metadata.json of a prepared directory (local or gs://), checked for the keys every
    reader relies on."""
    path = storage.join(directory, METADATA_FILE)
    if not storage.is_file(path):
        raise FileNotFoundError(
            f"{path} not found: prepare the data with python -m debertina_jax.data.prepare"
        )
    try:
        metadata = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise PreparedDataError(f"{path} is not valid JSON: {e}") from None
    if metadata.get("format_version") != FORMAT_VERSION:
        raise PreparedDataError(
            f"{path}: format_version {metadata.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    required = ("tokenizer_fingerprint", "max_seq_length", "pad_id", "cls_id", "sep_id")
    missing = [k for k in (*required, "mask_id", "splits", "num_documents") if k not in metadata]
    if missing:
        raise PreparedDataError(f"{path}: missing keys {missing}")
    return metadata


def split_files(directory: str | os.PathLike, split: str) -> list[Path]:
    """Absolute shard paths of `split`, checked to exist."""
    metadata = read_metadata(directory)
    if split not in metadata["splits"]:
        raise PreparedDataError(
            f"{directory} has no split {split!r} (splits: {sorted(metadata['splits'])})"
        )
    files = [Path(directory) / name for name in metadata["splits"][split]["files"]]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"shard {f} listed in {directory}/{METADATA_FILE} is missing")
    return files


def iter_lines(directory: str | os.PathLike, split: str) -> Iterator[np.ndarray]:
    """Every line of `split` in stored order (sequential reads; the loader shuffles instead)."""
    from array_record.python.array_record_module import ArrayRecordReader

    for path in split_files(directory, split):
        reader = ArrayRecordReader(str(path))
        try:
            for start in range(0, reader.num_records(), 1024):
                stop = min(start + 1024, reader.num_records())
                for record in reader.read(start, stop):
                    yield decode_line(record)
        finally:
            reader.close()


class ShardWriter:
    """Writes the lines of one split into shards of at most `lines_per_shard` lines."""

    def __init__(self, directory: str | os.PathLike, split: str, lines_per_shard: int):
        if lines_per_shard < 1:
            raise ValueError(f"lines_per_shard must be positive, got {lines_per_shard}")
        self.directory = Path(directory)
        self.split = split
        self.lines_per_shard = lines_per_shard
        self.files: list[str] = []
        self.num_lines = 0
        self.num_tokens = 0
        self._writer = None

    def write(self, line: np.ndarray) -> None:
        if self.num_lines % self.lines_per_shard == 0:
            self._close_shard()
            from array_record.python.array_record_module import ArrayRecordWriter

            name = shard_name(self.split, len(self.files))
            self._writer = ArrayRecordWriter(str(self.directory / name), WRITER_OPTIONS)
            self.files.append(name)
        self._writer.write(encode_line(line))
        self.num_lines += 1
        self.num_tokens += len(line)

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> dict[str, Any]:
        """Closes the last shard; returns the split's metadata entry."""
        self._close_shard()
        return {"files": self.files, "num_lines": self.num_lines, "num_tokens": self.num_tokens}


class _TokenizerLike(Protocol):
    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int

    def fingerprint(self) -> str: ...


def check_compatible(
    prepared_dir: str | os.PathLike,
    tokenizer: _TokenizerLike,
    *,
    max_seq_length: int | None = None,
) -> dict[str, Any]:
    """Raises IncompatibleDataError unless `prepared_dir` was made with this tokenizer (and
    `max_seq_length`, when given); returns the metadata."""
    metadata = read_metadata(prepared_dir)
    if metadata["tokenizer_fingerprint"] != tokenizer.fingerprint():
        raise IncompatibleDataError(
            f"{prepared_dir} was prepared with tokenizer {metadata['tokenizer_fingerprint'][:12]}, "
            f"not with the given one ({tokenizer.fingerprint()[:12]}): prepare the data again "
            "with this tokenizer, or use the tokenizer it was prepared with"
        )
    for key in ("pad_id", "cls_id", "sep_id", "mask_id"):
        if metadata[key] != getattr(tokenizer, key):
            raise IncompatibleDataError(
                f"{prepared_dir}: {key} is {metadata[key]}, the tokenizer's is "
                f"{getattr(tokenizer, key)}"
            )
    if max_seq_length is not None and metadata["max_seq_length"] != max_seq_length:
        raise IncompatibleDataError(
            f"{prepared_dir} holds lines of max_seq_length {metadata['max_seq_length']}, "
            f"not {max_seq_length}: prepare the data again or change the config"
        )
    return metadata
