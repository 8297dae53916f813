#!/usr/bin/env bash
# Creates .venv and installs debertina-jax with what exports need (torch + transformers, to
# verify them). `bash scripts/setup.sh test` installs the test tools too.
# The CPU build of torch is pinned and installed first: a plain `torch` requirement would pull a
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
if [ "${1:-}" = "test" ]; then
  python -m pip install --quiet -e ".[test]"
else
  python -m pip install --quiet -e ".[export]"
fi
