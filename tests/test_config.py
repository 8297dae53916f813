"""The config tree: YAML files, dotted overrides, and clear errors for bad keys and types."""

from pathlib import Path

import pytest
import yaml

from debertina_jax.config import Config, ConfigError, generator_model_config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["tiny", "xsmall", "small", "base", "base-128k", "large"])
def test_every_shipped_config_loads(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(config, Config)
    # [MASK] sits at id = number of pieces, so the model needs at least one more row.
    assert config.model.vocab_size >= config.data.vocab_size + 1
    assert generator_model_config(config).hidden_size == config.model.hidden_size


def test_generator_is_half_depth_by_default():
    config = load_config(CONFIGS / "xsmall.yaml")
    assert generator_model_config(config).num_hidden_layers == 6


def test_overrides_with_fixed_key_names():
    config = load_config(
        CONFIGS / "tiny.yaml",
        [
            "train.steps=200",
            "train.batch_size=16",
            "train.log_every_steps=5",
            "train.eval_every_steps=50",
            "checkpoint.every_steps=20",
            "data.max_seq_length=64",
            "data.train_files=/tmp/corpus/*.txt",
            "mesh.data=2",
            "mesh.fsdp=2",
            "mesh.tensor=2",
            "optimizer.learning_rate=1e-4",
        ],
    )
    assert config.train.steps == 200 and config.train.batch_size == 16
    assert config.data.train_files == ("/tmp/corpus/*.txt",)
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (2, 2, 2)
    assert config.optimizer.learning_rate == 1e-4
    assert config.checkpoint.every_steps == 20


def test_round_trip_through_dict():
    from debertina_jax.config import config_from_dict

    config = load_config(CONFIGS / "tiny.yaml", ["data.train_files=[a.txt, b.txt]"])
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "train.stepz"),
        ("trian.steps=3", "trian"),
        ("train.steps=many", "train.steps"),
        ("train.steps=2.5", "train.steps"),
        ("train.dtype=float16", "train.dtype"),
        ("model.hidden_sise=64", "hidden_sise"),
        ("generator.embedding_sharing=shared", "generator.embedding_sharing"),
        ("train.steps", "section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny.yaml", [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_model_vocab_size_is_derived_from_the_pieces():
    # Stated once: data.vocab_size pieces, and the model gets one more row for [MASK].
    for path in CONFIGS.glob("*.yaml"):
        assert "vocab_size" not in yaml.safe_load(path.read_text())["model"], path
    assert load_config(CONFIGS / "tiny.yaml", ["data.vocab_size=400"]).model.vocab_size == 401
    # An explicit, larger table (e.g. microsoft/deberta-v3's 128100 rows) is kept.
    wide = load_config(CONFIGS / "tiny.yaml", ["model.vocab_size=2100"])
    assert wide.model.vocab_size == 2100


@pytest.mark.parametrize(
    "overrides, keys",
    [
        (["model.vocab_size=300", "data.vocab_size=400"], ("model.vocab_size", "data.vocab_size")),
        (["train.batch_size=10", "optimizer.grad_accum_steps=4"],
         ("train.batch_size", "optimizer.grad_accum_steps")),
        (["generator.enhanced_mask_decoder=true", "model.position_biased_input=true"],
         ("generator.enhanced_mask_decoder", "model.position_biased_input")),
        (["generator.enhanced_mask_decoder=true", "generator.num_hidden_layers=1"],
         ("generator.enhanced_mask_decoder", "generator.num_hidden_layers")),
        (["checkpoint.keep=0"], ("checkpoint.keep",)),
    ],
)
def test_contradictions_across_sections_name_both_keys(overrides, keys):
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / "tiny.yaml", overrides)
    assert all(key in str(error.value) for key in keys), str(error.value)
