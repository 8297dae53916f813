"""Per-step cost of writing the metrics of a run whose workdir is in a bucket.

    python benchmarks/metrics_bucket.py [--rows 2000] [--log-every 10]

Starts the test GCS emulator (tests/gcs_emulator.py), then logs --rows training rows (the loop's
keys) with MetricsLogger into gs://bench/run and into a local directory. A gs:// workdir
replaces metrics.jsonl whole at each flush (runtime/metrics_log.py), so a flush costs more as
the run grows: it is timed at several sizes of the file. The per-step overhead is then
flush time / steps between flushes, with flushes at most every FLUSH_SECONDS (30 s) and before
each checkpoint. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("loss", "mlm_loss", "mlm_accuracy", "rtd_loss", "rtd_accuracy", "rtd_precision",
        "rtd_recall", "replaced_fraction", "grad_norm", "learning_rate", "nonfinite",
        "tokens_per_second", "seq_per_second", "mfu", "tokens_seen")  # fmt: skip


def _row(step: int) -> dict[str, float]:
    return {key: 1.0 / (step + i) for i, key in enumerate(KEYS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()
    emulator = subprocess.Popen([sys.executable, str(ROOT / "tests" / "gcs_emulator.py")],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        port = int(emulator.stdout.readline().split()[1])
        os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
        sys.path.insert(0, str(ROOT))
        from debertina_jax.runtime.metrics_log import FLUSH_SECONDS, MetricsLogger
        from debertina_jax.storage import gcs

        gcs.client().create_bucket("bench")
        result: dict = {"rows": args.rows}
        with tempfile.TemporaryDirectory() as local:
            for name, workdir in (("local", local), ("bucket", "gs://bench/run")):
                flushes = {}
                with MetricsLogger(workdir, total_steps=args.rows, is_main_process=True,
                                   progress=False, flush_seconds=1e9) as log:  # fmt: skip
                    start = time.perf_counter()
                    for i in range(1, args.rows + 1):
                        log.update(i * args.log_every, _row(i))
                        if i in (10, 100, 1000, 10000, args.rows):
                            begin = time.perf_counter()
                            log.flush()
                            flushes[i] = time.perf_counter() - begin
                    total = time.perf_counter() - start
                result[name] = {"update_s_per_row": (total - sum(flushes.values())) / args.rows,
                                "flush_s_at_rows": flushes}  # fmt: skip
        # The loop flushes at most every FLUSH_SECONDS: the overhead per step at the largest
        # measured file, for a step time t, is flush / (FLUSH_SECONDS / t) = flush * t / 30.
        largest = result["bucket"]["flush_s_at_rows"][args.rows]
        result["bucket_overhead_fraction_of_step_time"] = largest / FLUSH_SECONDS
        result["loadavg"] = os.getloadavg()
        print(json.dumps(result), flush=True)
    finally:
        emulator.kill()
        emulator.wait()


if __name__ == "__main__":
    main()
