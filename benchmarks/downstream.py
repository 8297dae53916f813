"""The downstream metric along a pretraining run: fine-tune every (or every k-th) checkpoint of
RUN on a task, and a randomly initialised model of the same shape as the baseline; write a
table and a plot of the metric (mean +- std over seeds) against the pretraining step.

    python benchmarks/downstream.py --workdir runs/tiny --task temas --seeds 3 \\
        --output runs/tiny/downstream [--every 2] [section.key=value ...]

Writes OUTPUT/downstream.json, OUTPUT/downstream.md and OUTPUT/downstream.png (the plot needs
matplotlib: `pip install 'debertina-jax[bench]'`), and each fine-tuning run's own results under
OUTPUT/step-N/ and OUTPUT/random/.
A run keeps only `checkpoint.keep` checkpoints: pretrain with a larger keep for a finer curve.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from debertina_jax.finetune.cli import add_task_arguments
from debertina_jax.finetune.run import FinetuneJob, finetune
from debertina_jax.finetune.settings import parse_settings
from debertina_jax.runtime.checkpointing import Checkpointer, CheckpointNotFoundError


def checkpoint_steps(workdir: str, every: int) -> list[int]:
    """Every `every`-th saved step, always including the last."""
    try:
        with Checkpointer(workdir, every_steps=1, keep=1, read_only=True) as checkpointer:
            steps = sorted(checkpointer.all_steps())
    except CheckpointNotFoundError as error:
        raise SystemExit(f"error: {error}") from None
    if not steps:
        raise SystemExit(f"error: no checkpoints in {workdir}")
    chosen = steps[::every]
    return chosen if chosen[-1] == steps[-1] else [*chosen, steps[-1]]


def fine_tune(args, settings, step: int | None, out: Path) -> dict:
    job = FinetuneJob(
        model=args.workdir, output=str(out), task=args.task, train=args.train,
        validation=args.validation, test=args.test, text_fields=args.text_fields,
        label_field=args.label_field, task_type=args.task_type, step=step,
        seeds=args.seeds, random_init=step is None, export=False, progress=False,
        settings=settings,
    )  # fmt: skip
    return finetune(job, overwrite=True)


def table(rows: list[dict], metric: str) -> str:
    lines = [
        f"| pretraining step | validation {metric} (mean +- std) | test {metric} |",
        "|---:|---:|---:|",
    ]
    for r in rows:
        test = "" if r["test_mean"] is None else f"{r['test_mean']:.4f} +- {r['test_std']:.4f}"
        lines.append(f"| {r['label']} | {r['mean']:.4f} +- {r['std']:.4f} | {test} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], metric: str, task: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "no plot: matplotlib is missing (pip install 'debertina-jax[bench]')", file=sys.stderr
        )
        return False
    curve = [r for r in rows if r["step"] is not None]
    baseline = next((r for r in rows if r["step"] is None), None)
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in curve]
    ax.errorbar(steps, [r["mean"] for r in curve], yerr=[r["std"] for r in curve],
                marker="o", capsize=3, label="pretrained")  # fmt: skip
    if baseline is not None:
        ax.axhline(baseline["mean"], color="gray", linestyle="--", label="random init")
        ax.axhspan(baseline["mean"] - baseline["std"], baseline["mean"] + baseline["std"],
                   color="gray", alpha=0.15)  # fmt: skip
    ax.set_xlabel("pretraining step")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"{task}: fine-tuned from each checkpoint")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    add_task_arguments(parser)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--every", type=int, default=1, help="every k-th checkpoint")
    parser.add_argument("--no-baseline", action="store_true", help="skip the random init")
    parser.add_argument("--output", required=True)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on read-only checkpoints
    settings = parse_settings(args.overrides)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    runs: list[tuple[int | None, Path]] = [
        (step, out / f"step-{step}") for step in checkpoint_steps(args.workdir, args.every)
    ]
    if not args.no_baseline:
        runs.insert(0, (None, out / "random"))
    rows = []
    for step, run_out in runs:
        result = fine_tune(args, settings, step, run_out)
        metric = result["metric"]
        test = result["mean"].get("test")
        rows.append({
            "step": step,
            "label": "random init" if step is None else str(step),
            "mean": result["mean"]["validation"][metric],
            "std": result["std"]["validation"][metric],
            "test_mean": None if test is None else test[metric],
            "test_std": None if test is None else result["std"]["test"][metric],
            "seeds": [s["validation"][metric] for s in result["seeds"]],
        })  # fmt: skip
        print(f"{rows[-1]['label']:>12}: {metric} {rows[-1]['mean']:.4f} +- {rows[-1]['std']:.4f}")
    task = args.task or args.train
    summary = {"workdir": args.workdir, "task": task, "metric": metric, "seeds": args.seeds,
               "settings": settings.to_dict(), "rows": rows}  # fmt: skip
    (out / "downstream.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "downstream.md").write_text(table(rows, metric))
    plotted = plot(rows, metric, task, out / "downstream.png")
    print(table(rows, metric), end="")
    print(
        f"wrote {out / 'downstream.json'}, downstream.md" + (", downstream.png" if plotted else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
