"""Start-up cost of prepared data in a bucket: each host's local copy (data/cache.py).

    python benchmarks/data_cache.py [--gigabytes 1] [--shard-mb 64]

Starts the test GCS emulator (tests/gcs_emulator.py) on 127.0.0.1, writes --gigabytes of shards
(random bytes; the copy does not look inside) with a metadata.json listing them, then times
`cache.local_copy` twice: cold (every shard copied) and warm (one listing, nothing copied),
and once more after one shard changed in the bucket. Prints one JSON line. The emulator is a
single Python process on this machine: real GCS from a TPU VM is much faster per byte, so the
cold number is an upper bound of the copy's cost here, not a forecast for a pod.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--shard-mb", type=int, default=64)
    args = parser.parse_args()
    emulator = subprocess.Popen([sys.executable, str(ROOT / "tests" / "gcs_emulator.py")],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        port = int(emulator.stdout.readline().split()[1])
        os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
        sys.path.insert(0, str(ROOT))
        from debertina_jax import storage
        from debertina_jax.data import cache
        from debertina_jax.data import format as fmt
        from debertina_jax.storage import gcs

        gcs.client().create_bucket("bench")
        url = "gs://bench/data"
        shard = args.shard_mb << 20
        count = max(1, round(args.gigabytes * (1 << 30) / shard))
        names = [fmt.shard_name("train", i) for i in range(count)]
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "shard"
            local.write_bytes(os.urandom(shard))
            for name in names:
                storage.copy(str(local), storage.join(url, name))
        upload = time.perf_counter() - start
        metadata = {
            "format_version": fmt.FORMAT_VERSION, "tokenizer_fingerprint": "x",
            "max_seq_length": 512, "pad_id": 0, "cls_id": 1, "sep_id": 2, "mask_id": 3,
            "num_documents": 1, "splits": {"train": {"files": names, "num_lines": 1}},
        }  # fmt: skip
        storage.write_text(storage.join(url, fmt.METADATA_FILE), json.dumps(metadata))
        with tempfile.TemporaryDirectory() as root:
            timings = {}
            for case in ("cold", "warm"):
                start = time.perf_counter()
                cache.local_copy(url, root=root, splits=["train"])
                timings[f"{case}_s"] = time.perf_counter() - start
            storage.copy(storage.join(url, names[0]), storage.join(url, names[-1]))
            start = time.perf_counter()
            cache.local_copy(url, root=root, splits=["train"])
            timings["one_shard_changed_s"] = time.perf_counter() - start
        total = count * shard
        print(json.dumps({
            "bytes": total, "shards": count, "shard_bytes": shard, "upload_s": upload,
            **timings, "cold_MB_per_s": total / 1e6 / timings["cold_s"],
            "loadavg": os.getloadavg(),
        }), flush=True)  # fmt: skip
    finally:
        emulator.kill()
        emulator.wait()


if __name__ == "__main__":
    main()
