"""What the recipe knobs buy on the tiny config and the sample corpus, on this machine's CPU.

    python benchmarks/phases.py --steps 400 --root /tmp/phases-bench

Three runs of configs/tiny.yaml (data prepared once at 128 tokens, shared by all):

  single   every step at 128 tokens, batch 16 (the plain recipe, one AdamW)
  phased   80% of its steps at 64 tokens x batch 32, then 20% at 128 x 16 (the same tokens per
           step), with as many steps as fit in the single run's training time: the step times
           of both shapes are measured first (`calibrate`), so the two runs get equal wall time
  decoupled  the single run with optimizer.decoupled: true (two AdamW, each with its clip)

Every run evaluates at 128 tokens on the same held-out lines and masks, 8 times. Step times
leave out the first logged window of each phase (its compile); the evaluations' time is not
training time. The report (JSON, and a Markdown summary on stdout) has both eval MLM curves
against training seconds, the tokens/s of each phase and the train-loss curves of single vs
decoupled. Runs are in-process and sequential; `uptime` is recorded before and after, since the
machine's load decides the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
os.environ.setdefault("JAX_PLATFORMS", "cpu")

TINY_YAML = ROOT / "configs" / "tiny.yaml"
EVALS = 8  # evaluations per run
LOG_EVERY = 10


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


UPTIMES: dict[str, list[str]] = {}  # run -> uptime before and after it, when trained now


def _run(root: Path, name: str, overrides: list[str]) -> list[dict[str, Any]]:
    """Trains (or reuses a finished run) and returns its metrics rows."""
    from debertina_jax.config import load_config
    from debertina_jax.pretraining.loop import pretrain
    from debertina_jax.runtime.metrics_log import read_metrics

    workdir = root / name
    data = [f"data.tokenizer_dir={root}/tokenizer", f"data.prepared_dir={root}/data"]
    config = load_config(TINY_YAML, [*data, f"train.log_every_steps={LOG_EVERY}", *overrides])
    if not (workdir / "checkpoints" / str(config.train.steps)).is_dir():
        started, before = time.perf_counter(), _uptime()
        pretrain(config, workdir)
        UPTIMES[name] = [before, _uptime()]
        logging.warning("%s: %.0f s", name, time.perf_counter() - started)
    return read_metrics(workdir)


def _step_seconds(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Median seconds per step of each max_seq_length, leaving out the first logged window of
    each length (the compile, and the loader filling up)."""
    by_length: dict[int, list[float]] = {}
    seen: set[int] = set()
    for row in rows:
        if row["split"] != "train":
            continue
        length = int(row["max_seq_length"])
        if length not in seen:
            seen.add(length)
            continue
        step = row["batch_size"] * length / row["tokens_per_second"]
        by_length.setdefault(length, []).append(step)
    return {length: statistics.median(v) for length, v in by_length.items()}


def _curve(
    rows: list[dict[str, Any]], seconds: dict[int, float], short_until: int
) -> list[dict[str, float]]:
    """(step, training seconds, eval MLM loss / accuracy at 128 tokens) of every evaluation;
    training seconds = each step's median step time (64 tokens up to `short_until`), summed."""
    out, elapsed, last = [], 0.0, 0
    for row in (r for r in rows if r["split"] == "eval"):
        for step in range(last + 1, row["step"] + 1):
            elapsed += seconds[64 if step <= short_until else 128]
        last = row["step"]
        out.append({"step": row["step"], "train_seconds": round(elapsed, 1),
                    "mlm_loss": round(row["mlm_loss"], 4),
                    "mlm_accuracy": round(row["mlm_accuracy"], 4),
                    "rtd_loss": round(row["rtd_loss"], 4)})  # fmt: skip
    return out


