"""Hugging Face interchange: read an HF DeBERTa-v2/v3 directory into an NNX model, write one back.

    model = from_hf("path/to/hf_dir")          # the class named by config.json `architectures`
    to_hf(model, "path/to/out", dtype="bfloat16")

Reads model.safetensors, sharded safetensors (model.safetensors.index.json), or pytorch_model.bin
(optionally sharded) through torch's weights-only loader, never full unpickling. Like HF, loading
ignores the tied decoder copies (cls.predictions.decoder.*), absolute position embeddings of a
model without them, and the heads of other architectures (e.g. mask_predictions.* for every
architecture but DebertaV2ForReplacedTokenDetection); anything else missing, unexpected or
mis-shaped is one CheckpointError listing all of it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from debertina_jax.config.model import DebertaV2Config
from debertina_jax.hf.names import HEAD_PREFIXES, tensor_names
from debertina_jax.model.compute import DEFAULT_COMPUTE, Compute
from debertina_jax.model.models import DebertaV2ForMaskedLM, DebertaV2Model, architecture_class

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "pytorch_model.bin"
_EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class CheckpointError(ValueError):
    """Weights that do not fit the model (names or shapes) or a malformed weights file."""


# ---- state dicts ---------------------------------------------------------------------------
def model_to_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """All of `model`'s parameters as HF-named float32 NumPy arrays (torch layouts)."""
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    return {t.hf_key: t.to_hf(np.asarray(params[t.path][...])) for t in tensor_names(model)}


def load_state_dict(model: nnx.Module, state_dict: dict[str, np.ndarray]) -> None:
    """Copy HF-named tensors into `model` in place (keeping each parameter's dtype and sharding).

    The keys must be exactly the model's (see `model_to_state_dict`); otherwise nothing is
    changed and one CheckpointError lists every missing, unexpected and mis-shaped tensor.
    """
    names = tensor_names(model)
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    expected = {t.hf_key: t for t in names}
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    misshaped = []
    for key, t in expected.items():
        if key in state_dict:
            want = t.hf_shape(tuple(params[t.path].shape))
            got = tuple(np.shape(state_dict[key]))
            if got != want:
                misshaped.append(f"{key}: checkpoint {got}, model {want}")
    if missing or unexpected or misshaped:
        parts = [f"{type(model).__name__}: the weights do not match the model."]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", misshaped),
        ):
            if items:
                parts.append(f"{len(items)} {title}:\n  " + "\n  ".join(items))
        raise CheckpointError("\n".join(parts))

    stacks: dict[tuple, list] = {}
    for t in names:
        value = t.from_hf(state_dict[t.hf_key])
        if t.layer is None:
            _assign(params[t.path], value)
        else:
            stacks.setdefault(t.path, [None] * params[t.path].shape[0])[t.layer] = value
    for path, layers in stacks.items():
        _assign(params[path], np.stack(layers))


def _assign(param: nnx.Param, value: np.ndarray) -> None:
    old = param[...]
    new = jnp.asarray(value, dtype=old.dtype)
    if isinstance(old, jax.Array):
        new = jax.device_put(new, old.sharding)
    param[...] = new


# ---- files -----------------------------------------------------------------------------------
def read_hf_weights(directory: str | Path) -> dict[str, np.ndarray]:
    """All tensors of an HF model directory as NumPy arrays (bfloat16 stays ml_dtypes.bfloat16)."""
    d = Path(directory)
    if (d / SAFETENSORS_NAME).is_file():
        return _read_safetensors(d / SAFETENSORS_NAME)
    if (d / f"{SAFETENSORS_NAME}.index.json").is_file():
        return _read_sharded(d / f"{SAFETENSORS_NAME}.index.json", _read_safetensors)
    if (d / TORCH_NAME).is_file():
        return _read_torch(d / TORCH_NAME)
    if (d / f"{TORCH_NAME}.index.json").is_file():
        return _read_sharded(d / f"{TORCH_NAME}.index.json", _read_torch)
    raise FileNotFoundError(
        f"no weights in {d}: expected {SAFETENSORS_NAME}, {SAFETENSORS_NAME}.index.json, "
        f"{TORCH_NAME} or {TORCH_NAME}.index.json"
    )


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path} needs torch (pip install torch)") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(
            f"{path}: cannot read with torch.load(weights_only=True) ({e})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    # numpy has no bfloat16 for torch tensors; float32 holds bf16/fp16 values exactly.
    return {
        k: (v.float() if v.dtype in (torch.bfloat16, torch.float16) else v).numpy()
        for k, v in state.items()
    }


