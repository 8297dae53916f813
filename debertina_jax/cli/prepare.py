"""Tokenize text into packed train/eval ArrayRecord shards (the prepare step on its own).

    python -m debertina_jax.cli.prepare --tokenizer tok/ --input corpus/ --output data/
    (installed as `debertina-prepare`)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from debertina_jax.data.prepare import prepare
from debertina_jax.data.sources import DocumentSource
from debertina_jax.data.sources.hf_datasets import HfDataset, HfDatasetSource
from debertina_jax.data.sources.local import DEFAULT_CHUNK_BYTES, LocalFiles
from debertina_jax.data.sources.tfds import DEFAULT_NAME, DEFAULT_SPLIT, TfdsSource

# -------------------------------------------------------------------------------------- CLI


def _source_from_args(args: argparse.Namespace) -> DocumentSource:
    if args.tfds:
        return TfdsSource(args.tfds, args.split or DEFAULT_SPLIT, args.data_dir, args.text_key)
    if args.hf_dataset:
        dataset = HfDataset(
            args.hf_dataset,
            args.hf_config,
            args.split or "train",
            tuple(args.input) if args.input else None,
            streaming=not args.no_streaming,
            text_key=args.text_key,
        )
        return HfDatasetSource(dataset)
    return LocalFiles(
        args.input,
        encoding=args.encoding,
        errors=args.errors,
        text_key=args.text_key,
        chunk_bytes=int(args.chunk_mb * (1 << 20)),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="debertina-prepare",
        description="Tokenize text into packed train/eval ArrayRecord shards.",
    )
    parser.add_argument("--tokenizer", required=True, help="directory of the exported tokenizer")
    parser.add_argument("--output", required=True, help="directory for shards and metadata.json")
    where = parser.add_argument_group("source (one of)")
    where.add_argument("--input", nargs="+", help="local files, globs or folders")
    where.add_argument("--tfds", nargs="?", const=DEFAULT_NAME, help=f"TFDS name ({DEFAULT_NAME})")
    where.add_argument("--hf-dataset", help="HF dataset path, e.g. allenai/c4")
    where.add_argument("--hf-config", default=None, help="HF dataset config, e.g. pt")
    where.add_argument("--split", help=f"TFDS/HF split ({DEFAULT_SPLIT} / train)")
    where.add_argument("--data-dir", help="TFDS data_dir (local or gs://)")
    where.add_argument("--no-streaming", action="store_true", help="HF: download, don't stream")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--encoding", default="utf-8")
    parser.add_argument("--errors", default="strict", help="codec errors: strict/replace/ignore")
    parser.add_argument("--chunk-mb", type=float, default=DEFAULT_CHUNK_BYTES / (1 << 20))
    parser.add_argument("--max-seq-length", type=int, default=512)
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--eval-lines", type=int, help="lines held out for eval")
    split.add_argument("--eval-fraction", type=float, help="fraction of lines held out for eval")
    parser.add_argument("--lines-per-shard", type=int, default=65536)
    parser.add_argument("--num-workers", type=int, default=None, help="default: CPU count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if sum(map(bool, (args.input and not args.hf_dataset, args.tfds, args.hf_dataset))) != 1:
        parser.error("give exactly one source: --input, --tfds or --hf-dataset")
    start = time.perf_counter()
    try:
        metadata = prepare(
            _source_from_args(args),
            args.tokenizer,
            args.output,
            max_seq_length=args.max_seq_length,
            eval_lines=args.eval_lines,
            eval_fraction=args.eval_fraction,
            lines_per_shard=args.lines_per_shard,
            num_workers=args.num_workers,
            seed=args.seed,
            overwrite=args.overwrite,
            show_progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    train, evals = metadata["splits"]["train"], metadata["splits"]["eval"]
    print(
        f"wrote {args.output}: {metadata['num_documents']} documents, "
        f"{train['num_lines']} train + {evals['num_lines']} eval lines, "
        f"{train['num_tokens'] + evals['num_tokens']} tokens in {elapsed:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
