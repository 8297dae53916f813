"""Tokenize a corpus and pack it into [CLS] ... [SEP] lines in train/eval ArrayRecord shards.

    python -m debertina_jax.data.prepare --tokenizer TOK_DIR --input DATA... --output OUT_DIR

Two phases:
1. Tokenize (parallel, resumable). The source is cut into work units; worker processes tokenize
   them with the exported tokenizer into OUT_DIR/.work/unit-NNNNNN.tokens (raw int32 ids, the
   unit's documents concatenated), each followed by an atomically written done marker. A killed
   run, started again with the same settings, skips the units that have a marker.
2. Pack (one pass). The units' ids, concatenated in source order, are cut into lines of
   max_seq_length - 2 tokens, wrapped in [CLS] ... [SEP]; a seeded random subset of the lines is
   the eval split. metadata.json is written last, so its presence means the output is complete.

Documents longer than `max_document_chars` are tokenized in pieces cut at spaces where the ids
do not change (debertina_jax.data.text.split_long_text), so huge lines are spread over the batch
without changing the result.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from debertina_jax import storage
from debertina_jax.data import cache
from debertina_jax.data import format as fmt
from debertina_jax.data.sources import DocumentSource, EmptyCorpusError, WorkUnit
from debertina_jax.data.text import split_long_text
from debertina_jax.data.tokenizer import Tokenizer

WORK_DIR = ".work"
MAX_DOCUMENT_CHARS = 100_000
_BATCH_CHARS = 1 << 20  # text per encode_batch call: big enough for the Rust thread pool
_BATCH_TEXTS = 4096
_REPORT_SECONDS = 0.5
# Default held-out split when none is asked for: 1% of the lines, at most this many.
DEFAULT_EVAL_FRACTION = 0.01
DEFAULT_MAX_EVAL_LINES = 10_000


class EvalSplitError(ValueError):
    """The eval split asked for does not fit the data."""


def tokenize_documents(
    tokenizer: Tokenizer,
    documents: Iterable[str],
    max_document_chars: int = MAX_DOCUMENT_CHARS,
) -> Iterator[tuple[int, np.ndarray]]:
    """(documents, ids) per batch: the ids of the batch's documents, concatenated in order.

    Blank documents are skipped. The ids equal `tokenizer.encode_batch(documents)` concatenated.
    """
    texts: list[str] = []
    chars = documents_in_batch = 0
    for document in documents:
        if not document.strip():
            continue
        pieces = split_long_text(document, max_document_chars)
        texts.extend(pieces)
        chars += len(document)
        documents_in_batch += 1
        if chars >= _BATCH_CHARS or len(texts) >= _BATCH_TEXTS:
            yield documents_in_batch, _concat(tokenizer.encode_batch(texts))
            texts, chars, documents_in_batch = [], 0, 0
    if texts:
        yield documents_in_batch, _concat(tokenizer.encode_batch(texts))


def _concat(ids: list[list[int]]) -> np.ndarray:
    count = sum(map(len, ids))
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=fmt.LINE_DTYPE, count=count)


# ---------------------------------------------------------------- phase 1: tokenize the units


def _unit_files(work_dir: Path, index: int) -> tuple[Path, Path]:
    stem = work_dir / f"unit-{index:06d}"
    return stem.with_suffix(".tokens"), stem.with_suffix(".done.json")


def _read_done(work_dir: Path, index: int) -> dict | None:
    done = _unit_files(work_dir, index)[1]
    return json.loads(done.read_text()) if done.is_file() else None


def tokenize_unit(
    tokenizer: Tokenizer,
    unit: WorkUnit,
    index: int,
    work_dir: Path,
    max_document_chars: int,
    report: Callable[[int, int], None],
) -> dict[str, Any]:
    """Tokenizes one unit into its .tokens file, then writes its done marker; returns the stats."""
    tokens_path, done_path = _unit_files(work_dir, index)
    tmp = tokens_path.with_name(tokens_path.name + ".tmp")
    stats = {"key": unit.key, "num_documents": 0, "num_tokens": 0}
    pending_docs = pending_tokens = 0
    last_report = time.monotonic()
    with open(tmp, "wb") as f:
        for docs, ids in tokenize_documents(tokenizer, unit.documents(), max_document_chars):
            f.write(ids.tobytes())
            stats["num_documents"] += docs
            stats["num_tokens"] += ids.size
            pending_docs, pending_tokens = pending_docs + docs, pending_tokens + ids.size
            if time.monotonic() - last_report > _REPORT_SECONDS:
                report(pending_docs, pending_tokens)
                pending_docs = pending_tokens = 0
                last_report = time.monotonic()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, tokens_path)
    fmt.atomic_write(done_path, json.dumps(stats).encode())
    report(pending_docs, pending_tokens)
    return stats


_worker: dict[str, Any] = {}


def _init_worker(tokenizer_dir: str, progress_queue, threads: int) -> None:
    # Must precede the tokenizer's first batch: the Rust thread pool is sized once.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    _worker["tokenizer"] = Tokenizer.load(tokenizer_dir)
    _worker["queue"] = progress_queue


def _worker_task(unit: WorkUnit, index: int, work_dir: str, max_document_chars: int) -> dict:
    return tokenize_unit(
        _worker["tokenizer"],
        unit,
        index,
        Path(work_dir),
        max_document_chars,
        lambda docs, tokens: _worker["queue"].put((docs, tokens)),
    )


class _Progress:
    """tqdm bar over work units, with documents/s and tokens/s since the start."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.bar = tqdm(total=total, initial=done, unit="unit", disable=not enabled, smoothing=0)
        self.start = time.monotonic()
        self.documents = self.tokens = 0

    def add(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        elapsed = max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(
            f"{self.documents / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tokens/s",
            refresh=False,
        )

    def unit_done(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _tokenize_units(
    units: Sequence[WorkUnit],
    todo: list[int],
    tokenizer_dir: Path,
    work_dir: Path,
    num_workers: int,
    max_document_chars: int,
    progress: _Progress,
) -> None:
    if num_workers <= 1:
        tokenizer = Tokenizer.load(tokenizer_dir)
        for index in todo:
            unit = units[index]
            tokenize_unit(tokenizer, unit, index, work_dir, max_document_chars, progress.add)
            progress.unit_done()
        return
    # spawn, not fork: a forked child would inherit the parent's Rust thread pool state.
    ctx = mp.get_context("spawn")
    reports = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // num_workers)
    # A process pool from concurrent.futures, not multiprocessing.Pool: when a worker dies
    # (e.g. killed for memory) its future fails with BrokenProcessPool instead of hanging.
    executor = ProcessPoolExecutor(
        num_workers, ctx, initializer=_init_worker, initargs=(str(tokenizer_dir), reports, threads)
    )
    try:
        pending = {
            executor.submit(_worker_task, units[i], i, str(work_dir), max_document_chars)
            for i in todo
        }
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(reports, progress)
            for future in done:
                future.result()  # re-raises a worker's exception
                progress.unit_done()
    except BaseException:
        # Don't wait for the other units; those that finish keep their done markers.
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    executor.shutdown()
    _drain(reports, progress)


def _drain(reports, progress: _Progress) -> None:
    while True:
        try:
            progress.add(*reports.get_nowait())
        except queue.Empty:
            return


# ---------------------------------------------------------------------- phase 2: pack lines


def eval_line_indices(num_lines: int, num_eval: int, seed: int) -> np.ndarray:
    """Sorted indices of the lines held out for eval: a seeded uniform sample."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_lines, size=num_eval, replace=False))


def _eval_size(num_lines: int, eval_lines: int | None, eval_fraction: float | None) -> int:
    if eval_lines is None and eval_fraction is None:
        # Default: a small held-out set that never empties the training split.
        wanted = max(1, round(DEFAULT_EVAL_FRACTION * num_lines))
        return min(wanted, DEFAULT_MAX_EVAL_LINES, num_lines - 1)
    if eval_lines is None:
        asked = f"eval fraction {eval_fraction}"
        eval_lines = max(1, round(eval_fraction * num_lines)) if eval_fraction > 0 else 0
    else:
        asked = f"{eval_lines} eval lines"
    if eval_lines >= num_lines:
        raise EvalSplitError(
            f"{asked} cannot be held out: the data makes {num_lines} line(s) and at least one "
            "must stay for training. The tokenized units are kept: run again with a smaller eval "
            "split and only packing is redone"
        )
    return eval_lines


def packed_lines(token_files: Iterable[Path], body: int) -> Iterator[np.ndarray]:
    """The concatenated ids of `token_files`, cut into pieces of `body` ids (the last shorter)."""
    carry = np.empty(0, dtype=fmt.LINE_DTYPE)
    for path in token_files:
        ids = np.fromfile(path, dtype=fmt.LINE_DTYPE)
        if carry.size:
            ids = np.concatenate([carry, ids])
        full = ids.size // body
        for k in range(full):
            yield ids[k * body : (k + 1) * body]
        carry = ids[full * body :]
    if carry.size:
        yield carry


def _remove_outputs(output_dir: Path) -> None:
    (output_dir / fmt.METADATA_FILE).unlink(missing_ok=True)
    for split in fmt.SPLITS:
        for shard in output_dir.glob(f"{split}-*.array_record"):
            shard.unlink()


def _pack(
    work_dir: Path,
    num_units: int,
    num_tokens: int,
    output_dir: Path,
    tokenizer: Tokenizer,
    max_seq_length: int,
    num_eval: int,
    seed: int,
    lines_per_shard: int,
    show_progress: bool,
) -> dict[str, dict]:
    body = max_seq_length - 2
    num_lines = math.ceil(num_tokens / body)
    is_eval = np.zeros(num_lines, dtype=bool)
    is_eval[eval_line_indices(num_lines, num_eval, seed)] = True
    writers = {s: fmt.ShardWriter(output_dir, s, lines_per_shard) for s in fmt.SPLITS}
    cls = np.array([tokenizer.cls_id], dtype=fmt.LINE_DTYPE)
    sep = np.array([tokenizer.sep_id], dtype=fmt.LINE_DTYPE)
    files = (_unit_files(work_dir, i)[0] for i in range(num_units))
    lines = packed_lines(files, body)
    bar = tqdm(lines, total=num_lines, unit="line", desc="packing", disable=not show_progress)
    for index, line in enumerate(bar):
        split = "eval" if is_eval[index] else "train"
        writers[split].write(np.concatenate([cls, line, sep]))
    return {split: writer.close() for split, writer in writers.items()}


# ---------------------------------------------------------------------------------- driver


def _check_settings(max_seq_length, eval_lines, eval_fraction, lines_per_shard, max_doc_chars):
    if max_seq_length < 3:
        raise ValueError(f"max_seq_length must be >= 3 ([CLS] x [SEP]), got {max_seq_length}")
    if eval_lines is not None and eval_fraction is not None:
        raise ValueError("give eval_lines or eval_fraction, not both")
    if eval_lines is not None and eval_lines < 0:
        raise ValueError(f"eval_lines must be >= 0, got {eval_lines}")
    if eval_fraction is not None and not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if lines_per_shard < 1:
        raise ValueError(f"lines_per_shard must be positive, got {lines_per_shard}")
    if max_doc_chars < 2:
        raise ValueError(f"max_document_chars must be >= 2, got {max_doc_chars}")


def _start_work_dir(work_dir: Path, run: dict, overwrite: bool) -> None:
    """Creates the work dir, or checks that the partial run in it used the same settings."""
    run_file = work_dir / "run.json"
    if run_file.is_file():
        if json.loads(run_file.read_text()) == run:
            return
        if not overwrite:
            raise fmt.PreparedDataError(
                f"{work_dir.parent} holds a partial prepare run with other settings (source, "
                "tokenizer or max_document_chars): use another output directory or --overwrite"
            )
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    fmt.atomic_write(run_file, json.dumps(run).encode())


def _finished_run(
    output_dir: Path, settings: dict, tokenizer: Tokenizer, max_seq_length: int, overwrite: bool
) -> dict | None:
    """Metadata of a complete earlier run with the same settings; None when there is work."""
    if not (output_dir / fmt.METADATA_FILE).is_file():
        return None
    done = fmt.read_metadata(output_dir)
    same = (
        done.get("prepare") == settings
        and done["max_seq_length"] == max_seq_length
        and done["tokenizer_fingerprint"] == tokenizer.fingerprint()
    )
    if same and not overwrite:
        return done
    if not overwrite:
        raise fmt.PreparedDataError(
            f"{output_dir} already holds data prepared with other settings: use another "
            "output directory or --overwrite"
        )
    _remove_outputs(output_dir)
    return None


def prepare(
    source: DocumentSource,
    tokenizer_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    max_seq_length: int = 512,
    eval_lines: int | None = None,
    eval_fraction: float | None = None,
    lines_per_shard: int = 65536,
    num_workers: int | None = None,
    seed: int = 0,
    max_document_chars: int = MAX_DOCUMENT_CHARS,
    overwrite: bool = False,
    show_progress: bool = True,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Tokenizes `source` and writes packed train/eval shards to `output_dir` (local or gs://;
    see data/cache.py for `cache_dir`); returns metadata.

    Eval split: `eval_lines` lines, or `eval_fraction` of the lines, drawn at random (seeded);
    neither given: 1% of the lines, at most 10,000, never all of them. Running again after a
    kill resumes; running again after success with the same settings returns the metadata.
    """
    _check_settings(max_seq_length, eval_lines, eval_fraction, lines_per_shard, max_document_chars)
    tokenizer_dir = storage.check_path(tokenizer_dir, "tokenizer directory")
    if storage.is_remote(storage.check_path(output_dir, "output directory")):
        # ArrayRecord writes local files: prepare into this host's cache of the URL (where a
        # killed run resumes, and where the loader reads from), then upload, metadata last.
        staging = cache.cache_dir_for(os.fspath(output_dir), cache_dir)
        metadata = prepare(
            source, tokenizer_dir, staging, max_seq_length=max_seq_length,
            eval_lines=eval_lines, eval_fraction=eval_fraction, lines_per_shard=lines_per_shard,
            num_workers=num_workers, seed=seed, max_document_chars=max_document_chars,
            overwrite=overwrite, show_progress=show_progress,
        )  # fmt: skip
        cache.upload(staging, os.fspath(output_dir))
        return metadata
    output_dir = Path(output_dir)
    tokenizer = Tokenizer.load(tokenizer_dir)
    units = source.units()
    unit_keys = [u.key for u in units]
    settings = {
        "source": source.describe(),
        "source_digest": hashlib.sha256("\n".join(unit_keys).encode()).hexdigest(),
        "max_document_chars": max_document_chars,
        "eval_lines": eval_lines,
        "eval_fraction": eval_fraction,
        "seed": seed,
        "lines_per_shard": lines_per_shard,
    }
    finished = _finished_run(output_dir, settings, tokenizer, max_seq_length, overwrite)
    if finished is not None:
        return finished
    output_dir.mkdir(parents=True, exist_ok=True)

    work_dir = output_dir / WORK_DIR
    run = {
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "max_document_chars": max_document_chars,
        "units": unit_keys,
    }
    _start_work_dir(work_dir, run, overwrite)
    todo = [i for i in range(len(units)) if _read_done(work_dir, i) is None]
    workers = min(num_workers or os.cpu_count() or 1, max(len(todo), 1))
    progress = _Progress(len(units), len(units) - len(todo), show_progress)
    try:
        _tokenize_units(units, todo, tokenizer_dir, work_dir, workers, max_document_chars, progress)
    finally:
        progress.close()

    stats = [_read_done(work_dir, i) for i in range(len(units))]
    num_tokens = sum(s["num_tokens"] for s in stats)
    if num_tokens == 0:
        raise EmptyCorpusError(f"{source.describe()} holds no text to tokenize")
    num_lines = math.ceil(num_tokens / (max_seq_length - 2))
    num_eval = _eval_size(num_lines, eval_lines, eval_fraction)
    _remove_outputs(output_dir)
    splits = _pack(
        work_dir,
        len(units),
        num_tokens,
        output_dir,
        tokenizer,
        max_seq_length,
        num_eval,
        seed,
        lines_per_shard,
        show_progress,
    )
    metadata = {
        "format_version": fmt.FORMAT_VERSION,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "max_seq_length": max_seq_length,
        "pad_id": tokenizer.pad_id,
        "cls_id": tokenizer.cls_id,
        "sep_id": tokenizer.sep_id,
        "mask_id": tokenizer.mask_id,
        "unk_id": tokenizer.unk_id,
        "vocab_size": tokenizer.vocab_size,
        "num_documents": sum(s["num_documents"] for s in stats),
        "splits": splits,
        "prepare": settings,
    }
    fmt.write_metadata(output_dir, metadata)
    shutil.rmtree(work_dir)
    return metadata
