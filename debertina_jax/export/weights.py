"""Which weights of a run are read back: the raw parameters or their moving average (EMA, kept
by runs with train.ema_decay), of one checkpoint or averaged uniformly over the last K kept
checkpoints (`convert_to_pt.py --weights ema --average-last K`).

The average is taken over the pair's own parameters (the generator's E_G and the
discriminator's E_delta under GDES, each layer's weights), in float64, before anything is
merged for export: merging is linear, so the exported discriminator's table is exactly the
average of the tables the averaged checkpoints' discriminators read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from debertina_jax.config import Config, config_from_dict
from debertina_jax.export.spec import WEIGHTS
from debertina_jax.runtime.checkpointing import (
    Checkpointer,
    CheckpointNotFoundError,
    CheckpointRestoreError,
    read_checkpoint_meta,
    restore_params,
)

_ITEMS = {"raw": "params", "ema": "ema"}  # the train state's item of each of WEIGHTS


class WeightsError(CheckpointRestoreError):
    """The weights asked for are not in the run (no EMA, too few checkpoints, ...)."""


def checkpoint_config(meta: dict[str, Any], workdir: Path | str) -> Config:
    """The config a checkpoint was saved with (stored in its meta)."""
    try:
        return config_from_dict(meta["config"])
    except (KeyError, ValueError) as e:
        raise CheckpointRestoreError(
            f"{workdir}: the config stored in checkpoint {meta.get('step')} is unreadable: {e}"
        ) from None


def averaged_steps(workdir: Path | str, step: int, average_last: int | None) -> list[int]:
    """The checkpoints to read, oldest first: [step], or the last `average_last` kept ones up
    to and including `step`."""
    if average_last is None:
        return [step]
    if average_last < 1:
        raise WeightsError(f"--average-last must be >= 1, got {average_last}")
    with Checkpointer(workdir, every_steps=1, keep=1, read_only=True) as checkpointer:
        kept = [s for s in checkpointer.all_steps() if s <= step]
    if len(kept) < average_last:
        raise WeightsError(
            f"--average-last {average_last}: {workdir} keeps only {len(kept)} checkpoint(s) up "
            f"to step {step} (steps {kept}); raise checkpoint.keep in the run to keep more"
        )
    return kept[-average_last:]


def check_weights(
    workdir: Path | str, config: Config, steps: list[int], weights: str, newest: int
) -> None:
    """Every checkpoint of `steps` holds `weights` of the same model as checkpoint `newest`."""
    if weights not in WEIGHTS:
        raise WeightsError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    for step in steps:
        if step == newest:
            other = config
        else:
            other = checkpoint_config(read_checkpoint_meta(workdir, step), workdir)
        if weights == "ema" and other.train.ema_decay is None:
            raise WeightsError(
                f"checkpoint {step} of {workdir} has no EMA weights: the run had "
                "train.ema_decay off; export the raw weights instead"
            )
        if (other.model, other.generator) != (config.model, config.generator):
            raise WeightsError(
                f"checkpoints {step} and {newest} of {workdir} hold different models (model or "
                "generator config changed): they cannot be averaged"
            )


def read_weights(workdir: Path | str, steps: list[int], target: Any, weights: str) -> Any:
    """The parameters of `steps` (their uniform mean when several), laid out as `target`."""
    item = _ITEMS[weights]
    if len(steps) == 1:
        return restore_params(workdir, steps[0], target, item)
    total = None
    for step in steps:
        params = jax.device_get(restore_params(workdir, step, target, item))
        wide = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
        total = wide if total is None else jax.tree.map(np.add, total, wide)
    mean = jax.tree.map(lambda t, s: np.asarray(t / len(steps), s.dtype), total, target)
    return jax.device_put(mean, jax.tree.map(lambda t: t.sharding, target))


def describe(config: Config, steps: list[int], weights: str) -> str:
    """What the weights are, for the model card."""
    what = "the raw weights"
    if weights == "ema":
        what = f"the EMA of the weights (train.ema_decay {config.train.ema_decay})"
    if len(steps) == 1:
        return f"{what} of step {steps[0]:,}"
    listed = ", ".join(f"{s:,}" for s in steps)
    return f"the uniform average of {what} of the {len(steps)} checkpoints of steps {listed}"


def load_weights(
    workdir: str | os.PathLike, step: int | None, weights: str, average_last: int | None
) -> tuple[dict[str, Any], Config, list[int]]:
    """(the newest checkpoint's meta, its config, the steps to read), all checked."""
    meta = read_checkpoint_meta(workdir, step)
    config = checkpoint_config(meta, workdir)
    newest = int(meta["step"])
    try:
        steps = averaged_steps(workdir, newest, average_last)
    except CheckpointNotFoundError as e:
        raise WeightsError(str(e)) from None
    check_weights(workdir, config, steps, weights, newest)
    return meta, config, steps
