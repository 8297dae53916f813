"""Reading a pretraining run back: `load_checkpoint(workdir)` -> generator and discriminator.

Only the parameters (state["params"]) are read, into an abstract ElectraPair on one CPU device:
no optimizer, no train step. Works on any machine with one CPU, whatever mesh the run was
trained on: orbax reshards the arrays onto the CPU. The discriminator comes back with its GDES
embedding merged (E_G + E_delta), ready for `hf.convert.to_hf` or for use as it is.
`load_source` adds what an export writes beside the weights (tokenizer, training facts).
`weights="ema"` reads the moving average of the parameters instead, and `average_last=K` the
uniform average of the last K kept checkpoints (export/weights.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from debertina_jax import storage
from debertina_jax.config import Config
from debertina_jax.data.workdir import data_paths
from debertina_jax.export.weights import describe, load_weights, read_weights
from debertina_jax.model.electra import ElectraPair
from debertina_jax.model.models import DebertaV2ForMaskedLM, DebertaV2ForReplacedTokenDetection
from debertina_jax.pretraining.pair import build_pair
from debertina_jax.runtime.metrics_log import read_metrics

log = logging.getLogger(__name__)

# The tokenizer files of tokenizer.export_tokenizer; the first two are required.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spm.model",
)


@dataclass
class PretrainedCheckpoint:
    generator: DebertaV2ForMaskedLM
    discriminator: DebertaV2ForReplacedTokenDetection  # GDES embedding merged
    config: Config
    tokenizer_dir: Path | str  # a Path, or a gs:// URL
    step: int
    meta: dict[str, Any]
    # The enhanced mask decoder's absolute position table (None without an EMD): the
    # standalone generator has no place for it, the export keeps it under a name HF ignores.
    emd_positions: np.ndarray | None = None
    weights: str = ""  # which weights, in words (export/weights.py: describe)

    def model(self, name: str) -> DebertaV2ForMaskedLM | DebertaV2ForReplacedTokenDetection:
        """The standalone model called `name` ("discriminator" or "generator")."""
        return {"discriminator": self.discriminator, "generator": self.generator}[name]


def load_checkpoint(
    workdir: str | os.PathLike,
    step: int | None = None,
    *,
    weights: str = "raw",
    average_last: int | None = None,
) -> PretrainedCheckpoint:
    """Restores checkpoint `step` (default: the latest) of the run in `workdir` (a directory
    or a gs:// URL) on the CPU: its raw weights or (`weights="ema"`) their moving average,
    averaged over the last `average_last` kept checkpoints up to `step` when given."""
    workdir = storage.check_path(workdir, "workdir")
    # The config is stored in the checkpoint itself, so read its metadata first.
    meta, config, steps = load_weights(workdir, step, weights, average_last)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        pair = _restore_pair(workdir, steps, config, cpu, weights)
        emd = pair.enhanced_mask_decoder
        tokenizer_dir, _ = data_paths(config, workdir)
        return PretrainedCheckpoint(
            generator=pair.export_generator(),
            discriminator=pair.export_discriminator(),
            config=config,
            tokenizer_dir=tokenizer_dir,
            step=int(meta["step"]),
            meta=meta,
            emd_positions=None if emd is None else np.asarray(emd.position_embeddings.embedding),
            weights=describe(config, steps, weights),
        )


def _restore_pair(
    workdir: Path | str, steps: list[int], config: Config, device: jax.Device, weights: str
) -> ElectraPair:
    """The run's pair (its structure from the config, nothing allocated) filled with the
    checkpoints' `weights` (their mean when several) on `device`."""
    abstract = nnx.eval_shape(lambda: build_pair(config, config.train.seed))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    on_device = jax.sharding.SingleDeviceSharding(device)
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=on_device), params
    )
    return nnx.merge(graphdef, read_weights(workdir, steps, target, weights), rest)


# ---- what an export needs beside the weights -----------------------------------------------------
@dataclass
class ExportSource(PretrainedCheckpoint):
    """One checkpoint of a run, ready to write: the standalone models and what the model card
    says about their training."""

    eval_metrics: dict[str, Any] | None = None  # the last eval row of metrics.jsonl up to `step`

    @property
    def tokens_seen(self) -> int | None:
        return self.meta.get("tokens_seen")


def load_source(
    workdir: str | os.PathLike,
    step: int | None = None,
    *,
    weights: str = "raw",
    average_last: int | None = None,
) -> ExportSource:
    """Restores checkpoint `step` (default: the latest) of `workdir` onto one CPU device (the
    weights as `load_checkpoint` chooses them)."""
    workdir = storage.check_path(workdir, "workdir")
    run = load_checkpoint(workdir, step, weights=weights, average_last=average_last)
    tokenizer = run.tokenizer_dir
    missing = [n for n in TOKENIZER_FILES[:2] if not storage.is_file(storage.join(tokenizer, n))]
    if missing:
        raise FileNotFoundError(
            f"the run's tokenizer directory {run.tokenizer_dir} lacks {', '.join(missing)}"
        )
    return ExportSource(**vars(run), eval_metrics=_last_eval(workdir, run.step))


def _last_eval(workdir: Path | str, step: int) -> dict[str, Any] | None:
    try:
        rows = [r for r in read_metrics(workdir, split="eval") if r.get("step", 0) <= step]
    except (FileNotFoundError, ValueError) as e:
        log.warning("no eval metrics for the model card: %s", e)
        return None
    return rows[-1] if rows else None
