"""Training metrics: WORKDIR/metrics.jsonl, TensorBoard events and a progress line.

metrics.jsonl holds one JSON object per logged step: {"step": ..., "split": "train" or
"eval", "time": unix seconds, <metric>: <number>, ...}; non-finite numbers are written as
null so that any JSON reader can parse the file. When a run resumes from a checkpoint at
step S, the logger first removes the rows with step > S that a crashed run wrote after its
last checkpoint, so the file always reads as one run without duplicate steps.
TensorBoard does the same with its events (purge_step). Only the main process writes.

A workdir in a bucket (gs://): GCS objects cannot be appended to, so the rows are kept in memory
and `flush` replaces WORKDIR/metrics.jsonl with all of them in one upload, which GCS makes
atomic: after every flush the object holds every row so far, never half a row. A flush happens
at most every `flush_seconds` on training rows, and always on an evaluation row, before every
checkpoint (the loop calls `flush`, so the rows up to a checkpoint survive a kill) and at the
end. TensorBoard writes its event files to a local temporary directory, copied into
WORKDIR/tensorboard/ on each flush (tensorboardX's own gs:// writer does not work).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from debertina_jax import storage

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
FLUSH_SECONDS = 30.0  # bucket workdirs: the longest a training row waits to be uploaded


def _to_number(name: str, value: Any) -> float | int | None:
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "biuf":
        raise ValueError(f"metric {name!r} must be a single number, got {value!r}")
    value = array.item()
    if isinstance(value, bool | int):
        return int(value)
    return value if math.isfinite(value) else None


def _parse_lines(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    lines = storage.read_text(path).splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # a row cut short by a crash mid-write
            raise ValueError(f"{path}, line {i + 1}: not valid JSON: {e}") from None
    return rows


def read_metrics(workdir: str | os.PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """The rows of WORKDIR/metrics.jsonl in order, optionally only one split."""
    path = storage.join(workdir, METRICS_FILE)
    if not storage.is_file(path):
        raise FileNotFoundError(f"no metrics file: {path}")
    rows = _parse_lines(path)
    return [r for r in rows if split is None or r.get("split") == split]


def _truncate_after(path: Path, step: int) -> None:
    """Keeps only the rows with step <= `step`, replacing the file atomically."""
    if not path.is_file():
        return
    kept = [r for r in _parse_lines(path) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsLogger:
    """Logs metrics rows to JSON lines, TensorBoard and a tqdm progress line.

    start_step: the step training starts from (the restored checkpoint's step, 0 when
      fresh); logged rows after it from an earlier run are removed.
    is_main_process: None means `jax.process_index() == 0`; other processes log nothing.
    flush_seconds: for a gs:// workdir, how long training rows may wait to be uploaded.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        total_steps: int,
        start_step: int = 0,
        is_main_process: bool | None = None,
        progress: bool = True,
        flush_seconds: float = FLUSH_SECONDS,
    ) -> None:
        self.enabled = jax.process_index() == 0 if is_main_process is None else is_main_process
        if not self.enabled:
            return
        # Imported here so that the other hosts of a pod never load them.
        from tqdm.auto import tqdm

        from debertina_jax.runtime.tensorboard_events import EventFile

        workdir = storage.check_path(workdir, "workdir")
        self.remote = storage.is_remote(workdir)
        self.path = storage.join(workdir, METRICS_FILE)
        self.flush_seconds = flush_seconds
        if self.remote:
            # All rows live here; metrics.jsonl is rewritten whole (see the module docstring).
            self._rows = [r for r in self._existing_rows() if r.get("step", 0) <= start_step]
            self._unflushed = False
            self._last_flush = time.monotonic()
            self._events = tempfile.mkdtemp(prefix="debertina-tensorboard-")
            self._events_target = storage.join(workdir, TENSORBOARD_DIR)
            events_dir = self._events
        else:
            local = Path(workdir)
            local.mkdir(parents=True, exist_ok=True)
            _truncate_after(local / METRICS_FILE, start_step)
            self._file = (local / METRICS_FILE).open("a", encoding="utf-8")
            events_dir = str(local / TENSORBOARD_DIR)
        self._tensorboard = EventFile(events_dir, purge_step=start_step + 1)
        self._bar = (
            tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            if progress
            else None
        )

    def _existing_rows(self) -> list[dict[str, Any]]:
        return _parse_lines(self.path) if storage.is_file(self.path) else []

    def flush(self) -> None:
        """Makes every row logged so far durable: a no-op locally (each row is fsynced), one
        upload of metrics.jsonl and of the TensorBoard events for a gs:// workdir."""
        if not self.enabled or not self.remote or not self._unflushed:
            return
        storage.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self._rows))
        self._tensorboard.flush()
        for name in os.listdir(self._events):
            storage.copy(os.path.join(self._events, name), storage.join(self._events_target, name))
        self._unflushed = False
        self._last_flush = time.monotonic()

    def _write(self, step: int, split: str, metrics: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        values = {k: _to_number(k, v) for k, v in jax.device_get(metrics).items()}
        if clash := sorted(set(values) & set(row)):
            raise ValueError(f"metric name {clash[0]!r} is reserved in {METRICS_FILE} rows")
        row.update(values)
        if self.remote:
            self._rows.append(row)
            self._unflushed = True
        else:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())  # a row that was logged survives a crash right after
        for name, value in values.items():
            if value is not None:
                self._tensorboard.add_scalar(f"{split}/{name}", value, int(step))
        if not self.remote:
            self._tensorboard.flush()  # as often as the rows: TensorBoard shows them at once
        elif split != "train" or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()
        return values

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        """Logs a training row (numbers, numpy or jax scalars) and moves the progress line."""
        if not self.enabled:
            return
        values = self._write(step, "train", metrics)
        if self._bar is not None:
            self._bar.update(int(step) - self._bar.n)
            shown = {}
            if values.get("loss") is not None:
                shown["loss"] = f"{values['loss']:.4f}"
            if values.get("tokens_per_second") is not None:
                shown["tok/s"] = f"{values['tokens_per_second']:,.0f}"
            if values.get("mfu") is not None:
                shown["MFU"] = f"{100 * values['mfu']:.1f}%"
            self._bar.set_postfix(shown, refresh=True)

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        """Logs an evaluation row ("split": "eval") and prints it above the progress line."""
        if not self.enabled:
            return
        values = self._write(step, "eval", metrics)
        text = " ".join(f"{k}={v:.4g}" for k, v in values.items() if v is not None)
        if self._bar is not None:
            self._bar.write(f"eval step {step}: {text}")

    def close(self) -> None:
        if not self.enabled:
            return
        try:
            if self.remote:
                self.flush()
            else:
                self._file.close()
        finally:
            self._tensorboard.close()
            if self.remote:
                shutil.rmtree(self._events, ignore_errors=True)
            if self._bar is not None:
                self._bar.close()
            self.enabled = False

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
