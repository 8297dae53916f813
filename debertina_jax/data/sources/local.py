"""Files: .txt, .jsonl, .jsonl.gz / .json.gz and .parquet, given as paths, globs or folders,
local or in a bucket (gs://...: listed and read in place, block by block, never copied whole).

- .txt: documents are separated by one or more blank lines (lines of ASCII whitespace only).
- .jsonl, .jsonl.gz, .json.gz: one JSON object per line with the text in `text_key` ("text" in the
  mC4 / allenai-c4 layout). A null text is an empty document (skipped); a missing key or a
  value that is not a string is an error.
- .parquet: the string column `text_key` (needs the `parquet` extra, pyarrow); nulls are skipped.

Text files are read as bytes and decoded line by line, so a decoding error names the file and
the byte offset. `encoding` must be ASCII-compatible (utf-8, latin-1, cp1252, ...); `errors`
is Python's codec error handler ("strict", "replace", "ignore"). A NUL byte is always an error:
it means a binary file or UTF-16 text, neither of which is a text corpus.

Large .txt and .jsonl files are cut into chunks of about `chunk_bytes`, aligned to document
(resp. line) starts, so several processes can read one file. A .txt document that has no blank
line within 1 MiB of a chunk cut is read as two documents there. That is harmless for
pretraining, where documents are concatenated anyway. Each line is read whole, so a line must
fit in memory (a 10 MB line is fine).
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from debertina_jax import storage
from debertina_jax.data.sources import DocumentSource, SourceError, WorkUnit, missing_extra

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet")
DEFAULT_CHUNK_BYTES = 16 << 20
_SEARCH_BYTES = 1 << 20  # how far past a chunk cut to look for a document boundary


def _suffix(path: Path | str) -> str | None:
    name = storage.name(os.fspath(path)).lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def _find_remote(url: str) -> list[str]:
    """find_files for one gs:// path, glob or folder."""
    if glob.has_magic(url):
        files = [m for m in storage.glob(url) if _suffix(m) and storage.is_file(m)]
        if not files:
            raise FileNotFoundError(f"no {'/'.join(SUFFIXES)} file matches {url!r}")
    elif storage.is_file(url):
        if not _suffix(url):
            raise SourceError(f"{url}: unsupported file type (supported: {', '.join(SUFFIXES)})")
        files = [url]
    elif storage.is_dir(url):
        files = [f for f in storage.walk_files(url) if _suffix(f)]
        if not files:
            raise FileNotFoundError(f"folder {url!r} holds no {'/'.join(SUFFIXES)} file")
    else:
        raise FileNotFoundError(f"input file {url!r} does not exist")
    return files


def find_files(inputs: Sequence[str | os.PathLike]) -> list[Path | str]:
    """Expands paths, globs and folders (searched recursively) into a sorted, de-duplicated list:
    Paths for local files, gs:// URLs as strings."""
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    if not inputs:
        raise SourceError("no input given")
    found: list[Path | str] = []
    for item in inputs:
        text = storage.check_path(item, "input")
        if storage.is_remote(text):
            found.extend(_find_remote(text))
        elif glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            files = [m for m in matches if m.is_file() and _suffix(m)]
            if not files:
                raise FileNotFoundError(f"no {'/'.join(SUFFIXES)} file matches {text!r}")
        elif os.path.isdir(text):
            files = sorted(p for p in Path(text).rglob("*") if p.is_file() and _suffix(p))
            if not files:
                raise FileNotFoundError(f"folder {text!r} holds no {'/'.join(SUFFIXES)} file")
        elif os.path.isfile(text):
            if not _suffix(Path(text)):
                supported = ", ".join(SUFFIXES)
                raise SourceError(f"{text}: unsupported file type (supported: {supported})")
            files = [Path(text)]
        else:
            raise FileNotFoundError(f"input file {text!r} does not exist")
        found.extend(files)
    return list(dict.fromkeys(found))


def check_encoding(encoding: str, errors: str) -> None:
    """Rejects encodings the line-oriented readers cannot handle, with a clear message."""
    try:
        sample = "\n a".encode(encoding)
    except LookupError:
        raise SourceError(f"unknown encoding {encoding!r}") from None
    if sample != b"\n a":
        raise SourceError(
            f"encoding {encoding!r} is not ASCII-compatible; convert the files to UTF-8 first"
        )
    try:
        codecs.lookup_error(errors)
    except LookupError:
        raise SourceError(
            f"unknown errors handler {errors!r} (use 'strict', 'replace' or 'ignore')"
        ) from None


