"""Fine-tune and evaluate a pretrained discriminator on a labelled task.

    python -m debertina_jax.finetune --model MODEL --train FILE --validation FILE \\
        [--test FILE] --text-fields FIELD[,FIELD2] --label-field FIELD \\
        --task-type classification|regression|token-classification --output OUT \\
        [section.key=value ...]
    python -m debertina_jax.finetune --model MODEL --task assin2-rte --output OUT

MODEL is a pretraining workdir (its latest checkpoint, or --step) or a Hugging Face DeBERTa-v2/v3
directory. Writes OUT/results.json, OUT/metrics.jsonl, OUT/tensorboard/ and OUT/hf/ (the best
model, for transformers' AutoModelFor{Sequence,Token}Classification).
"""

from __future__ import annotations

import argparse
import logging
import sys

from debertina_jax.config import ConfigError


def add_task_arguments(parser: argparse.ArgumentParser, test: bool = True) -> None:
    """The flags that name a task: --task, or files with their fields and type (also used by
    the benchmarks that fine-tune)."""
    from debertina_jax.finetune.tasks import NAMED_TASKS

    parser.add_argument("--task", help=f"a named task: {', '.join(NAMED_TASKS)}")
    parser.add_argument("--train", help="training file (.csv .tsv .jsonl .parquet)")
    parser.add_argument("--validation", help="validation file (early stopping, best model)")
    if test:
        parser.add_argument("--test", help="test file, scored once with the best model")
    parser.add_argument(
        "--text-fields", type=_fields, help="FIELD or FIELD1,FIELD2 (a sentence pair)"
    )
    parser.add_argument("--label-field", help="the label column")
    parser.add_argument(
        "--task-type", choices=("classification", "regression", "token-classification")
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m debertina_jax.finetune",
        description=__doc__.split("\n\n")[0],
        epilog="Settings are dotted keys, e.g. optimizer.learning_rate=3e-5 "
        "optimizer.layer_decay=0.9 train.epochs=5 train.batch_size=16 train.max_length=128 "
        "train.patience=2 model.hidden_dropout_prob=0.1 mesh.data=-1 (docs/finetune.md lists all)",
    )
    parser.add_argument("--model", required=True, help="pretraining workdir or HF directory")
    parser.add_argument("--step", type=int, help="checkpoint step of a workdir (default: latest)")
    add_task_arguments(parser)
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--seeds", type=int, default=1, help="fine-tune N times (seeds 0..N-1)")
    parser.add_argument("--sift", action="store_true", help="add SiFT adversarial training")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="baseline: the model's shape and tokenizer with random weights",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.add_argument("--no-export", action="store_true", help="do not write OUT/hf")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("debertina_jax").setLevel(logging.INFO)
    # orbax warns through absl on every read-only restore of a workdir; errors still show.
    logging.getLogger("absl").setLevel(logging.ERROR)
    from debertina_jax.finetune.settings import parse_settings

    overrides = list(args.overrides) + (["sift.enabled=true"] if args.sift else [])
    try:
        settings = parse_settings(overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # JAX loads here, after the cheap checks.
    from debertina_jax.finetune.export_hf import ExportVerificationError
    from debertina_jax.finetune.run import FinetuneJob, finetune
    from debertina_jax.finetune.tables import TaskFileError

    job = FinetuneJob(
        model=args.model,
        output=args.output,
        task=args.task,
        train=args.train,
        validation=args.validation,
        test=args.test,
        text_fields=args.text_fields,
        label_field=args.label_field,
        task_type=args.task_type,
        step=args.step,
        seeds=args.seeds,
        random_init=args.random_init,
        export=not args.no_export,
        progress=not args.no_progress,
        settings=settings,
    )
    try:
        result = finetune(job, overwrite=args.overwrite)
    except (ConfigError, TaskFileError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, ExportVerificationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary_text(result))
    return 0


def _fields(text: str) -> tuple[str, ...]:
    return tuple(f.strip() for f in text.split(","))


def summary_text(result: dict) -> str:
    """A few lines: the task, the mean +- std of each metric over seeds, where things are."""
    seeds = len(result["seeds"])
    lines = [
        f"{result['task']} ({result['task_type']}), {seeds} seed(s), {result['steps']} steps "
        f"each, model {result['model']}"
        + (f" step {result['model_step']}" if result["model_step"] is not None else "")
        + (" [random init]" if result["random_init"] else "")
    ]
    for split in ("validation", "test"):
        if split in result["mean"]:
            parts = []
            for name, mean in result["mean"][split].items():
                std = result["std"][split][name]
                parts.append(f"{name} {_fmt(mean)}" + (f" +- {_fmt(std)}" if seeds > 1 else ""))
            lines.append(f"  {split}: " + ", ".join(parts))
    rate = result["mean"].get("train_examples_per_second")
    if rate:
        lines.append(f"  training: {rate:,.1f} examples/s")
    if result["hf"]:
        lines.append(f"  best model (seed {result['best_seed']}) for transformers: OUT/hf")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
