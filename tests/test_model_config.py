"""DebertaV2Config: reading and writing HF config.json, and errors that name the key."""

import dataclasses
import json

import pytest
import transformers

from debertina_jax.config.model import ConfigError, DebertaV2Config

# microsoft/deberta-v3-base config.json, as downloaded.
MICROSOFT_V3_BASE = {
    "model_type": "deberta-v2",
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "relative_attention": True,
    "position_buckets": 256,
    "norm_rel_ebd": "layer_norm",
    "share_att_key": True,
    "pos_att_type": "p2c|c2p",
    "layer_norm_eps": 1e-7,
    "max_relative_positions": -1,
    "position_biased_input": False,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "type_vocab_size": 0,
    "vocab_size": 128100,
}
# DeBERTa-v2-xlarge style: conv layer and an explicit attention_head_size.
V2_XLARGE = dict(
    MICROSOFT_V3_BASE,
    hidden_size=1536,
    intermediate_size=6144,
    num_hidden_layers=24,
    num_attention_heads=24,
    attention_head_size=64,
    conv_kernel_size=3,
    conv_act="gelu",
)


def _effective(config: DebertaV2Config) -> dict:
    """What the model is built from, resolving HF's fallbacks."""
    return dict(
        dataclasses.asdict(config),
        embedding_size=config.embedding_dim,
        attention_head_size=config.head_dim,
        architectures=None,
        max_relative_positions=config.relative_max_position,
        pooler_hidden_size=config.pooler_hidden_size or config.hidden_size,
    )


def _hf_effective(hf: transformers.DebertaV2Config, ours: DebertaV2Config) -> dict:
    """The same values as HF's modeling code reads them (getattr with its defaults)."""
    d = {
        f.name: getattr(hf, f.name, getattr(DebertaV2Config(), f.name))
        for f in dataclasses.fields(ours)
    }
    d.update(
        embedding_size=getattr(hf, "embedding_size", hf.hidden_size),
        attention_head_size=getattr(
            hf, "attention_head_size", hf.hidden_size // hf.num_attention_heads
        ),
        max_relative_positions=(
            hf.max_relative_positions
            if hf.max_relative_positions >= 1
            else hf.max_position_embeddings
        ),
        pos_att_type=tuple(hf.pos_att_type or ()),
        label_names=tuple(hf.id2label[i] for i in range(hf.num_labels)),
        eos_token_id=hf.eos_token_id,
        architectures=None,
    )
    return d


def test_microsoft_v3_config_is_the_v3_preset():
    config = DebertaV2Config.from_dict(MICROSOFT_V3_BASE)
    assert config == DebertaV2Config.deberta_v3()
    assert config.pos_att_type == ("p2c", "c2p") and config.relative_span == 256
    assert config.relative_max_position == 512 and config.head_dim == 64


@pytest.mark.parametrize(
    "source",
    [
        MICROSOFT_V3_BASE,
        V2_XLARGE,
        dict(
            MICROSOFT_V3_BASE,
            embedding_size=128,
            legacy=True,
            position_biased_input=True,
            type_vocab_size=2,
            id2label={"0": "neg", "1": "neu", "2": "pos"},
            pooler_dropout=0.2,
            cls_dropout=0.15,
            problem_type="single_label_classification",
        ),
    ],
)
def test_agrees_with_hf_both_ways(source):
    hf = transformers.DebertaV2Config.from_dict(source)
    ours = DebertaV2Config.from_dict(hf.to_dict())  # what save_pretrained writes, generic keys too
    assert _effective(ours) == _hf_effective(hf, ours)
    back = transformers.DebertaV2Config.from_dict(ours.to_dict())
    assert _hf_effective(back, ours) == _hf_effective(hf, ours)
    assert DebertaV2Config.from_dict(ours.to_dict()) == ours


