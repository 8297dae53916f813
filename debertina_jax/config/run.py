"""The one config tree: every hyperparameter of a pretraining run lives here, validated (types
by `checks.coerce`, ranges per section, cross-section rules in `_check_across_sections`) and
derived (model.vocab_size, the generator's depth) in this file.

A run is described by a YAML file in `configs/` plus dotted `key=value` overrides from the
command line. The `model` section is the discriminator's HF `config.json` (see
`config/model.py`: DebertaV2Config); every other section is a small frozen dataclass below.
Unknown keys and wrong types are rejected before anything starts, with the dotted key named.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from debertina_jax import storage
from debertina_jax.config.checks import ConfigError, check_choice, coerce
from debertina_jax.config.model import DebertaV2Config
from debertina_jax.config.phases import TrainPhase, check_phases


@dataclass(frozen=True)
class GeneratorConfig:
    """The ELECTRA generator: same width as the discriminator, fewer layers."""

    num_hidden_layers: int | None = None  # None: half the discriminator's depth (official recipe)
    embedding_sharing: str = "gdes"  # gdes | es | nes (DeBERTa-v3 paper, section 3)
    enhanced_mask_decoder: bool = False  # the official generator's EMD; HF cannot run it
    temperature: float = 1.0  # sampling temperature for replacements

    def __post_init__(self) -> None:
        check_choice("generator.embedding_sharing", self.embedding_sharing, ("gdes", "es", "nes"))
        if self.temperature <= 0:
            raise ConfigError(f"generator.temperature must be > 0, got {self.temperature}")
        if self.num_hidden_layers is not None and self.num_hidden_layers < 1:
            raise ConfigError(
                f"generator.num_hidden_layers must be >= 1, got {self.num_hidden_layers}"
            )


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from, how it is tokenized, packed and masked."""

    source: str = "files"  # files | tfds | hf
    # Text files (.txt, .jsonl, .json.gz, .parquet; globs and directories), local or gs://
    # (read in place, never copied whole). Empty: the sample corpus shipped with the package.
    train_files: tuple[str, ...] = ()
    encoding: str = "utf-8"
    errors: str = "strict"  # strict | replace | ignore: what to do with undecodable bytes
    tfds_name: str = "c4/multilingual:3.0.1"
    tfds_split: str = "pt"
    tfds_data_dir: str | None = None
    hf_name: str = "allenai/c4"
    hf_config: str = "pt"
    hf_split: str = "train"
    max_documents: int | None = None  # cap for streaming sources
    # SentencePiece pieces; [MASK] gets id = vocab_size, so model.vocab_size defaults to this + 1.
    vocab_size: int = 128000
    tokenizer_dir: str | None = None  # None: WORKDIR/tokenizer, trained when missing
    prepared_dir: str | None = None  # None: WORKDIR/data, prepared when missing
    # Where each host keeps its copy of gs:// prepared shards (checked against metadata.json
    # at every start). None: $DEBERTINA_CACHE, else ~/.cache/debertina_jax.
    cache_dir: str | None = None
    max_seq_length: int = 512
    eval_lines: int = 256  # packed lines held out for evaluation
    prepare_workers: int = 0  # 0: one per CPU core
    mask_prob: float = 0.15
    mask_strategy: str = "mask"  # mask (official v3: always [MASK]) | bert (80/10/10)
    max_predictions: int | None = None  # None: ceil(mask_prob * max_seq_length) rounded up to 8

    def __post_init__(self) -> None:
        check_choice("data.source", self.source, ("files", "tfds", "hf"))
        check_choice("data.mask_strategy", self.mask_strategy, ("mask", "bert"))
        check_choice("data.errors", self.errors, ("strict", "replace", "ignore"))
        if self.max_seq_length < 8:
            raise ConfigError(f"data.max_seq_length must be >= 8, got {self.max_seq_length}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"data.mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.vocab_size < 8:
            raise ConfigError(f"data.vocab_size must be >= 8, got {self.vocab_size}")


# What the discriminator may set on its own under optimizer.decoupled (discriminator_<key>).
_OWN_DISCRIMINATOR_KEYS = ("learning_rate", "weight_decay", "clip_norm")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup, then one of three schedules (pretraining/optimizer.py)."""

    learning_rate: float = 3e-4
    warmup_steps: int = 10000
    end_learning_rate: float = 0.0  # where every schedule ends, at train.steps
    # After warmup: linear (official recipe) | cosine | wsd (warmup-stable-decay: the peak
    # until the last wsd_decay_fraction of train.steps, then wsd_decay_shape down).
    schedule: str = "linear"
    wsd_decay_fraction: float = 0.1
    wsd_decay_shape: str = "1-sqrt"  # linear | cosine | 1-sqrt
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.01
    clip_norm: float = 1.0  # 0: no clipping
    grad_accum_steps: int = 1
    # Two AdamW states, generator and discriminator, each clipped on its own (the official
    # DeBERTa-v3 code's decoupled training). The keys above are the generator's, and the
    # discriminator's unless its own are set below (None: the same as the generator's).
    decoupled: bool = False
    discriminator_learning_rate: float | None = None
    discriminator_weight_decay: float | None = None
    discriminator_clip_norm: float | None = None

    def __post_init__(self) -> None:
        check_choice("optimizer.schedule", self.schedule, ("linear", "cosine", "wsd"))
        check_choice(
            "optimizer.wsd_decay_shape", self.wsd_decay_shape, ("linear", "cosine", "1-sqrt")
        )
        if self.grad_accum_steps < 1:
            raise ConfigError(
                f"optimizer.grad_accum_steps must be >= 1, got {self.grad_accum_steps}"
            )
        if not 0.0 < self.wsd_decay_fraction <= 1.0:
            raise ConfigError(
                f"optimizer.wsd_decay_fraction must be in (0, 1], got {self.wsd_decay_fraction}"
            )
        rates = ("learning_rate", "end_learning_rate", "weight_decay", "clip_norm")
        for key in rates + tuple(f"discriminator_{n}" for n in _OWN_DISCRIMINATOR_KEYS):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ConfigError(f"optimizer.{key} must be >= 0, got {value}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        own = [
            k for k in _OWN_DISCRIMINATOR_KEYS if getattr(self, f"discriminator_{k}") is not None
        ]
        if own and not self.decoupled:
            raise ConfigError(
                f"optimizer.discriminator_{own[0]} needs optimizer.decoupled: true (one "
                "optimizer has one learning rate, weight decay and clip for both models)"
            )


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # global batch, across all hosts and devices
    seed: int = 0
    rtd_weight: float = 50.0  # lambda in loss = MLM + lambda * RTD (paper and ELECTRA)
    dtype: str = "float32"  # compute dtype; master weights stay float32
    attention_impl: str = "auto"  # see attention.py; auto picks per backend
    scan_layers: bool = False
    remat: str = "none"  # none | full | dots
    log_every_steps: int = 10
    eval_every_steps: int = 100
    eval_batches: int = 4
    max_consecutive_nonfinite: int = 5  # skipped updates in a row before the run stops
    # The PRNG behind masking, sampling and dropout: threefry (JAX's default) or the cheaper
    # rbg / unsafe_rbg (XLA's RngBitGenerator; MaxText's choice on TPU). Any of them resumes
    # exactly; changing it mid-run changes the random stream from there on.
    prng_impl: str = "threefry"
    # [start, stop]: a jax.profiler trace of steps start..stop-1 in WORKDIR/profile (XProf).
    profile_steps: tuple[int, int] | None = None
    # Sequence-length phases, e.g. [{until_step: 900, max_seq_length: 64}, {until_step: 1000,
    # max_seq_length: 128}] (config/phases.py). Empty: every step at data.max_seq_length.
    phases: tuple[TrainPhase, ...] = ()
    # An exponential moving average of the weights, kept in the checkpoint and evaluated
    # beside them (ema_* in the eval rows); e.g. 0.999. None: off.
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        check_choice("train.dtype", self.dtype, ("float32", "bfloat16"))
        check_choice("train.remat", self.remat, ("none", "full", "dots"))
        check_choice("train.prng_impl", self.prng_impl, ("threefry", "rbg", "unsafe_rbg"))
        if (
            self.profile_steps is not None
            and not 1 <= self.profile_steps[0] < self.profile_steps[1]
        ):
            raise ConfigError(
                f"train.profile_steps must be [start, stop] with 1 <= start < stop, got "
                f"{list(self.profile_steps)}"
            )
        for name in ("steps", "batch_size", "log_every_steps", "eval_every_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in (0, 1) or null, got {self.ema_decay}")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; -1 means "all the devices the other axes leave"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # Logical parameter axis (see layers.py) -> mesh axis. Unlisted axes are replicated.
    rules: tuple[tuple[str, str | None], ...] = (
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("relpos", None),
        ("layers", None),
    )
    distributed: str = "auto"  # auto | on | off: call jax.distributed.initialize


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000
    keep: int = 3
    async_save: bool = True
    save_retries: int = 2  # a failed save is tried again this often before the run stops
    retry_delay: float = 5.0  # seconds before the first retry, doubling after each

    def __post_init__(self) -> None:
        for name in ("every_steps", "keep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"checkpoint.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class InitConfig:
    """Continued pretraining: start from HF directories instead of random weights."""

    discriminator_from_hf: str | None = None
    generator_from_hf: str | None = None


@dataclass(frozen=True)
class Config:
    model: DebertaV2Config = field(default_factory=DebertaV2Config)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    init: InitConfig = field(default_factory=InitConfig)

    def __post_init__(self) -> None:
        _check_across_sections(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (YAML/JSON-safe) that `config_from_dict` reads back."""
        out: dict[str, Any] = {"model": self.model.to_dict()}
        for f in dataclasses.fields(self):
            if f.name != "model":
                out[f.name] = _to_plain(dataclasses.asdict(getattr(self, f.name)))
        return out


def _check_across_sections(config: Config) -> None:
    """Every check that involves more than one section, in one place; each names its keys."""
    if config.model.vocab_size <= config.data.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({config.model.vocab_size}) must exceed data.vocab_size "
            f"({config.data.vocab_size}): [MASK] has id data.vocab_size; leave model.vocab_size "
            "out to get data.vocab_size + 1"
        )
    if config.train.batch_size % config.optimizer.grad_accum_steps:
        raise ConfigError(
            f"train.batch_size ({config.train.batch_size}) must be a multiple of "
            f"optimizer.grad_accum_steps ({config.optimizer.grad_accum_steps})"
        )
    check_phases(config)
    if config.generator.enhanced_mask_decoder:
        if config.model.position_biased_input:
            raise ConfigError(
                "generator.enhanced_mask_decoder needs model.position_biased_input false: with "
                "absolute positions in the input the official recipe has no EMD"
            )
        depth = generator_model_config(config).num_hidden_layers
        if depth < 2:
            raise ConfigError(
                "generator.enhanced_mask_decoder needs generator.num_hidden_layers >= 2 (the EMD "
                f"reuses the last layer), got {depth}"
            )


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value


