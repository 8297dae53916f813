"""The encoder to fine-tune and the task model around it.

MODEL is either a pretraining workdir (its latest or `step` checkpoint, read with
`debertina_jax.load_checkpoint`: the discriminator with its GDES table merged, and the run's
tokenizer) or a Hugging Face DeBERTa-v2/v3 directory (ours or microsoft/deberta-v3-*; its
backbone read with `hf.convert.from_hf`, heads ignored, tokenizer files from the same place).
The task model is our DebertaV2ForSequenceClassification / ForTokenClassification with a fresh
head initialised from the seed and the pretrained backbone copied in.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from debertina_jax.config.model import DebertaV2Config
from debertina_jax.model.compute import Compute
from debertina_jax.model.models import (
    DebertaV2ForSequenceClassification,
    DebertaV2ForTokenClassification,
    DebertaV2Model,
)

log = logging.getLogger(__name__)
HF_CONFIG = "config.json"


@dataclass
class Pretrained:
    backbone: DebertaV2Model
    config: DebertaV2Config
    tokenizer_dir: Path
    kind: str  # "workdir" | "hf"
    step: int | None  # the pretraining step (workdirs only)


def load_pretrained(path: str | os.PathLike, step: int | None = None) -> Pretrained:
    """The backbone, config and tokenizer directory of a workdir or an HF directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--model {path}: no such directory")
    if (path / HF_CONFIG).is_file():
        if step is not None:
            raise ValueError(f"--step is for pretraining workdirs; {path} is an HF directory")
        from debertina_jax.hf.convert import from_hf

        backbone = from_hf(path, "DebertaV2Model")
        return Pretrained(backbone, backbone.config, path, "hf", None)
    from debertina_jax import load_checkpoint

    run = load_checkpoint(path, step)
    discriminator = run.discriminator
    return Pretrained(
        discriminator.deberta, discriminator.config, Path(run.tokenizer_dir), "workdir", run.step
    )


def task_config(
    config: DebertaV2Config,
    task_type: str,
    label_names: list[str],
    label_field: str,
    dropout: dict[str, float],
) -> DebertaV2Config:
    """The model config with the task's labels (HF id2label) and problem type."""
    if task_type == "regression":
        labels, problem = (label_field,), "regression"
    elif task_type == "classification":
        labels, problem = tuple(label_names), "single_label_classification"
    else:
        labels, problem = tuple(label_names), None
    return config.replace(label_names=labels, problem_type=problem, **dropout)


def build_task_model(
    pretrained: Pretrained,
    config: DebertaV2Config,
    task_type: str,
    compute: Compute,
    seed: int,
    *,
    random_init: bool = False,
) -> nnx.Module:
    """The task model: a head initialised from `seed` on the pretrained backbone (or, with
    `random_init`, on a backbone initialised from the seed too: the baseline)."""
    cls = (
        DebertaV2ForTokenClassification
        if task_type == "token-classification"
        else DebertaV2ForSequenceClassification
    )
    model = cls(config, rngs=nnx.Rngs(params=seed), compute=compute)
    if not random_init:
        copy_backbone(pretrained.backbone, model.deberta)
    return model


def copy_backbone(source: DebertaV2Model, target: DebertaV2Model) -> None:
    """Copies every parameter of `source` into `target`, stacking or unstacking the encoder
    layers when one of them is scanned (scan_layers) and the other is not."""
    src = {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(source, nnx.Param))}
    tgt = dict(nnx.to_flat_state(nnx.state(target, nnx.Param)))
    stacked_src = {}
    for path, value in src.items():
        if "layers" in path:
            i = path.index("layers")
            if i + 1 < len(path) and isinstance(path[i + 1], int):
                stacked_src.setdefault(path[: i + 1] + path[i + 2 :], {})[path[i + 1]] = value
    problems, values = [], {}
    for path, variable in tgt.items():
        value = _source_value(path, src, stacked_src)
        name = "/".join(map(str, path))
        if value is None:
            problems.append(f"{name}: missing in the pretrained model")
        elif tuple(value.shape) != tuple(variable.shape):
            problems.append(
                f"{name}: pretrained {tuple(value.shape)}, task model {tuple(variable.shape)}"
            )
        else:
            values[path] = value
    if problems:  # checked before anything is copied: the target is left as it was
        raise ValueError(
            "the pretrained backbone does not fit the task model:\n  " + "\n  ".join(problems)
        )
    for path, value in values.items():
        # A copy: the task model's buffers are donated to the train step, the pretrained
        # model's must survive for the next seed.
        tgt[path][...] = jnp.array(np.asarray(value, np.float32))


def _source_value(path, src, stacked_src):
    if path in src:
        return src[path]
    if path in stacked_src:  # target scanned, source per layer
        layers = stacked_src[path]
        return np.stack([np.asarray(layers[i]) for i in sorted(layers)])
    if "layers" in path:  # target per layer, source scanned
        i = path.index("layers")
        if i + 1 < len(path) and isinstance(path[i + 1], int):
            whole = src.get(path[: i + 1] + path[i + 2 :])
            if whole is not None:
                return np.asarray(whole)[path[i + 1]]
    return None
