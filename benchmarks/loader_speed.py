"""How many batches per second the training loader delivers on this machine.

    python -m benchmarks.loader_speed --data-dir WORKDIR/data --batch-size 8 --seq-len 512
    python -m benchmarks.loader_speed --synthetic-lines 20000 --batch-size 256 --seq-len 512

Prints one JSON line. Compare batches/s with 1 / (train step time): the loader must be faster.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from debertina_jax.data.format import FORMAT_VERSION, ShardWriter, write_metadata
from debertina_jax.data.loader import make_loader


def measure_loader(
    data_dir: str | Path,
    batch_size: int,
    seq_len: int,
    *,
    num_batches: int = 200,
    worker_count: int = 0,
    read_threads: int = 2,
) -> float:
    """Batches per second of one process's shuffled training loader, after a 5-batch warm-up."""
    with make_loader(
        data_dir,
        "train",
        batch_size,
        seed=0,
        max_seq_length=seq_len,
        shard_index=0,
        shard_count=1,
        worker_count=worker_count,
        read_threads=read_threads,
    ) as loader:
        for _ in range(5):
            next(loader)
        start = time.perf_counter()
        for _ in range(num_batches):
            next(loader)
        return num_batches / (time.perf_counter() - start)


def write_synthetic(data_dir: Path, num_lines: int, seq_len: int, shards: int = 4) -> Path:
    """Full-length random lines in the prepared format (the common case in pretraining)."""
    rng = np.random.default_rng(0)
    writer = ShardWriter(data_dir, "train", lines_per_shard=-(-num_lines // shards))
    for _ in range(num_lines):
        writer.write(np.concatenate([[1], rng.integers(5, 32000, seq_len - 2), [2]]))
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer_fingerprint": "synthetic",
        "max_seq_length": seq_len,
        "pad_id": 0,
        "cls_id": 1,
        "sep_id": 2,
        "mask_id": 32000,
        "splits": {"train": writer.close()},
        "num_documents": num_lines,
    }
    write_metadata(data_dir, meta)
    return data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="a prepared data directory")
    parser.add_argument("--synthetic-lines", type=int, default=0, help="or write this many lines")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--num-batches", type=int, default=200)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--read-threads", type=int, default=2)
    args = parser.parse_args()
    if (args.data_dir is None) == (args.synthetic_lines == 0):
        parser.error("give exactly one of --data-dir and --synthetic-lines")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = write_synthetic(Path(tmp), args.synthetic_lines, args.seq_len)
        rate = measure_loader(
            data_dir,
            args.batch_size,
            args.seq_len,
            num_batches=args.num_batches,
            worker_count=args.workers,
            read_threads=args.read_threads,
        )
    result = {
        "benchmark": "loader",
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "workers": args.workers,
        "read_threads": args.read_threads,
        "batches_per_s": round(rate, 2),
        "tokens_per_s": round(rate * args.batch_size * args.seq_len),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
