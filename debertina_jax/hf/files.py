"""Hugging Face model directories on disk: reading config.json and the weights, writing both.

Weights are read from model.safetensors, sharded safetensors (model.safetensors.index.json), or
pytorch_model.bin (optionally sharded) through torch's weights-only loader, never full
unpickling. Every model directory this package writes goes through `write_hf_dir`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from debertina_jax.config.model import DebertaV2Config

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "pytorch_model.bin"
# The dtypes weights can be written in (config.json "dtype" names them the same way).
EXPORT_DTYPES: dict[str, Any] = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}


class CheckpointError(ValueError):
    """Weights that do not fit the model (names or shapes) or a malformed weights file."""


def check_dtype(dtype: str) -> None:
    """A ValueError naming the choices unless `dtype` is one of EXPORT_DTYPES."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(
            f"unsupported dtype {dtype!r}: dtype must be one of {', '.join(EXPORT_DTYPES)}"
        )


# ---- reading -------------------------------------------------------------------------------------
def read_hf_config(directory: str | Path) -> DebertaV2Config:
    """config.json of an HF model directory (FileNotFoundError when there is none)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"not a directory: {d}")
    if not (d / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {d}: not a Hugging Face model directory")
    return DebertaV2Config.from_json_file(d / CONFIG_NAME)


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


def read_weights_metadata(directory: str | Path) -> dict[str, str]:
    """The metadata of the directory's single model.safetensors ({} for other formats)."""
    path = Path(directory) / SAFETENSORS_NAME
    if not path.is_file():
        return {}
    with safe_open(str(path), "np") as f:
        return dict(f.metadata() or {})


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


def _read_sharded(
    index_path: Path, read: Callable[[Path], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
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


# ---- writing -------------------------------------------------------------------------------------
def write_hf_dir(
    directory: str | Path,
    config: DebertaV2Config,
    architecture: str,
    tensors: dict[str, np.ndarray],
    *,
    dtype: str = "float32",
    metadata: dict[str, str] | None = None,
) -> None:
    """config.json (naming `architecture` and `dtype`) and model.safetensors, in `dtype`.

    The tensors are rounded to `dtype` as they are; callers that must refuse values the dtype
    cannot hold check them first (export/cast.py).
    """
    check_dtype(dtype)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    config_dict = config.replace(architectures=(architecture,)).to_dict()
    config_dict["dtype"] = dtype
    (d / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    np_dtype = EXPORT_DTYPES[dtype]
    arrays = {k: np.ascontiguousarray(v, dtype=np_dtype) for k, v in tensors.items()}
    save_file(arrays, str(d / SAFETENSORS_NAME), metadata={"format": "pt", **(metadata or {})})
