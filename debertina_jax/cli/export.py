"""Export a pretraining run to Hugging Face PyTorch directories, and verify them.

    python convert_to_pt.py --workdir runs/tiny --output hf/tiny

writes OUT/discriminator (the model to fine-tune) and OUT/generator, each with config.json,
model.safetensors, the tokenizer files and a README.md model card. Verification (on by default)
loads them with transformers on the CPU and compares with the JAX checkpoint. docs/export.md
has the details. Exit status, as for the other commands: 0 done, 2 bad arguments or bad input
(the message names the file, step, tensor or value), 1 any other error (storage), 3
verification failed. Nothing is written unless it is 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from debertina_jax.export.spec import MODELS, WEIGHTS  # plain data: --help stays fast

EXIT_ERROR, EXIT_USAGE, EXIT_VERIFY = 1, 2, 3  # EXIT_USAGE: argparse's own for bad arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the pretraining run directory")
    parser.add_argument("--output", required=True, help="directory to create (OUT)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument(
        "--model",
        choices=(*MODELS, "both"),
        default="both",
        help="what to export (default: both)",
    )
    parser.add_argument(
        "--dtype", default="float32", help="weights: float32 (default), float16 or bfloat16"
    )
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="raw",
        help="raw: the parameters (default); ema: their moving average (train.ema_decay runs)",
    )
    parser.add_argument(
        "--average-last",
        type=_positive,
        metavar="K",
        help="the uniform average of the last K kept checkpoints up to --step",
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip loading the result with transformers"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty OUT (as a whole)"
    )
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on read-only checkpoints
    # The conversion runs on the host CPU, whatever accelerator the machine has.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    # Imported after the arguments are checked: --help should not wait for JAX and torch.
    from debertina_jax.export.export import ExportError, VerificationError, export
    from debertina_jax.runtime.checkpointing import CheckpointNotFoundError, CheckpointRestoreError

    models = MODELS if args.model == "both" else (args.model,)
    try:
        result = export(
            args.workdir,
            args.output,
            step=args.step,
            weights=args.weights,
            average_last=args.average_last,
            models=models,
            dtype=args.dtype,
            verify_outputs=not args.no_verify,
            overwrite=args.overwrite,
        )
    except VerificationError as e:
        for check in e.checks:
            print(check)
        print(f"error: verification failed; nothing written to {args.output}", file=sys.stderr)
        return EXIT_VERIFY
    except (CheckpointNotFoundError, CheckpointRestoreError, ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)  # what the user gave: a run, a step, a path
        return EXIT_USAGE
    except OSError as e:  # a disk or bucket that fails
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR

    for warning in result.warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    for check in result.checks:
        print(check)
    for which, directory in result.directories.items():
        print(f"wrote {which} of step {result.step} to {directory} ({args.dtype})")
    print(f"weights: {result.weights}")
    if not result.checks:
        print("not verified (--no-verify)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