def _train_curve(rows: list[dict[str, Any]], every: int) -> list[list[float]]:
    return [[r["step"], round(r["loss"], 3), round(r["mlm_loss"], 3), round(r["rtd_loss"], 4)]
            for r in rows if r["split"] == "train" and r["step"] % every == 0]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="steps of the single run")
    parser.add_argument("--root", type=Path, default=Path("/tmp/phases-bench"))
    parser.add_argument("--short-fraction", type=float, default=0.8)
    parser.add_argument("--calibration-steps", type=int, default=60)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    args.root.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"uptime_before": _uptime(), "steps_single": args.steps}

    common = [f"train.eval_every_steps={max(1, args.steps // EVALS)}", "train.eval_batches=4",
              "checkpoint.every_steps=100000", "checkpoint.keep=1"]  # fmt: skip
    single = _run(args.root, "single", [f"train.steps={args.steps}", *common])

    # Step times of both shapes, measured the same way, to size the phased run.
    calibration = _run(args.root, "calibrate", [
        f"train.steps={args.calibration_steps}", "train.batch_size=32", "train.eval_every_steps="
        f"{args.calibration_steps}", "train.eval_batches=1", "checkpoint.every_steps=100000",
        f"train.phases=[{{until_step: {args.calibration_steps}, max_seq_length: 64}}]",
    ])  # fmt: skip
    t128 = _step_seconds(single)[128]
    t64 = _step_seconds(calibration)[64]
    f = args.short_fraction
    steps = round(args.steps * t128 / (f * t64 + (1 - f) * t128))
    until = round(f * steps)
    report["calibration"] = {"seconds_per_step_128x16": t128, "seconds_per_step_64x32": t64,
                             "phased_steps": steps, "phase_1_until": until}  # fmt: skip
    phases = (f"[{{until_step: {until}, max_seq_length: 64, batch_size: 32}}, "
              f"{{until_step: {steps}, max_seq_length: 128}}]")  # fmt: skip
    evals = [f"train.eval_every_steps={max(1, steps // EVALS)}"]
    phased = _run(args.root, "phased", [f"train.steps={steps}", *common, *evals,
                                        f"train.phases={phases}"])  # fmt: skip
    decoupled = _run(args.root, "decoupled", [f"train.steps={args.steps}", *common,
                                              "optimizer.decoupled=true"])  # fmt: skip

    runs = (("single", single, 0), ("phased", phased, until), ("decoupled", decoupled, 0))
    for name, rows, short_until in runs:
        seconds = _step_seconds(rows)
        train = [r for r in rows if r["split"] == "train"]
        batch = {int(r["max_seq_length"]): r["batch_size"] for r in train}
        tokens = {f"{n}": round(batch[n] * n / s) for n, s in seconds.items()}
        curve = _curve(rows, seconds, short_until)
        report[name] = {"seconds_per_step": seconds, "tokens_per_second": tokens,
                        "eval_curve": curve, "train_curve": _train_curve(rows, 50)}  # fmt: skip
    report["uptime_after"] = _uptime()
    report["uptime_per_run"] = UPTIMES  # runs reused from an earlier call are not listed
    (args.root / "report.json").write_text(json.dumps(report, indent=1))

    print(f"uptime before: {report['uptime_before']}\nuptime after:  {report['uptime_after']}")
    print(f"calibration: {json.dumps(report['calibration'])}")
    for name in ("single", "phased", "decoupled"):
        r = report[name]
        print(f"\n## {name}: tokens/s by length {r['tokens_per_second']}")
        print("| step | train s | eval MLM loss (128) | MLM acc | RTD loss |")
        print("|---|---|---|---|---|")
        for p in r["eval_curve"]:
            print(f"| {p['step']} | {p['train_seconds']} | {p['mlm_loss']} | "
                  f"{p['mlm_accuracy']} | {p['rtd_loss']} |")  # fmt: skip
    print("\n## train loss (step, loss, mlm, rtd): single vs decoupled")
    for a, b in zip(report["single"]["train_curve"], report["decoupled"]["train_curve"],
                    strict=False):  # fmt: skip
        print(f"| {a[0]} | {a[1:]} | {b[1:]} |")


if __name__ == "__main__":
    main()