def _read_sharded(index_path: Path, read) -> dict[str, np.ndarray]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid shard index ({e})") from None
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise FileNotFoundError(f"{index_path} lists {shard}, which does not exist")
        tensors.update(read(shard_path))
    return tensors


# ---- whole directories ---------------------------------------------------------------------
def from_hf(
    path: str | Path,
    architecture: str | None = None,
    *,
    compute: Compute = DEFAULT_COMPUTE,
) -> nnx.Module:
    """Load an HF DeBERTa-v2/v3 directory as the model named by `architecture` (default: the
    config's first `architectures` entry, else DebertaV2Model). Base-model keys may come with
    or without the "deberta." prefix. For MaskedLM the head layout (legacy or not) follows the
    weights present, since microsoft/deberta-v3-* ship lm_predictions.* without `legacy: false`.
    """
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"not a directory: {d}")
    if not (d / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {d}: not a Hugging Face model directory")
    config = DebertaV2Config.from_json_file(d / CONFIG_NAME)
    name = architecture or (config.architectures[0] if config.architectures else "DebertaV2Model")
    cls = architecture_class(name)
    state = _normalise_keys(read_hf_weights(d), base=cls is DebertaV2Model)
    if cls is DebertaV2ForMaskedLM:
        config = _mlm_layout_from_weights(config, state)
    model = cls(config, rngs=nnx.Rngs(0), compute=compute)
    expected = {t.hf_key for t in tensor_names(model)}
    ignored = sorted(k for k in state if k not in expected and _ignored_like_hf(k, config))
    if ignored:
        log.warning(
            "%s: ignoring %d tensors %s loads no weights for: %s",
            d,
            len(ignored),
            name,
            ", ".join(ignored),
        )
    try:
        load_state_dict(model, {k: v for k, v in state.items() if k not in ignored})
    except CheckpointError as e:
        raise CheckpointError(f"{d}: {e}") from None
    return model


def _normalise_keys(state: dict[str, np.ndarray], *, base: bool) -> dict[str, np.ndarray]:
    """Backbone keys with "deberta." for head models, without it for the bare DebertaV2Model."""
    out = {}
    for key, value in state.items():
        if key.startswith("deberta."):
            key = key.removeprefix("deberta.") if base else key
        elif key.startswith(("embeddings.", "encoder.")) and not base:
            key = "deberta." + key
        out[key] = value
    return out


def _ignored_like_hf(key: str, config: DebertaV2Config) -> bool:
    # HEAD_PREFIXES covers the tied cls.predictions.decoder.* copies too.
    return key.startswith(HEAD_PREFIXES) or (
        "embeddings.position_embeddings." in key and not config.position_biased_input
    )


def _mlm_layout_from_weights(config: DebertaV2Config, state: dict) -> DebertaV2Config:
    has_legacy = any(k.startswith("cls.predictions.") for k in state)
    has_new = any(k.startswith("lm_predictions.") for k in state)
    if has_legacy != has_new and config.legacy != has_legacy:
        log.info(
            "MLM head weights are in the %s layout; using legacy=%s",
            "legacy" if has_legacy else "lm_predictions",
            has_legacy,
        )
        return config.replace(legacy=has_legacy)
    return config


def to_hf(model: nnx.Module, path: str | Path, dtype: str = "float32") -> None:
    """Write config.json + model.safetensors that transformers loads with no missing or
    unexpected keys. dtype: "float32", "bfloat16" or "float16"."""
    if dtype not in _EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_EXPORT_DTYPES)}, got {dtype!r}")
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    config = model.config.replace(architectures=(type(model).__name__,))
    config_dict = config.to_dict()
    config_dict["dtype"] = dtype
    (d / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    np_dtype = _EXPORT_DTYPES[dtype]
    tensors = {k: v.astype(np_dtype) for k, v in model_to_state_dict(model).items()}
    save_file(tensors, str(d / SAFETENSORS_NAME), metadata={"format": "pt"})