def test_json_file_round_trip(tmp_path):
    config = DebertaV2Config.deberta_v3(
        hidden_size=384, num_attention_heads=6, architectures=["DebertaV2ForMaskedLM"], num_labels=3
    )
    config.save_json(tmp_path / "config.json")
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "deberta-v2"
    assert written["architectures"] == ["DebertaV2ForMaskedLM"]
    assert written["pos_att_type"] == ["p2c", "c2p"]
    assert written["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    assert DebertaV2Config.from_json_file(tmp_path / "config.json") == config
    hash(config)  # NNX keeps the config as static module metadata


@pytest.mark.parametrize(
    "value,expected",
    [
        ("p2c|c2p", ("p2c", "c2p")),
        (" C2P | p2c ", ("c2p", "p2c")),
        (["c2p"], ("c2p",)),
        ("p2c", ("p2c",)),
        (None, ()),
        ([], ()),
    ],
)
def test_pos_att_type_spellings(value, expected):
    assert DebertaV2Config(pos_att_type=value).pos_att_type == expected


def test_labels():
    assert DebertaV2Config.from_dict({"num_labels": 3}).label_names == (
        "LABEL_0",
        "LABEL_1",
        "LABEL_2",
    )
    named = DebertaV2Config.from_dict(
        {"id2label": {"1": "pos", "0": "neg"}, "label2id": {"neg": 0, "pos": 1}}
    )
    assert named.label_names == ("neg", "pos") and named.num_labels == 2


@pytest.mark.parametrize(
    "change,message",
    [
        (
            {"hidden_sizes": 8},
            r"unknown config key 'hidden_sizes' \(did you mean 'hidden_size'\?\)",
        ),
        ({"model_type": "bert"}, "model_type: 'bert' is not supported"),
        ({"pos_att_type": "p2c|c2x"}, "pos_att_type: unknown attention type 'c2x'"),
        ({"pos_att_type": "c2p|c2p"}, "pos_att_type: repeated"),
        ({"num_attention_heads": 5}, "num_attention_heads: must divide hidden_size 768"),
        ({"attention_head_size": 32}, "attention_head_size: num_attention_heads . head size must"),
        ({"hidden_dropout_prob": 1.5}, r"hidden_dropout_prob: must be in \[0, 1\)"),
        ({"vocab_size": "100"}, "vocab_size: expected an integer, got '100'"),
        ({"num_hidden_layers": True}, "num_hidden_layers: expected an integer"),
        ({"relative_attention": "yes"}, "relative_attention: expected true or false"),
        ({"layer_norm_eps": 0}, "layer_norm_eps: must be > 0"),
        ({"conv_kernel_size": 2}, "conv_kernel_size: must be 0 .no conv. or odd"),
        ({"conv_kernel_size": 3, "conv_groups": 5}, "conv_groups: must divide hidden_size"),
        ({"hidden_act": "gelu_foo"}, "hidden_act: supported: gelu"),
        ({"norm_rel_ebd": "batch_norm"}, "norm_rel_ebd: use 'layer_norm' or 'none'"),
        ({"legacy": False, "embedding_size": 128}, "legacy: the non-legacy MLM head needs"),
        ({"position_buckets": 1024}, "position_buckets: position_buckets / 2 must be below"),
        ({"pooler_hidden_size": 100}, "pooler_hidden_size: HF's ContextPooler only works"),
        ({"id2label": {"0": "a", "2": "b"}}, r"id2label: ids must be 0..n-1"),
        ({"id2label": {"0": "a"}, "label2id": {"b": 0}}, "label2id: .* does not invert id2label"),
        ({"num_labels": 0}, "num_labels: expected a positive int"),
    ],
)
def test_bad_values_name_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        DebertaV2Config.from_dict(dict(MICROSOFT_V3_BASE, **change))


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        DebertaV2Config.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        DebertaV2Config.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": -1}))
    with pytest.raises(ConfigError, match="config.json: hidden_size: must be > 0"):
        DebertaV2Config.from_json_file(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        DebertaV2Config.from_dict(["hidden_size", 8])
