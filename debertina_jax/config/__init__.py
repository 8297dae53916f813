"""The one config tree of a run, validated and derived in one place.

    model.py   the discriminator's HF `config.json` (DebertaV2Config) and ConfigError
    run.py     every other section, the YAML reader with dotted overrides, the cross-section
               checks and the derived values (generator depth, [MASK] id, ...)

This package imports nothing else of debertina_jax: every layer above may read the config.
"""

from debertina_jax.config.model import ConfigError, DebertaV2Config
from debertina_jax.config.phases import (
    Phase,
    TrainPhase,
    phase_config,
    phase_of_step,
    sequence_phases,
    tokens_seen,
)
from debertina_jax.config.run import (
    CONFIG_FILE,
    CheckpointConfig,
    Config,
    DataConfig,
    GeneratorConfig,
    InitConfig,
    MeshConfig,
    OptimizerConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    generator_model_config,
    load_config,
)

__all__ = [
    "CONFIG_FILE",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DebertaV2Config",
    "GeneratorConfig",
    "InitConfig",
    "MeshConfig",
    "OptimizerConfig",
    "Phase",
    "TrainConfig",
    "TrainPhase",
    "apply_overrides",
    "config_from_dict",
    "generator_model_config",
    "load_config",
    "phase_config",
    "phase_of_step",
    "sequence_phases",
    "tokens_seen",
]
