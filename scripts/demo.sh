#!/usr/bin/env bash
# The main job on the embedded default: set up, pretrain the tiny config on the sample corpus
# that ships with the package, export the result to Hugging Face PyTorch (verified), and show
# what it learned (debertina_jax/cli/report.py).
# Extra arguments are config overrides, e.g. `bash scripts/demo.sh train.steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
WORKDIR=${WORKDIR:-runs/tiny}
python run_pretrain.py --config configs/tiny.yaml --workdir "$WORKDIR" "$@"
python convert_to_pt.py --workdir "$WORKDIR" --output "$WORKDIR/hf" --overwrite
# What was learned: fill-mask guesses, replaced-token detection against its prior, and a short
# fine-tune on the bundled `frases` task, pretrained against random weights.
python -m debertina_jax.cli.report --workdir "$WORKDIR" --export "$WORKDIR/hf"
