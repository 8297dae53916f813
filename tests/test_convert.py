"""HF interchange: bit-exact round trips, the file formats and key variants HF checkpoints come in,
and clear errors for bad input."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from deberta_testing import perturb_nnx, perturb_torch, tiny_config
from flax import nnx
from safetensors.numpy import load_file, save_file

from debertina_jax.config.model import ConfigError
from debertina_jax.hf.convert import (
    CheckpointError,
    from_hf,
    load_state_dict,
    model_to_state_dict,
    to_hf,
)
from debertina_jax.model.compute import Compute
from debertina_jax.model.models import ARCHITECTURES

# (architecture, config overrides) for the round trips.
ROUND_TRIPS = {
    "DebertaV2Model": ("DebertaV2Model", {}),
    "MaskedLM legacy": ("DebertaV2ForMaskedLM", {}),
    "MaskedLM lm_predictions": ("DebertaV2ForMaskedLM", dict(legacy=False)),
    "SequenceClassification": (
        "DebertaV2ForSequenceClassification",
        dict(label_names=("x", "y", "z")),
    ),
    "TokenClassification": ("DebertaV2ForTokenClassification", {}),
    "MaskedLM, conv, abs positions, types, embedding_size 24": (
        "DebertaV2ForMaskedLM",
        dict(conv_kernel_size=3, position_biased_input=True, type_vocab_size=2, embedding_size=24),
    ),
}


def _ours(architecture: str, scan_layers: bool = False, **overrides):
    model = ARCHITECTURES[architecture](
        tiny_config(**overrides), rngs=nnx.Rngs(0), compute=Compute(scan_layers=scan_layers)
    )
    perturb_nnx(model)
    return model


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_jax_to_hf_to_jax_is_bit_exact(name, tmp_path):
    architecture, overrides = ROUND_TRIPS[name]
    model = _ours(architecture, **overrides)
    before = model_to_state_dict(model)
    to_hf(model, tmp_path)

    hf, info = getattr(transformers, architecture).from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    hf_state = {k: v.numpy() for k, v in hf.state_dict().items()}
    for key, value in before.items():  # HF holds exactly our tensors (plus its tied copies)
        np.testing.assert_array_equal(hf_state[key], value, err_msg=key)

    back = from_hf(tmp_path)
    assert type(back) is type(model) and back.config == model.config.replace(
        architectures=(architecture,)
    )
    _assert_same_tensors(model_to_state_dict(back), before)


def test_scanned_model_round_trip(tmp_path):
    model = _ours("DebertaV2ForMaskedLM", scan_layers=True, num_hidden_layers=3)
    to_hf(model, tmp_path)
    hf, info = transformers.DebertaV2ForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    plain = from_hf(tmp_path)
    scanned = from_hf(tmp_path, compute=Compute(scan_layers=True))
    assert not plain.compute.scan_layers and scanned.compute.scan_layers
    _assert_same_tensors(model_to_state_dict(plain), model_to_state_dict(model))
    _assert_same_tensors(model_to_state_dict(scanned), model_to_state_dict(model))


def test_rtd_round_trip_and_hf_ignores_the_head(tmp_path):
    model = _ours("DebertaV2ForReplacedTokenDetection")
    to_hf(model, tmp_path)
    back = from_hf(tmp_path)
    assert type(back) is type(model)
    _assert_same_tensors(model_to_state_dict(back), model_to_state_dict(model))
    # HF has no RTD class: its base model loads the backbone and leaves mask_predictions.* out.
    _, info = transformers.DebertaV2Model.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert info["unexpected_keys"] and all(
        k.startswith("mask_predictions.") for k in info["unexpected_keys"]
    )


@pytest.fixture(scope="module")
def hf_mlm(tmp_path_factory):
    """An HF MaskedLM (legacy head) with perturbed weights, saved; and its directory."""
    config = tiny_config(position_biased_input=True)  # also exercises kept position embeddings
    torch.manual_seed(0)
    hf = transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config.from_dict(config.to_dict()))
    perturb_torch(hf)
    directory = tmp_path_factory.mktemp("hf_mlm")
    hf.save_pretrained(directory)
    return hf, directory


def test_hf_to_jax_to_hf_is_bit_exact(hf_mlm, tmp_path):
    _, directory = hf_mlm
    to_hf(from_hf(directory), tmp_path)
    _assert_same_tensors(
        load_file(tmp_path / "model.safetensors"), load_file(directory / "model.safetensors")
    )


def test_hf_sequence_classifier_to_jax_to_hf_is_bit_exact(tmp_path):
    config = tiny_config(label_names=("neg", "pos"))
    hf = transformers.DebertaV2ForSequenceClassification(
        transformers.DebertaV2Config.from_dict(config.to_dict())
    )
    perturb_torch(hf)
    hf.save_pretrained(tmp_path / "hf")
    model = from_hf(tmp_path / "hf")
    assert model.config.label_names == ("neg", "pos")
    to_hf(model, tmp_path / "ours")
    _assert_same_tensors(
        load_file(tmp_path / "ours" / "model.safetensors"),
        load_file(tmp_path / "hf" / "model.safetensors"),
    )
    reloaded = transformers.DebertaV2ForSequenceClassification.from_pretrained(tmp_path / "ours")
    assert reloaded.config.id2label == {0: "neg", 1: "pos"}


def test_sharded_safetensors_and_pytorch_bin(hf_mlm, tmp_path):
    hf, directory = hf_mlm
    expected = model_to_state_dict(from_hf(directory))
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    _assert_same_tensors(model_to_state_dict(from_hf(sharded)), expected)

    # pytorch_model.bin as older checkpoints ship it, tied decoder copies included.
    binary = tmp_path / "bin"
    hf.config.save_pretrained(binary)
    torch.save(hf.state_dict(), binary / "pytorch_model.bin")
    assert "cls.predictions.decoder.weight" in hf.state_dict()
    _assert_same_tensors(model_to_state_dict(from_hf(binary)), expected)


def test_microsoft_style_v3_checkpoint(tmp_path):
    """deberta-v3-* downloads: no `architectures`, no `legacy`, pytorch_model.bin with
    deberta.* + lm_predictions.* + mask_predictions.*."""
    mlm = _ours("DebertaV2ForMaskedLM", legacy=False)
    rtd = _ours("DebertaV2ForReplacedTokenDetection")
    rtd_head = {
        k: v for k, v in model_to_state_dict(rtd).items() if k.startswith("mask_predictions.")
    }
    state = model_to_state_dict(mlm) | rtd_head
    torch.save({k: torch.tensor(v) for k, v in state.items()}, tmp_path / "pytorch_model.bin")
    config = {
        k: v
        for k, v in tiny_config().to_dict().items()
        if k not in ("legacy", "architectures", "id2label", "label2id")
    }
    (tmp_path / "config.json").write_text(json.dumps(config))

    base = from_hf(tmp_path)
    assert type(base).__name__ == "DebertaV2Model"
    assert model_to_state_dict(base).keys() == {
        k.removeprefix("deberta.") for k in state if k.startswith("deberta.")
    }
    masked = from_hf(tmp_path, "DebertaV2ForMaskedLM")
    assert masked.config.legacy is False
    _assert_same_tensors(model_to_state_dict(masked), model_to_state_dict(mlm))
    detector = from_hf(tmp_path, "DebertaV2ForReplacedTokenDetection")
    np.testing.assert_array_equal(
        model_to_state_dict(detector)["mask_predictions.dense.weight"],
        rtd_head["mask_predictions.dense.weight"],
    )


def test_bfloat16_export(tmp_path):
    model = _ours("DebertaV2ForMaskedLM")
    to_hf(model, tmp_path, dtype="bfloat16")
    tensors = load_file(tmp_path / "model.safetensors")
    assert all(v.dtype == ml_dtypes.bfloat16 for v in tensors.values())
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    hf = transformers.DebertaV2ForMaskedLM.from_pretrained(tmp_path)
    assert hf.deberta.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    back = model_to_state_dict(from_hf(tmp_path))
    for key, value in model_to_state_dict(model).items():
        np.testing.assert_array_equal(
            back[key], value.astype(ml_dtypes.bfloat16).astype(np.float32)
        )


# ---- bad input ---------------------------------------------------------------------------------
def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        from_hf(tmp_path / "nowhere")


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ConfigError, match=r"config.json: model_type: 'bert' is not supported"):
        from_hf(tmp_path)


def test_unsupported_architecture_and_missing_weights(tmp_path):
    tiny_config(architectures=["DebertaV2ForQuestionAnswering"]).save_json(tmp_path / "config.json")
    with pytest.raises(
        ValueError, match="unsupported architecture 'DebertaV2ForQuestionAnswering'"
    ):
        from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        from_hf(tmp_path, "DebertaV2Model")


def test_wrong_shape_in_safetensors(tmp_path):
    to_hf(_ours("DebertaV2Model"), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["encoder.layer.1.intermediate.dense.weight"] = np.zeros((64, 31), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"(?s)1 wrong shape:.*encoder\.layer\.1\.intermediate"
        r"\.dense\.weight: checkpoint \(64, 31\), model \(64, 32\)",
    ):
        from_hf(tmp_path)


def test_one_error_lists_every_problem_and_changes_nothing():
    model = _ours("DebertaV2Model")
    before = model_to_state_dict(model)
    state = dict(before)
    del state["encoder.rel_embeddings.weight"]
    del state["embeddings.LayerNorm.bias"]
    state["encoder.layer.7.output.dense.weight"] = np.zeros((2, 2), np.float32)
    state["embeddings.word_embeddings.weight"] = np.zeros((5, 32), np.float32)
    with pytest.raises(CheckpointError) as error:
        load_state_dict(model, {k: v + 1 if v.ndim == 1 else v for k, v in state.items()})
    message = str(error.value)
    for expected in (
        "2 missing:",
        "encoder.rel_embeddings.weight",
        "embeddings.LayerNorm.bias",
        "1 unexpected:",
        "encoder.layer.7.output.dense.weight",
        "1 wrong shape:",
        "embeddings.word_embeddings.weight: checkpoint (5, 32), model (97, 32)",
    ):
        assert expected in message
    _assert_same_tensors(model_to_state_dict(model), before)


def test_head_model_from_base_checkpoint_names_the_missing_head(tmp_path):
    to_hf(_ours("DebertaV2Model"), tmp_path)
    with pytest.raises(CheckpointError, match=r"(?s)missing:.*cls\.predictions\.bias"):
        from_hf(tmp_path, "DebertaV2ForMaskedLM")


def test_corrupt_safetensors_and_bad_export_dtype(tmp_path):
    tiny_config().save_json(tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        from_hf(tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of"):
        to_hf(_ours("DebertaV2Model"), tmp_path / "out", dtype="int8")
