#!/usr/bin/env bash
# Sets up (with the test extra) and runs the whole test suite on 8 simulated CPU devices
# (tests/conftest.py sets XLA_FLAGS: tests/process_testing.py).
# The tests run in 2 processes (pytest-xdist), one file at a time each, the files with the
# slow tests first (tests/conftest.py); extra arguments go to pytest: `-n 4` for more
# processes, `-n 0` for one, `-m "not slow"` to leave out the tests that train runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
ruff check .
lint-imports
python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests "$@"
