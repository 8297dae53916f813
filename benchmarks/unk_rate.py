"""How often the tokenizer says [UNK] on text it was not trained on, with and without the
characters that always get a piece (debertina_jax.data.tokenizer.REQUIRED_CHARS).

    python -m benchmarks.unk_rate --train /work/shared/corpus/pt/focalinux.txt \
        --eval fortunes=/work/shared/corpus/pt/fortunes-br.txt \
        --eval sample=debertina_jax/sample_data/pt --vocab-size 8000

For each setting ("coverage only": SentencePiece's character coverage alone, as before the
required characters; "required chars": the default), it trains a tokenizer on --train, holding
out --heldout-fraction of its documents, and measures the [UNK] rate on that held-out slice
(the same domain) and on each --eval set (a domain shift). Prints one JSON line per
measurement and a Markdown table at the end (docs/tokenizer.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from debertina_jax.data.sources.local import LocalFiles
from debertina_jax.data.tokenizer import (
    REQUIRED_CHARS,
    Tokenizer,
    UnknownRate,
    measure_unknown,
    train_tokenizer_with_report,
)

SETTINGS = {"coverage only": "", "required chars": REQUIRED_CHARS}


def _eval_set(text: str) -> tuple[str, list[Path]]:
    name, sep, paths = text.partition("=")
    if not sep:
        name, paths = Path(text).stem, text
    return name, [Path(p) for p in paths.split(",")]


def _row(setting: str, text: str, rate: UnknownRate) -> dict:
    return {
        "setting": setting,
        "text": text,
        "tokens": rate.tokens,
        "unknown": rate.unknown,
        "unk_percent": round(100 * rate.rate, 4),
        "characters": "".join(c for c, _ in rate.characters[:20]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", nargs="+", required=True, help="tokenizer corpus (paths)")
    parser.add_argument(
        "--eval", action="append", default=[], help="NAME=PATH[,PATH...]: a domain shift"
    )
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--heldout-fraction", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    evals = [_eval_set(e) for e in args.eval]
    eval_texts = {name: list(LocalFiles(paths).documents()) for name, paths in evals}

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (setting, required) in enumerate(SETTINGS.items()):
            start = time.perf_counter()
            report = train_tokenizer_with_report(
                [Path(p) for p in args.train],
                args.vocab_size,
                Path(tmp) / str(i),
                required_chars=required,
                heldout_fraction=args.heldout_fraction,
                num_threads=args.threads,
            )
            seconds = time.perf_counter() - start
            if report.heldout is None:
                print(f"error: {report.describe()}", file=sys.stderr)
                return 2
            tokenizer = Tokenizer.load(report.output_dir)
            measured = {f"held out ({report.heldout_documents} docs)": report.heldout}
            measured.update({n: measure_unknown(tokenizer, t) for n, t in eval_texts.items()})
            for text, rate in measured.items():
                row = _row(setting, text, rate) | {"train_seconds": round(seconds, 1)}
                print(json.dumps(row, ensure_ascii=False), flush=True)
                rows.append(row)

    print(f"\n{args.vocab_size} pieces, trained on {', '.join(args.train)}\n")
    print("| setting | text | tokens | [UNK] | characters behind [UNK] (most frequent first) |")
    print("|---|---|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['text']} | {r['tokens']:,} | {r['unk_percent']:.3f}% "
            f"| {r['characters'] or '-'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
