"""The fine-tuning hyperparameters, set by `section.key=value` arguments on the command line:

    optimizer.learning_rate=3e-5 optimizer.layer_decay=0.9 train.epochs=5 train.batch_size=16
    model.hidden_dropout_prob=0.1 sift.weight=1 mesh.data=-1

Defaults follow the DeBERTa-v3 fine-tuning recipe of the model card (HF run_glue: AdamW, lr 2e-5,
linear warmup and decay, 3 epochs, max length 256) with warmup as a fraction of the steps, since
the Portuguese tasks are small. Values are checked with the pretraining config's type checker.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from debertina_jax.config import ConfigError, MeshConfig, apply_overrides
from debertina_jax.config.checks import check_choice, coerce


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW (decay off biases and LayerNorm) with global-norm clipping; linear warmup, linear
    decay to end_learning_rate; layer-wise learning-rate decay."""

    learning_rate: float = 2e-5
    # Layer-wise decay: the head trains at learning_rate, the top encoder layer at
    # learning_rate * layer_decay, each layer below one more factor, the embeddings last.
    # 1.0 is off (HF run_glue); 0.8-0.9 is common for DeBERTa on small tasks.
    layer_decay: float = 1.0
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None  # when set, replaces warmup_ratio
    end_learning_rate: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    clip_norm: float = 1.0  # 0: no clipping

    def __post_init__(self) -> None:
        _positive("optimizer.learning_rate", self.learning_rate)
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"optimizer.layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"optimizer.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 3
    max_steps: int | None = None  # when set, stops there (and sizes the schedule) instead
    batch_size: int = 32
    eval_batch_size: int | None = None  # None: batch_size
    max_length: int | None = None  # None: min(256, the model's max_position_embeddings)
    truncation: str = "truncate"  # truncate | error: what to do with longer examples
    eval_every_steps: int | None = None  # None: after every epoch
    patience: int = 3  # evaluations without improvement before stopping; 0: never stop early
    metric: str | None = None  # None: the task's first metric
    seed: int = 0  # seeds used: seed, seed + 1, ... (--seeds N)
    dtype: str = "auto"  # auto (bfloat16 on accelerators, float32 on CPU) | float32 | bfloat16
    scan_layers: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    log_every_steps: int = 10

    def __post_init__(self) -> None:
        check_choice("train.truncation", self.truncation, ("truncate", "error"))
        check_choice("train.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        check_choice("train.remat", self.remat, ("none", "full", "dots"))
        for name in ("epochs", "batch_size", "log_every_steps"):
            _positive(f"train.{name}", getattr(self, name))
        for name in ("max_steps", "eval_batch_size", "max_length", "eval_every_steps"):
            if getattr(self, name) is not None:
                _positive(f"train.{name}", getattr(self, name))
        if self.patience < 0:
            raise ConfigError(f"train.patience must be >= 0, got {self.patience}")
        if self.max_length is not None and self.max_length < 8:
            raise ConfigError(f"train.max_length must be >= 8, got {self.max_length}")


@dataclass(frozen=True)
class ModelSettings:
    """Dropout overrides for the fine-tuned model; None keeps the model's config.json value."""

    hidden_dropout_prob: float | None = None
    attention_probs_dropout_prob: float | None = None
    cls_dropout: float | None = None
    pooler_dropout: float | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{f.name} must be in [0, 1), got {value}")

    def overrides(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class SiftSettings:
    """SiFT (DeBERTa paper): adversarial noise on the normalised word embeddings (sift.py)."""

    enabled: bool = False  # --sift
    weight: float = 1.0  # the adversarial loss is added with this factor
    init_perturbation: float = 1e-2  # delta starts from N(0, this^2), clipped to +-2x this
    step_size: float = 1e-4  # one ascent step: delta += step_size * g / max|g|

    def __post_init__(self) -> None:
        for name in ("weight", "init_perturbation", "step_size"):
            _positive(f"sift.{name}", getattr(self, name))


@dataclass(frozen=True)
class FinetuneSettings:
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    sift: SiftSettings = field(default_factory=SiftSettings)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_settings(overrides: list[str]) -> FinetuneSettings:
    """Builds the settings from `section.key=value` strings; unknown keys name the known ones."""
    raw = apply_overrides({}, overrides)
    sections = typing.get_type_hints(FinetuneSettings)
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r} (known: {', '.join(sections)})")
    built = {}
    for name, values in raw.items():
        cls = sections[name]
        hints = typing.get_type_hints(cls)
        for key in values:
            if key not in hints:
                raise ConfigError(
                    f"unknown key {name}.{key} (known keys in '{name}': {', '.join(hints)})"
                )
        built[name] = cls(**{k: coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()})
    return FinetuneSettings(**built)


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")
