"""Throughput of the data pipeline: one function per measurement, one JSON line per result.

    python -m benchmarks.data_pipeline --corpus /work/shared/corpus/pt [--only prepare]

Measurements (in this order; later ones reuse the tokenizer and prepared data of earlier ones):
- tokenizer_training: seconds to train and export the SentencePiece tokenizer.
- tokenize: raw Tokenizer.encode_batch throughput in this process (no I/O, no packing).
- prepare: tokens/s and documents/s of the whole prepare step (read, tokenize, pack, write).

The corpus is copied `--copies` times into the work directory so that runs on a small corpus
last long enough to measure.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from debertina_jax.data import format as fmt
from debertina_jax.data.prepare import prepare
from debertina_jax.data.sources.local import LocalFiles
from debertina_jax.data.tokenizer import Tokenizer, train_tokenizer


class Context:
    """Settings plus the artefacts measurements share, built on first use."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir

    @functools.cached_property
    def corpus(self) -> Path:
        out = self.workdir / "corpus"
        out.mkdir(exist_ok=True)
        for copy in range(self.args.copies):
            for i, path in enumerate(LocalFiles([self.args.corpus]).files):
                shutil.copy(path, out / f"{copy:03d}-{i:03d}-{path.name}")
        return out

    @functools.cached_property
    def corpus_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.corpus.iterdir())

    @functools.cached_property
    def tokenizer_dir(self) -> Path:
        return train_tokenizer([self.corpus], self.args.vocab_size, self.workdir / "tokenizer")

    @functools.cached_property
    def prepared_dir(self) -> Path:
        out = self.workdir / "prepared"
        prepare(
            LocalFiles([self.corpus], chunk_bytes=self.args.chunk_mb << 20),
            self.tokenizer_dir,
            out,
            max_seq_length=self.args.max_seq_length,
            num_workers=self.args.num_workers,
            show_progress=False,
        )
        return out


def measure_tokenizer_training(ctx: Context) -> dict:
    start, cpu = time.perf_counter(), _cpu_seconds()
    ctx.__dict__["tokenizer_dir"] = train_tokenizer(
        [ctx.corpus], ctx.args.vocab_size, ctx.workdir / "tokenizer"
    )
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "vocab_size": ctx.args.vocab_size,
        "corpus_mb": round(ctx.corpus_bytes / 1e6, 2),
    }


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children: robust to a busy shared machine."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure_tokenize(ctx: Context) -> dict:
    tokenizer = Tokenizer.load(ctx.tokenizer_dir)
    documents = list(LocalFiles([ctx.corpus]).documents())
    tokenizer.encode_batch(documents[:100])  # warm up the thread pool
    start, cpu = time.perf_counter(), _cpu_seconds()
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(documents))
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return {
        "tokens_per_s": round(tokens / seconds),
        "tokens_per_cpu_s": round(tokens / cpu),
        "tokens": tokens,
        "documents": len(documents),
    }


def measure_prepare(ctx: Context) -> dict:
    shutil.rmtree(ctx.workdir / "prepared", ignore_errors=True)
    ctx.__dict__.pop("prepared_dir", None)
    _ = ctx.tokenizer_dir  # not part of the timing
    start, cpu = time.perf_counter(), _cpu_seconds()
    out = ctx.prepared_dir
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    metadata = fmt.read_metadata(out)
    tokens = sum(split["num_tokens"] for split in metadata["splits"].values())
    return {
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds),
        "tokens_per_cpu_s": round(tokens / cpu),
        "documents_per_s": round(metadata["num_documents"] / seconds),
        "mb_per_s": round(ctx.corpus_bytes / 1e6 / seconds, 2),
        "tokens": tokens,
        "num_workers": ctx.args.num_workers or os.cpu_count(),
    }


MEASUREMENTS: dict[str, Callable[[Context], dict]] = {
    "tokenizer_training": measure_tokenizer_training,
    "tokenize": measure_tokenize,
    "prepare": measure_prepare,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True, help="folder or files of .txt/.jsonl text")
    parser.add_argument("--copies", type=int, default=4, help="times the corpus is repeated")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--num-workers", type=int, default=None, help="prepare processes")
    parser.add_argument("--chunk-mb", type=int, default=1, help="prepare work-unit size")
    parser.add_argument("--only", nargs="+", choices=sorted(MEASUREMENTS), help="subset to run")
    parser.add_argument("--workdir", help="keep artefacts here (default: a temp dir)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="data_pipeline_"))
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(args, workdir)
    machine = {
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    try:
        for name, measure in MEASUREMENTS.items():
            if args.only and name not in args.only:
                continue
            result = {"measurement": name, **measure(ctx), **machine}
            print(json.dumps(result), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
