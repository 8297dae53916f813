"""What a pretraining run has learned, in a few lines: the generator's fill-mask guesses
through the transformers pipeline, the discriminator's replaced-token detection against the
prior that calls every token original, and a short fine-tune of the discriminator on a labelled
task next to the same model with random weights.

    python -m debertina_jax.cli.report --workdir runs/tiny [--export runs/tiny/hf] \\
        [--task frases] [--sentence "Leve ao [MASK] preaquecido."] [section.key=value ...]

`--export` is what convert_to_pt.py wrote (default WORKDIR/hf); without it the fill-mask part
is skipped. The overrides are fine-tuning settings (docs/finetune.md); the defaults suit the
tiny config. Exit status: 0 done, 1 error, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# Sentences from the sample corpus's domains (cooking, science, technology), written for it.
DEFAULT_SENTENCES = (
    "Leve ao forno preaquecido a 200 °C por 20 [MASK].",
    "A água é formada por hidrogénio e [MASK].",
    "O computador tem um teclado e um [MASK].",
)
# A short fine-tune that fits the demo's budget: 10 epochs of frases (150 steps).
DEFAULT_FINETUNE = (
    "optimizer.learning_rate=1e-3",
    "train.batch_size=16",
    "train.epochs=10",
    "train.patience=0",
)
EXIT_ERROR, EXIT_USAGE = 1, 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the pretraining run directory")
    parser.add_argument("--export", help="convert_to_pt.py's output (default: WORKDIR/hf)")
    parser.add_argument(
        "--sentence",
        action="append",
        help="a sentence with [MASK] for the generator (repeatable; default: three Portuguese)",
    )
    parser.add_argument("--top-k", type=int, default=3, help="fill-mask guesses shown (3)")
    parser.add_argument("--task", default="frases", help="fine-tuning task (default: frases)")
    parser.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds per side (1)")
    parser.add_argument("--no-finetune", action="store_true", help="skip the fine-tune")
    parser.add_argument("--output", help="fine-tuning outputs (default: WORKDIR/report)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    for sentence in args.sentence or ():
        if "[MASK]" not in sentence:
            parser.error(f"--sentence {sentence!r} has no [MASK]")
    return args


def fill_mask_lines(export_dir: Path, sentences: tuple[str, ...], top_k: int) -> list[str]:
    """The generator's top-k guesses for each sentence's [MASK], through the HF pipeline."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    fill = transformers.pipeline("fill-mask", model=str(export_dir / "generator"), device="cpu")
    lines = [f"generator fill-mask, top {top_k} (transformers pipeline on {export_dir}/generator):"]
    for sentence in sentences:
        guesses = fill(sentence.replace("[MASK]", fill.tokenizer.mask_token), top_k=top_k)
        shown = ", ".join(f"{g['token_str'].strip()} ({g['score']:.2f})" for g in guesses)
        lines.append(f"  {sentence}  ->  {shown}")
    return lines


def rtd_lines(workdir: str) -> list[str]:
    """The last evaluation's replaced-token detection on held-out lines, against the prior."""
    from debertina_jax.runtime.metrics_log import read_metrics

    evals = read_metrics(workdir, split="eval")
    if not evals:
        return [f"discriminator: no evaluation rows in {workdir}/metrics.jsonl yet"]
    row = evals[-1]
    prior = 1.0 - row["replaced_fraction"]
    return [
        f"discriminator, replaced-token detection on held-out text (step {row['step']}, "
        f"{row['replaced_fraction']:.1%} of tokens replaced):",
        f"  precision {row['rtd_precision']:.3f}, recall {row['rtd_recall']:.3f}, accuracy "
        f"{row['rtd_accuracy']:.4f}; the all-original prior: recall 0, accuracy {prior:.4f}",
        f"generator: masked-token accuracy {row['mlm_accuracy']:.3f}",
    ]


def finetune_lines(args: argparse.Namespace, output: str) -> list[str]:
    """`args.task` fine-tuned from the run's discriminator and from random weights."""
    from debertina_jax.finetune.run import FinetuneJob, finetune
    from debertina_jax.finetune.settings import parse_settings
    from debertina_jax.storage import join

    settings = parse_settings([*DEFAULT_FINETUNE, *args.overrides])
    results = {}
    for side, random_init in (("pretrained", False), ("random init", True)):
        job = FinetuneJob(
            model=args.workdir, output=join(output, side.replace(" ", "-")), task=args.task,
            seeds=args.seeds, random_init=random_init, export=False, progress=False,
            settings=settings,
        )  # fmt: skip
        results[side] = finetune(job, overwrite=True)
    metric = results["pretrained"]["metric"]
    steps = results["pretrained"]["steps"]
    lines = [f"fine-tuned on {args.task} ({steps} steps, {args.seeds} seed(s) each), "
             f"validation {metric}:"]  # fmt: skip
    for side, result in results.items():
        mean, std = result["mean"]["validation"][metric], result["std"]["validation"][metric]
        lines.append(f"  {side:>12}: {mean:.4f}" + (f" +- {std:.4f}" if args.seeds > 1 else ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on read-only checkpoints
    from debertina_jax.config import ConfigError
    from debertina_jax.finetune.tables import TaskFileError
    from debertina_jax.storage import is_remote, join

    # transformers reads local directories only: a bucket run's export is named with --export.
    export = args.export or (None if is_remote(args.workdir) else join(args.workdir, "hf"))
    try:
        lines = rtd_lines(args.workdir)
        if export and (Path(export) / "generator" / "config.json").is_file():
            sentences = tuple(args.sentence or DEFAULT_SENTENCES)
            lines = fill_mask_lines(Path(export), sentences, args.top_k) + lines
        else:
            lines.insert(0, f"no local export at {export} (convert_to_pt.py): no fill-mask")
        print("\n".join(lines), flush=True)
        if not args.no_finetune:
            print("\n".join(finetune_lines(args, args.output or join(args.workdir, "report"))))
    except (ConfigError, TaskFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
