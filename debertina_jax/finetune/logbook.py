"""Where a fine-tuning run reports: OUT/metrics.jsonl, TensorBoard under OUT/tensorboard/seed-N,
and a progress bar per seed.

metrics.jsonl rows: {"seed", "step", "epoch", "split": "train" | "validation" | "test",
"time", <metric>: <number>}; non-finite numbers are written as null.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"


def _number(value: Any) -> float | int | None:
    value = np.asarray(value).item()
    if isinstance(value, bool | int):
        return int(value)
    return float(value) if math.isfinite(value) else None


class Logbook:
    def __init__(self, out: Path, *, progress: bool = True):
        self.out = out
        self.progress = progress
        self._file = (out / METRICS_FILE).open("w", encoding="utf-8")
        self._writer = None
        self._bar = None
        self.seed = 0

    def start_seed(self, seed: int, total_steps: int) -> None:
        from tensorboardX import SummaryWriter
        from tqdm.auto import tqdm

        self.seed = seed
        self._writer = SummaryWriter(str(self.out / "tensorboard" / f"seed-{seed}"))
        if self.progress:
            self._bar = tqdm(
                total=total_steps, desc=f"seed {seed}", unit="step", dynamic_ncols=True
            )

    def log(self, split: str, step: int, epoch: float, metrics: dict[str, Any]) -> dict[str, Any]:
        values = {k: _number(v) for k, v in metrics.items()}
        row = {"seed": self.seed, "step": step, "epoch": round(epoch, 4), "split": split}
        row["time"] = round(time.time(), 3)
        row.update(values)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in values.items():
                if value is not None:
                    self._writer.add_scalar(f"{split}/{name}", value, step)
        if split != "train" and self._bar is not None:
            text = " ".join(f"{k}={v:.4g}" for k, v in values.items() if v is not None)
            self._bar.write(f"seed {self.seed} step {step} {split}: {text}")
        return values

    def advance(self, step: int, loss: float | None) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def end_seed(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        self.end_seed()
        self._file.close()
