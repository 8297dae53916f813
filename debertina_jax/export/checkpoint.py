"""Reading a pretraining run back: `load_checkpoint(workdir)` -> generator and discriminator.

Works on any machine with one CPU, whatever mesh the run was trained on: orbax reshards the
arrays onto a single CPU device. The discriminator comes back with its GDES embedding merged
(E_G + E_delta), ready for `convert.to_hf` or for use as it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from debertina_jax.config import Config, MeshConfig, config_from_dict
from debertina_jax.data.workdir import data_paths
from debertina_jax.model.models import DebertaV2ForMaskedLM, DebertaV2ForReplacedTokenDetection
from debertina_jax.pretraining.state import abstract_train_state, merge_pair
from debertina_jax.runtime.checkpointing import (
    CheckpointRestoreError,
    read_checkpoint_meta,
    restore_checkpoint,
)
from debertina_jax.runtime.sharding import make_mesh


@dataclass
class PretrainedCheckpoint:
    generator: DebertaV2ForMaskedLM
    discriminator: DebertaV2ForReplacedTokenDetection  # GDES embedding merged
    config: Config
    tokenizer_dir: Path
    step: int
    meta: dict[str, Any]
    # The enhanced mask decoder's absolute position table (None without an EMD): the
    # standalone generator has no place for it, the export keeps it under a name HF ignores.
    emd_positions: np.ndarray | None = None


def load_checkpoint(workdir: str | os.PathLike, step: int | None = None) -> PretrainedCheckpoint:
    """Restores checkpoint `step` (default: the latest) of the run in `workdir` on the CPU."""
    workdir = Path(workdir)
    # The config is stored in the checkpoint itself, so read its metadata first.
    meta = read_checkpoint_meta(workdir, step)
    try:
        config = config_from_dict(meta["config"])
    except (KeyError, ValueError) as e:
        raise CheckpointRestoreError(
            f"{workdir}: the config stored in checkpoint {meta.get('step')} is unreadable: {e}"
        ) from None
    cpu = jax.devices("cpu")[0]
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=[cpu])
    with jax.default_device(cpu):
        graphdef, abstract, _ = abstract_train_state(config, mesh, config.train.seed)
        state = restore_checkpoint(workdir, meta["step"], abstract_state=abstract).state
        pair = merge_pair(graphdef, state)
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
        )
