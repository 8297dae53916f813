#!/usr/bin/env bash
# Sets up (with the test extra) and runs the whole test suite on 8 simulated CPU devices.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
ruff check .
lint-imports
XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python -m pytest -q tests "$@"
