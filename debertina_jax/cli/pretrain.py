"""Pretrain a DeBERTa-v3 discriminator the DeBERTina way: ELECTRA-style RTD with GDES.

    python run_pretrain.py --config configs/tiny.yaml --workdir runs/tiny [section.key=value ...]
    python run_pretrain.py --config configs/tiny.yaml --workdir gs://BUCKET/runs/tiny   # a pod

Given raw text (`data.train_files`, default: the sample corpus in the package), it trains the
tokenizer and prepares the data when the workdir does not have them yet, then trains. A rerun
with the same workdir resumes from the latest checkpoint; `--config` may then be left out.
`--stage tokenizer` or `--stage prepare` stops after that step.
"""

from __future__ import annotations

import argparse
import logging
import sys

from debertina_jax import storage
from debertina_jax.config import CONFIG_FILE, ConfigError, load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Overrides are dotted keys, e.g. train.steps=200 train.batch_size=16 "
        "data.max_seq_length=128 data.train_files=/path/corpus/*.txt mesh.data=4",
    )
    parser.add_argument("--config", help="YAML config (default: WORKDIR/config.yaml on resume)")
    parser.add_argument(
        "--workdir", required=True, help="run directory or gs://BUCKET/PATH (created if missing)"
    )
    parser.add_argument(
        "--stage",
        choices=("all", "tokenizer", "prepare"),
        default="all",
        help="stop after training the tokenizer or preparing the data (default: train too)",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Our progress at INFO; orbax and absl chatter only when something is wrong.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("debertina_jax").setLevel(logging.INFO)
    try:
        workdir = storage.check_path(args.workdir, "--workdir")
        config_path = args.config or storage.join(workdir, CONFIG_FILE)
        if args.config is None and not storage.is_file(config_path):
            print(f"error: no --config given and no {config_path} to resume from", file=sys.stderr)
            return 2
        config = load_config(config_path, args.overrides)
    except (ConfigError, storage.StoragePathError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a bucket that is missing or refuses these credentials
        print(f"error: {e}", file=sys.stderr)
        return 1

    # Imported after the config is checked: a typo should not wait for JAX to load.
    from debertina_jax.pretraining.loop import TrainingStopped, pretrain
    from debertina_jax.runtime.checkpointing import CheckpointSaveError
    from debertina_jax.runtime.workdir_lock import WorkdirLockedError

    try:
        result = pretrain(config, workdir, stage=args.stage)
    except (
        ConfigError,
        TrainingStopped,
        CheckpointSaveError,
        WorkdirLockedError,
        FileNotFoundError,
        storage.StorageError,  # a bucket that is missing or refuses these credentials
        ValueError,  # bad corpus (SourceError), data or checkpoint that does not fit
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
