"""Train a SentencePiece unigram tokenizer on text files and write HF tokenizer files.

    python -m debertina_jax.cli.tokenizer --input corpus/ --vocab-size 8000 --output tok/
    (installed as `debertina-tokenizer`)

At the end it prints the [UNK] rate on a slice of the input held out of training
(--heldout-fraction, 1% of the documents by default).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from debertina_jax.data.sources import SourceError
from debertina_jax.data.sources.local import LocalFiles
from debertina_jax.data.tokenizer import Tokenizer, VocabSizeError, train_tokenizer_with_report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="debertina-tokenizer", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--input", nargs="+", required=True, help="text files, globs or folders (.txt, .jsonl...)"
    )
    parser.add_argument("--vocab-size", type=int, required=True, help="number of spm pieces")
    parser.add_argument("--output", required=True, help="directory for the HF tokenizer files")
    parser.add_argument("--encoding", default="utf-8")
    parser.add_argument("--errors", default="strict", help="codec errors: strict/replace/ignore")
    parser.add_argument("--text-key", default="text", help="field of .jsonl/.parquet inputs")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument(
        "--max-sentences", type=int, default=5_000_000, help="text read, in pieces of <= 1 KB"
    )
    parser.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.01,
        help="documents left out of training to measure the [UNK] rate on (0: none)",
    )
    parser.add_argument("--verbose", action="store_true", help="show SentencePiece's log")
    args = parser.parse_args(argv)
    if not 0.0 <= args.heldout_fraction < 1.0:
        parser.error(f"--heldout-fraction must be in [0, 1), got {args.heldout_fraction}")
    start = time.perf_counter()
    try:
        source = LocalFiles(
            args.input, encoding=args.encoding, errors=args.errors, text_key=args.text_key
        )
        report = train_tokenizer_with_report(
            source,
            args.vocab_size,
            args.output,
            character_coverage=args.character_coverage,
            heldout_fraction=args.heldout_fraction,
            max_sentences=args.max_sentences,
            verbose=args.verbose,
        )
    except (SourceError, VocabSizeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = Tokenizer.load(report.output_dir)
    print(
        f"wrote {report.output_dir}: {tokenizer.num_pieces} pieces + [MASK]={tokenizer.mask_id} "
        f"in {time.perf_counter() - start:.1f}s"
    )
    print(report.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
