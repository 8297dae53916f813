"""The GCS emulator of the tests (tests/gcs_emulator.py), started once per test session.

`gcs_emulator` starts it on 127.0.0.1 and points this process (and every subprocess it starts,
through the environment) at it: STORAGE_EMULATOR_HOST, from which debertina_jax.storage sets up
gcsfs, google-cloud-storage and TensorStore with anonymous credentials. `gcs_bucket` is a fresh,
empty bucket for one test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

LAUNCHER = Path(__file__).with_name("gcs_emulator.py")


@dataclass(frozen=True)
class GcsEmulator:
    url: str  # http://127.0.0.1:PORT

    def create_bucket(self, name: str | None = None) -> str:
        """A new empty bucket; returns gs://NAME."""
        from debertina_jax.storage import gcs

        name = name or f"test-{uuid.uuid4().hex[:12]}"
        gcs.client().create_bucket(name)
        return f"gs://{name}"

    def fault(self, prefix: str, status: int = 503, count: int = 1) -> None:
        """The next `count` writes of objects named `prefix`... fail with `status` (-1: all,
        0: clear)."""
        body = json.dumps({"prefix": prefix, "status": status, "count": count}).encode()
        request = urllib.request.Request(f"{self.url}/_faults", data=body, method="POST")
        urllib.request.urlopen(request, timeout=10).read()


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
    process = subprocess.Popen(
        [sys.executable, str(LAUNCHER)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline()
        if not line.startswith("READY "):
            process.kill()
            pytest.fail(f"the GCS emulator did not start: {line}{process.stderr.read()[-2000:]}")
        url = f"http://127.0.0.1:{int(line.split()[1])}"
        os.environ["STORAGE_EMULATOR_HOST"] = url
        from debertina_jax import storage

        storage.configure()
        yield GcsEmulator(url)
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def gcs_bucket(gcs_emulator: GcsEmulator) -> str:
    """gs://NAME of a fresh, empty bucket."""
    return gcs_emulator.create_bucket()