def _build_section(name: str, cls: type, values: Any) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {name}.{unknown[0]} (known keys in '{name}': {', '.join(sorted(known))})"
        )
    kwargs = {k: coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Builds and validates the config tree from plain YAML/JSON data."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown config section '{unknown[0]}' (known: {', '.join(sections)})")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        if name != "model":
            cls = typing.get_type_hints(Config)[name]
            kwargs[name] = _build_section(name, cls, value)
    model = {} if raw.get("model") is None else raw["model"]
    if not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping of keys, got {model!r}")
    # The vocabulary is stated once, as data.vocab_size pieces; the model adds the [MASK] row.
    data = kwargs.get("data", DataConfig())
    model = {"vocab_size": data.vocab_size + 1, **model}
    try:
        kwargs["model"] = DebertaV2Config.from_dict(model)
    except ConfigError as e:
        raise ConfigError(f"model: {e}") from None
    return Config(**kwargs)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies `section.key=value` strings; values are parsed as YAML (1e-4, true, [a, b])."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(
                f"bad override {item!r}: expected section.key=value, e.g. train.steps=200"
            )
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text  # a string YAML cannot parse (e.g. a glob with ':') stays a string
        section, name = parts
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"cannot set {key}: '{section}' is not a section")
        raw[section][name] = value
    return raw


# A run keeps its config here (WORKDIR/config.yaml), so that a resume may leave out --config.
CONFIG_FILE = "config.yaml"


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Reads a YAML config file (local or gs://), applies overrides, and validates everything."""
    try:
        path = storage.check_path(path, "config")
    except storage.StoragePathError as e:
        raise ConfigError(str(e)) from None
    if not storage.is_file(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(storage.read_text(path)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected sections (model:, data:, train:, ...), not a "
                          f"{type(raw).__name__}")  # fmt: skip
    try:
        return config_from_dict(apply_overrides(raw, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def generator_model_config(config: Config) -> DebertaV2Config:
    """The generator's HF config: the discriminator's, at the generator's depth."""
    layers = config.generator.num_hidden_layers or max(1, config.model.num_hidden_layers // 2)
    return dataclasses.replace(config.model, num_hidden_layers=layers)
