"""Training lines of any length up to the prepared one, cut from the same prepared data, for the
sequence-length phases of a run (`train.phases`, config/phases.py).

The prepared lines ([CLS] + up to S = prepared length - 2 text ids + [SEP]) are read as one
stream of text: the same shuffled, repeated stream of line numbers as the plain loader's
(loader.line_stream), each line contributing its S text slots (a short line, the last of the
corpus, leaves the rest of its slots empty). A phase of length L cuts that stream, from where
the phases before it stopped, into consecutive rows of L - 2 slots; each row becomes
[CLS] + its text + [SEP], padded to L. So

- every phase continues the token stream where the previous one stopped: no text is repeated
  or skipped except where an epoch of the shuffle ends, as in a single-phase run;
- a row crosses at most two prepared lines (L <= prepared length), read in one batched call;
- one phase at the prepared length from the start of the stream gives exactly the plain
  loader's batches (each row is one prepared line);
- rows next to each other may hold neighbouring text of one prepared line (a 512 line gives
  four 128 rows): the shuffle mixes prepared lines, not the pieces of one.

Like the plain loader, a batch is a pure function of its index, so the loader's state is a
small dict of integers and a resumed phase gives exactly the batches that would have come.
"""

from __future__ import annotations

import functools
from pathlib import Path

import grain
import numpy as np

from debertina_jax.config import Config, Phase
from debertina_jax.data import format as fmt
from debertina_jax.data.format import PreparedDataError
from debertina_jax.data.loader import (
    _ENDLESS,
    Loader,
    LoaderError,
    SplitInfo,
    _identity,
    _open,
    _per_process_batch,
    _resolve_shard,
    _to_iter,
    line_stream,
    make_loader,
    read_split,
)

# A row's pieces: (stream position, first slot, end slot) of at most two prepared lines;
# position -1 marks an unused piece.
_PIECES = 2


def phase_start_slot(phases: tuple[Phase, ...], index: int) -> int:
    """Where phase `index` starts in the text stream: the slots the phases before it used."""
    return sum(p.steps * p.batch_size * (p.max_seq_length - 2) for p in phases[:index])


def make_phase_loader(
    data_dir: str | Path,
    split: str,
    global_batch_size: int,
    *,
    seed: int,
    seq_length: int,
    start_slot: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    read_threads: int = 2,
    prefetch_batches: int = 8,
) -> Loader:
    """Endless training batches {"input_ids": int32 [global_batch_size / shard_count,
    seq_length]}, cut from `split` starting `start_slot` text slots into its stream."""
    info = read_split(data_dir, split)
    if not 3 <= seq_length <= info.max_seq_length:
        raise LoaderError(
            f"a phase of length {seq_length} cannot be cut from {info.data_dir}, prepared at "
            f"max_seq_length {info.max_seq_length}: it must be in [3, {info.max_seq_length}]"
        )
    if start_slot < 0:
        raise LoaderError(f"start_slot must be >= 0, got {start_slot}")
    metadata = fmt.read_metadata(info.data_dir)
    shard_index, shard_count = _resolve_shard(shard_index, shard_count)
    batch_size = _per_process_batch(global_batch_size, shard_count)
    stream = line_stream(info.num_lines, seed)
    slots, body = info.max_seq_length - 2, seq_length - 2

    def pieces(k: int) -> np.ndarray:
        """The pieces of local row k: global row r of batch j starts at slot
        start_slot + (j * B + r) * body of the stream."""
        step, row = divmod(k, batch_size)
        first = start_slot + (step * global_batch_size + shard_index * batch_size + row) * body
        out = np.full((_PIECES, 3), -1, np.int64)
        for n, position in enumerate(range(first // slots, (first + body - 1) // slots + 1)):
            lo = max(first, position * slots) - position * slots
            hi = min(first + body, (position + 1) * slots) - position * slots
            out[n] = (stream[position], lo, hi)
        return out

    local_length = _ENDLESS // global_batch_size * batch_size
    ds = grain.MapDataset.range(local_length).map(pieces)
    ds = ds.batch(batch_size, drop_remainder=True)
    read = functools.partial(
        _read_rows,
        source=_open(info),
        info=info,
        seq_length=seq_length,
        cls_id=int(metadata["cls_id"]),
        sep_id=int(metadata["sep_id"]),
    )
    ds = ds.map(read)
    identity = _identity(info, global_batch_size, shard_index, shard_count)
    identity.update(seed=seed, seq_length=seq_length, start_slot=start_slot)
    return Loader(_to_iter(ds, 0, read_threads, prefetch_batches), identity, None)


def _read_rows(
    pieces: np.ndarray,
    source: grain.sources.ArrayRecordDataSource,
    info: SplitInfo,
    seq_length: int,
    cls_id: int,
    sep_id: int,
) -> dict[str, np.ndarray]:
    """[b, pieces, 3] -> {"input_ids": int32 [b, seq_length]}, every prepared line read once."""
    wanted = sorted({int(line) for line in pieces[..., 0].ravel() if line >= 0})
    texts = {}
    for line, record in zip(wanted, source.__getitems__(wanted), strict=True):
        ids = fmt.decode_line(record)
        if ids.size < 2 or ids[0] != cls_id or ids[-1] != sep_id:
            raise PreparedDataError(
                f"split {info.split!r} of {info.data_dir}: line {line} is not [CLS] ... [SEP]"
            )
        texts[line] = ids[1:-1]
    rows = np.full((len(pieces), seq_length), info.pad_id, dtype=np.int32)
    for row, row_pieces in enumerate(pieces):
        text = [texts[int(line)][lo:hi] for line, lo, hi in row_pieces if line >= 0]
        ids = np.concatenate([[cls_id], *text, [sep_id]])
        rows[row, : ids.size] = ids
    return {"input_ids": rows}


def phase_loader(
    config: Config,
    data_dir: str | Path,
    phases: tuple[Phase, ...],
    phase: Phase,
    **options: int,
) -> Loader:
    """The train loader of one phase of a run. A run without train.phases reads with the plain
    loader (loader.make_loader), as it always has, so its checkpoints' data states still fit."""
    if not config.train.phases:
        return make_loader(
            data_dir,
            "train",
            phase.batch_size,
            seed=config.train.seed,
            max_seq_length=phase.max_seq_length,
            **options,
        )
    return make_phase_loader(
        data_dir,
        "train",
        phase.batch_size,
        seed=config.train.seed,
        seq_length=phase.max_seq_length,
        start_slot=phase_start_slot(phases, phase.index),
        **options,
    )