def _decode(line: bytes, path: str, offset: int, encoding: str, errors: str) -> str:
    nul = line.find(b"\x00")
    if nul != -1:
        raise SourceError(
            f"{path}: NUL byte at byte offset {offset + nul}: a binary file, or text that is not "
            "in an ASCII-compatible encoding (convert UTF-16 to UTF-8)"
        )
    try:
        return line.decode(encoding, errors)
    except UnicodeDecodeError as e:
        raise SourceError(
            f"{path}: not valid {encoding} at byte offset {offset + e.start} ({e.reason}); "
            "give the right encoding, or errors='replace' to replace bad bytes"
        ) from None


def _lines_from(f: BinaryIO, offset: int, end: int | None) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) for the lines starting in [offset, end)."""
    f.seek(offset)
    while end is None or offset < end:
        line = f.readline()
        if not line:
            return
        yield offset, line
        offset += len(line)


def _line_start(f: BinaryIO, position: int) -> int:
    """The first line start at or after `position`."""
    if position == 0:
        return 0
    f.seek(position - 1)
    return position - 1 + len(f.readline())


def _document_start(f: BinaryIO, position: int) -> int:
    """Where a chunk starting at `position` starts reading.

    The first document start (a non-blank line after a blank one) within _SEARCH_BYTES of the
    first line start at or after `position`; if there is none, the end of the file when the
    search reached it, else that line start, so a file without blank lines is still cut into
    chunks (a long document is then read as two). It is a
    pure function of `position` and the file, so the chunks on either side of a cut agree on
    where it is, and it never moves backwards as `position` grows.
    """
    start = _line_start(f, position)
    if start == 0:
        return 0
    after_blank = False
    for offset, line in _lines_from(f, start, start + _SEARCH_BYTES):
        blank = not line.strip()
        if after_blank and not blank:
            return offset
        after_blank = blank
    size = f.seek(0, os.SEEK_END)
    return size if start + _SEARCH_BYTES >= size else start


def _chunk_bounds(size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    count = max(1, math.ceil(size / chunk_bytes))
    cuts = [i * chunk_bytes for i in range(count)] + [size]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


@dataclass(frozen=True)
class TextChunk(WorkUnit):
    """Documents of a .txt file that start in the byte range [start, end) once aligned."""

    path: str
    start: int
    end: int
    encoding: str = "utf-8"
    errors: str = "strict"

    @property
    def key(self) -> str:
        return f"txt:{self.path}@{self.start}-{self.end}"

    @property
    def size_hint(self) -> int:
        return self.end - self.start

    @property
    def _is_utf8(self) -> bool:
        return codecs.lookup(self.encoding).name == "utf-8"

    def documents(self) -> Iterator[str]:
        size = storage.size(self.path)
        with storage.open_file(self.path, "rb") as f:
            begin = _document_start(f, self.start)
            stop = _document_start(f, self.end) if self.end < size else None
            lines: list[str] = []
            for offset, raw in _lines_from(f, begin, stop):
                if offset == 0 and raw.startswith(codecs.BOM_UTF8) and self._is_utf8:
                    raw, offset = raw[3:], 3  # a byte-order mark is not text
                if not raw.strip():
                    if lines:
                        yield "\n".join(lines)
                        lines = []
                    continue
                text = _decode(raw, self.path, offset, self.encoding, self.errors)
                lines.append(text.rstrip("\r\n"))
            if lines:
                yield "\n".join(lines)


def _byte_position(raw: bytes, chars: int, encoding: str, errors: str) -> int:
    """The offset in `raw` of the `chars`-th decoded character (exact for any error handler)."""
    decoder = codecs.getincrementaldecoder(encoding)(errors)
    decoded = 0
    for i in range(len(raw)):
        if decoded >= chars:
            return i
        decoded += len(decoder.decode(raw[i : i + 1]))
    return len(raw)


def _json_text(raw: bytes, where: str, offset: int, encoding: str, errors: str, key: str):
    text = _decode(raw, where, offset, encoding, errors)
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        # Not str(e): its "line 1 column 23" counts inside this one line, not in the file.
        at = offset + _byte_position(raw, e.pos, encoding, errors)
        raise SourceError(
            f"{where}: invalid JSON at byte offset {offset} (the line starting there): "
            f"{e.msg.removesuffix(' at')} at byte offset {at}"
        ) from None
    if not isinstance(record, dict) or key not in record:
        raise SourceError(f"{where}: the line at byte offset {offset} has no {key!r} field")
    value = record[key]
    if value is not None and not isinstance(value, str):
        raise SourceError(
            f"{where}: field {key!r} in the line at byte offset {offset} is of type "
            f"{type(value).__name__}, not str"
        )
    return value


@dataclass(frozen=True)
class JsonlChunk(WorkUnit):
    """The JSON lines of a file that start in [start, end); compressed files are one chunk."""

    path: str
    start: int
    end: int
    text_key: str = "text"
    encoding: str = "utf-8"
    errors: str = "strict"
    compressed: bool = False

    @property
    def key(self) -> str:
        return f"jsonl:{self.path}@{self.start}-{self.end}:{self.text_key}"

    @property
    def size_hint(self) -> int:
        return self.end - self.start

    def documents(self) -> Iterator[str]:
        # Offsets in a compressed file count decompressed bytes; the message says so.
        where = f"{self.path} (decompressed)" if self.compressed else self.path
        with storage.open_file(self.path, "rb") as raw:
            f = gzip.GzipFile(fileobj=raw) if self.compressed else raw
            if self.compressed:
                lines = _lines_from(f, 0, None)
            else:
                size = storage.size(self.path)
                stop = _line_start(f, self.end) if self.end < size else None
                lines = _lines_from(f, _line_start(f, self.start), stop)
            for offset, raw in lines:
                text = _json_text(raw, where, offset, self.encoding, self.errors, self.text_key)
                if text:
                    yield text


def _import_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise missing_extra("reading .parquet files", "parquet", "pyarrow") from None
    return pq


@dataclass(frozen=True)
class ParquetRowGroups(WorkUnit):
    """Row groups [first, last) of a Parquet file."""

    path: str
    first: int
    last: int
    text_key: str = "text"
    num_bytes: int | None = None

    @property
    def key(self) -> str:
        return f"parquet:{self.path}@{self.first}-{self.last}:{self.text_key}"

    @property
    def size_hint(self) -> int | None:
        return self.num_bytes

    def documents(self) -> Iterator[str]:
        pq = _import_parquet()
        file = pq.ParquetFile(_parquet_input(self.path))
        if self.text_key not in file.schema_arrow.names:
            raise SourceError(
                f"{self.path}: no column {self.text_key!r} (columns: {file.schema_arrow.names})"
            )
        groups = list(range(self.first, self.last))
        for batch in file.iter_batches(row_groups=groups, columns=[self.text_key]):
            for value in batch.column(0).to_pylist():
                if value is not None and not isinstance(value, str):
                    raise SourceError(
                        f"{self.path}: column {self.text_key!r} holds {type(value).__name__} "
                        "values, not strings"
                    )
                if value:
                    yield value


def _parquet_input(path: str):
    """What pyarrow opens: the path, or for a URL a file object reading it in place."""
    return storage.open_file(path, "rb") if storage.is_remote(path) else path


def _parquet_units(path: str, text_key: str, chunk_bytes: int) -> list[WorkUnit]:
    pq = _import_parquet()
    try:
        meta = pq.ParquetFile(_parquet_input(path)).metadata
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise SourceError(f"{path}: not a readable Parquet file ({e})") from None
    units: list[WorkUnit] = []
    first, size = 0, 0
    for group in range(meta.num_row_groups):
        size += meta.row_group(group).total_byte_size
        if size >= chunk_bytes or group == meta.num_row_groups - 1:
            units.append(ParquetRowGroups(path, first, group + 1, text_key, size))
            first, size = group + 1, 0
    return units


class LocalFiles(DocumentSource):
    """Documents of local files; see the module docstring for the formats."""

    def __init__(
        self,
        inputs: Sequence[str | os.PathLike] | str | os.PathLike,
        *,
        encoding: str = "utf-8",
        errors: str = "strict",
        text_key: str = "text",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ):
        check_encoding(encoding, errors)
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.files = find_files(inputs)
        self.encoding = encoding
        self.errors = errors
        self.text_key = text_key
        self.chunk_bytes = chunk_bytes

    def describe(self) -> str:
        names = ", ".join(str(f) for f in self.files[:3])
        more = f" and {len(self.files) - 3} more" if len(self.files) > 3 else ""
        return f"{len(self.files)} local file(s): {names}{more}"

    def units(self) -> list[WorkUnit]:
        units: list[WorkUnit] = []
        for file in self.files:
            path, kind = str(file), _suffix(file)
            size = storage.size(path)
            if kind == ".parquet":
                units.extend(_parquet_units(path, self.text_key, self.chunk_bytes))
            elif kind in (".jsonl.gz", ".json.gz"):
                units.append(
                    JsonlChunk(path, 0, size, self.text_key, self.encoding, self.errors, True)
                )
            elif kind == ".jsonl":
                units.extend(
                    JsonlChunk(path, a, b, self.text_key, self.encoding, self.errors)
                    for a, b in _chunk_bounds(size, self.chunk_bytes)
                )
            else:
                units.extend(
                    TextChunk(path, a, b, self.encoding, self.errors)
                    for a, b in _chunk_bounds(size, self.chunk_bytes)
                )
        return units
