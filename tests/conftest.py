"""Test setup: 8 simulated CPU devices, so mesh and sharding code runs as on a small TPU slice."""

import os

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# The GCS emulator: gcs_emulator (session) and gcs_bucket (a fresh bucket per test).
from gcs_testing import gcs_bucket, gcs_emulator  # noqa: E402,F401
