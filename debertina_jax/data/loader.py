"""Fixed-shape int32 batches from the prepared ArrayRecord shards, one slice per JAX process.

Training order, all of it arithmetic on line numbers (a Grain MapDataset) until the last step:

    line numbers of the split -> global shuffle (seed; a new permutation every epoch)
      -> repeat: one global stream of lines, cut into global batches of B lines
      -> this process's block of b = B / processes rows of each global batch
      -> one batched ArrayRecord read, pad to int32 [b, max_seq_length]

Shuffling the whole split makes every process see a random sample of the corpus; taking
contiguous blocks of one shared stream makes the processes disjoint and keeps the global batch
the same whatever the number of processes (so a pod run and a one-host run see the same data
and, up to float rounding, the same losses). Batches run across epoch boundaries (no partial
batch is ever produced). Because the pipeline is a pure function of the index, the iterator
state is a small dict of integers: restoring it gives exactly the batches that would have come
next.

Evaluation (`make_eval_loader`) is one ordered pass. Every line is used once; the last batch of
each process is filled with pad rows whose "weights" entry is 0, and every process yields the
same number of batches (collectives in the eval step would hang otherwise).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import grain
import jax
import numpy as np
from absl import flags

from debertina_jax.data import format as fmt
from debertina_jax.data.format import IncompatibleDataError, PreparedDataError

_STATE_VERSION = 1


# Length of an endless loader: far more lines than any run reads.
_ENDLESS = 2**62


class LoaderError(ValueError):
    """A loader asked for something impossible (batch sizes, process layout, saved state)."""


@dataclass(frozen=True)
class SplitInfo:
    """What the loader needs to know about one split of a prepared data directory."""

    data_dir: Path
    split: str
    files: tuple[Path, ...]
    num_lines: int
    max_seq_length: int
    pad_id: int
    tokenizer_fingerprint: str


def read_split(data_dir: str | Path, split: str) -> SplitInfo:
    """Reads `data_dir/metadata.json` and checks that the shards of `split` are there."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"prepared data directory {data_dir} does not exist")
    meta = fmt.read_metadata(data_dir)
    files = tuple(fmt.split_files(data_dir, split))
    entry = meta["splits"][split]
    if "num_lines" not in entry:
        raise PreparedDataError(f"{data_dir}/{fmt.METADATA_FILE}: splits.{split} has no num_lines")
    if not files or entry["num_lines"] <= 0:
        raise PreparedDataError(f"split {split!r} of {data_dir} is empty")
    return SplitInfo(
        data_dir=data_dir,
        split=split,
        files=files,
        num_lines=int(entry["num_lines"]),
        max_seq_length=int(meta["max_seq_length"]),
        pad_id=int(meta["pad_id"]),
        tokenizer_fingerprint=str(meta["tokenizer_fingerprint"]),
    )


class Loader:
    """Iterator of batches with a restorable position (`get_state` / `set_state`).

    `get_state()` returns a JSON-serialisable dict; it also records how the loader was built,
    so restoring into a loader with another seed, split, batch size or process layout fails
    loudly instead of silently reading other data.
    """

    def __init__(self, dataset: grain.IterDataset, identity: dict, num_batches: int | None):
        self._iterator = iter(dataset)
        self.identity = identity
        self.num_batches = num_batches  # per process; None when the loader never ends

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def close(self) -> None:
        """Stops prefetch threads and worker processes now rather than at garbage collection."""
        self._iterator.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_state(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "loader": self.identity,
            "grain": self._iterator.get_state(),
        }

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise LoaderError(f"not a loader state of version {_STATE_VERSION}: {state!r:.200}")
        saved = state["loader"]
        diff = {k: (saved.get(k), v) for k, v in self.identity.items() if saved.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise LoaderError(f"loader state was saved by a differently built loader ({detail})")
        self._iterator.set_state(state["grain"])


def line_stream(
    num_lines: int, seed: int, *, shuffle: bool = True, num_epochs: int | None = None
) -> grain.MapDataset:
    """The global stream of line numbers: every epoch a new permutation of the lines (a
    shuffled MapDataset keeps the epoch in its index arithmetic); batches run across epoch
    boundaries. Shared with the phase loader (data/phased.py), which cuts the same stream."""
    stream = grain.MapDataset.range(num_lines)
    if shuffle:
        stream = stream.shuffle(seed=seed)
    return stream.repeat(num_epochs)


def make_loader(
    data_dir: str | Path,
    split: str,
    global_batch_size: int,
    *,
    seed: int,
    max_seq_length: int | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    read_threads: int = 2,
    prefetch_batches: int = 8,
) -> Loader:
    """Training batches {"input_ids": int32 [global_batch_size / shard_count, max_seq_length]}.

    `num_epochs=None` repeats forever. `shard_index`/`shard_count` default to this JAX process.
    `max_seq_length`, when given, must equal the prepared one. `worker_count > 0` decodes in
    that many worker processes; otherwise `read_threads` threads prefetch `prefetch_batches`.
    """
    info = read_split(data_dir, split)
    shard_index, shard_count = _resolve_shard(shard_index, shard_count)
    batch_size = _per_process_batch(global_batch_size, shard_count)
    _check_seq_length(info, max_seq_length)
    if not 0 <= seed < 2**32:
        raise LoaderError(f"seed must be in [0, 2**32), got {seed}")
    if num_epochs is not None and num_epochs < 1:
        raise LoaderError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    stream = line_stream(info.num_lines, seed, shuffle=shuffle, num_epochs=num_epochs)
    # Process p takes rows [p*b, (p+1)*b) of every global batch of B = shard_count * b lines,
    # so the global batch (and with it every mask and loss) is the same for any number of
    # processes, and the processes' slices never overlap.
    if num_epochs is None:
        num_batches = None
        local_length = _ENDLESS // global_batch_size * batch_size
    else:
        num_batches = info.num_lines * num_epochs // global_batch_size
        if num_batches == 0:
            raise LoaderError(
                f"{num_epochs} epoch(s) of the {info.num_lines} lines of split {split!r} give no "
                f"full batch of {global_batch_size}: use more epochs or a smaller batch"
            )
        local_length = num_batches * batch_size

    def global_line(k: int) -> int:
        step, row = divmod(k, batch_size)
        return stream[step * global_batch_size + shard_index * batch_size + row]

    ds = grain.MapDataset.range(local_length).map(global_line)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(functools.partial(_read_batch, source=_open(info), info=info, with_weights=False))
    identity = _identity(info, global_batch_size, shard_index, shard_count)
    # Worker processes change the shape of Grain's state, so they are part of the identity.
    identity.update(seed=seed, shuffle=shuffle, num_epochs=num_epochs, worker_count=worker_count)
    return Loader(_to_iter(ds, worker_count, read_threads, prefetch_batches), identity, num_batches)


def make_eval_loader(
    data_dir: str | Path,
    split: str,
    global_batch_size: int,
    *,
    max_seq_length: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    read_threads: int = 2,
    prefetch_batches: int = 8,
) -> Loader:
    """One ordered pass: {"input_ids": int32 [b, L], "weights": float32 [b]} (0 on pad rows).

    Process i reads lines i, i + shard_count, ... Every process yields the same number of
    batches, `ceil(ceil(num_lines / shard_count) / b)`; rows past the end are all pad_id.
    """
    info = read_split(data_dir, split)
    shard_index, shard_count = _resolve_shard(shard_index, shard_count)
    batch_size = _per_process_batch(global_batch_size, shard_count)
    _check_seq_length(info, max_seq_length)

    num_batches = math.ceil(math.ceil(info.num_lines / shard_count) / batch_size)
    # Line k of this process is global line shard_index + k * shard_count; -1 marks a pad row.
    lines = np.arange(shard_index, info.num_lines, shard_count)
    lines = np.pad(lines, (0, num_batches * batch_size - len(lines)), constant_values=-1)
    ds = grain.MapDataset.source(lines).batch(batch_size, drop_remainder=True)
    ds = ds.map(functools.partial(_read_batch, source=_open(info), info=info, with_weights=True))
    identity = _identity(info, global_batch_size, shard_index, shard_count)
    return Loader(_to_iter(ds, 0, read_threads, prefetch_batches), identity, num_batches)


def _open(info: SplitInfo) -> grain.sources.ArrayRecordDataSource:
    source = grain.sources.ArrayRecordDataSource([str(f) for f in info.files])
    if len(source) != info.num_lines:
        raise PreparedDataError(
            f"split {info.split!r} of {info.data_dir}: metadata.json says {info.num_lines} lines, "
            f"the shards hold {len(source)} (an interrupted or mixed-up prepare run?)"
        )
    return source


def _read_batch(
    lines: np.ndarray,
    source: grain.sources.ArrayRecordDataSource,
    info: SplitInfo,
    with_weights: bool,
) -> dict:
    """Global line numbers (-1: a pad row) -> padded int32 ids, read in one batched call."""
    real = lines >= 0
    wanted = [int(i) for i in lines[real]]
    # One __getitems__ call reads the records in parallel, several times faster than one by one
    # (it refuses an empty list: an eval batch of pad rows only).
    records = iter(source.__getitems__(wanted) if wanted else [])
    ids = np.full((len(lines), info.max_seq_length), info.pad_id, dtype=np.int32)
    for row in np.flatnonzero(real):
        try:
            line = fmt.decode_line(next(records))
        except PreparedDataError as e:
            raise PreparedDataError(f"split {info.split!r} of {info.data_dir}: {e}") from None
        if line.size > info.max_seq_length:
            raise PreparedDataError(
                f"split {info.split!r} of {info.data_dir}: a line of {line.size} tokens is "
                f"longer than max_seq_length {info.max_seq_length}"
            )
        ids[row, : line.size] = line
    batch = {"input_ids": ids}
    if with_weights:
        batch["weights"] = real.astype(np.float32)
    return batch


def _to_iter(
    ds: grain.MapDataset, worker_count: int, read_threads: int, prefetch_batches: int
) -> grain.IterDataset:
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
    it = ds.to_iter_dataset(options)
    if worker_count > 0:
        # Grain 0.2.18 reads an absl flag in mp_prefetch and fails unless flags were parsed,
        # which only absl.app programs do (google/grain#1355, fixed upstream later).
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if (shard_index is None) != (shard_count is None):
        raise LoaderError("give both shard_index and shard_count, or neither")
    if shard_index is None:
        return jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise LoaderError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
    return shard_index, shard_count


def _per_process_batch(global_batch_size: int, shard_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % shard_count:
        raise LoaderError(
            f"global batch size {global_batch_size} is not a positive multiple of the "
            f"{shard_count} processes reading the data"
        )
    return global_batch_size // shard_count


def _check_seq_length(info: SplitInfo, max_seq_length: int | None) -> None:
    if max_seq_length is not None and max_seq_length != info.max_seq_length:
        raise IncompatibleDataError(
            f"max_seq_length {max_seq_length} asked for, but {info.data_dir} was prepared with "
            f"max_seq_length {info.max_seq_length}: prepare the data again or change the config"
        )


def _identity(info: SplitInfo, global_batch_size: int, shard_index: int, shard_count: int) -> dict:
    return {
        "split": info.split,
        "num_lines": info.num_lines,
        "tokenizer_fingerprint": info.tokenizer_fingerprint,
        "global_batch_size": global_batch_size,
        "shard_index": shard_index,
        "shard_count": shard_count,
    }
