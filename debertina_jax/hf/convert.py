"""Hugging Face interchange: read an HF DeBERTa-v2/v3 directory into an NNX model, write one back.

    model = from_hf("path/to/hf_dir")          # the class named by config.json `architectures`
    to_hf(model, "path/to/out", dtype="bfloat16")

The two weight-porting primitives, one per direction, which every import and export uses:
- `model_to_state_dict(model)`: all parameters as HF-named float32 NumPy arrays;
- `params_from_state_dict(model, tensors)`: HF-named tensors as our arrays by parameter path,
  ready for `model.params.set_params`, which writes each device's slice with the parameter's
  own dtype and sharding (so it works on a pod). `load_state_dict` is both plus the checks.

Like HF, loading ignores the tied decoder copies (cls.predictions.decoder.*), absolute position
embeddings of a model without them, and the heads of other architectures (e.g.
mask_predictions.* for every architecture but DebertaV2ForReplacedTokenDetection); anything else
missing, unexpected or mis-shaped is one CheckpointError listing all of it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from flax import nnx

from debertina_jax.config.model import DebertaV2Config
from debertina_jax.hf.files import (
    CheckpointError,
    read_hf_config,
    read_hf_weights,
    write_hf_dir,
)
from debertina_jax.hf.names import HEAD_PREFIXES, mlm_layout, tensor_names, with_base_prefix
from debertina_jax.model.compute import DEFAULT_COMPUTE, Compute
from debertina_jax.model.models import DebertaV2ForMaskedLM, DebertaV2Model, architecture_class
from debertina_jax.model.params import ParamPath, params_by_path, set_params

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "from_hf",
    "hf_shapes",
    "load_state_dict",
    "model_to_state_dict",
    "params_from_state_dict",
    "to_hf",
]


# ---- the two primitives ----------------------------------------------------------------------
def model_to_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """All of `model`'s parameters as HF-named float32 NumPy arrays (torch layouts)."""
    params = params_by_path(model)
    return {t.hf_key: t.to_hf(np.asarray(params[t.path][...])) for t in tensor_names(model)}


def params_from_state_dict(
    model: nnx.Module, tensors: dict[str, np.ndarray]
) -> dict[ParamPath, np.ndarray]:
    """Our arrays, by parameter path, for the HF keys of `model` (real or abstract) that are in
    `tensors`; other keys are not looked at. A stacked (scan_layers) parameter is made only from
    all of its layers."""
    params = params_by_path(model)
    out: dict[ParamPath, np.ndarray] = {}
    stacks: dict[ParamPath, dict[int, np.ndarray]] = {}
    for t in tensor_names(model):
        if t.hf_key not in tensors:
            continue
        value = t.from_hf(tensors[t.hf_key])
        if t.layer is None:
            out[t.path] = value
        else:
            stacks.setdefault(t.path, {})[t.layer] = value
    for path, layers in stacks.items():
        depth = params[path].shape[0]
        if sorted(layers) != list(range(depth)):
            raise CheckpointError(
                f"stacked parameter {'.'.join(map(str, path))} needs all {depth} layers, "
                f"got {sorted(layers)}"
            )
        out[path] = np.stack([layers[i] for i in range(depth)])
    return out


def hf_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """HF key -> HF shape of every tensor of `model` (a real or an abstract one)."""
    params = params_by_path(model)
    return {t.hf_key: t.hf_shape(tuple(params[t.path].shape)) for t in tensor_names(model)}


def load_state_dict(model: nnx.Module, state_dict: dict[str, np.ndarray]) -> None:
    """Copy HF-named tensors into `model` in place (keeping each parameter's dtype and sharding).

    The keys must be exactly the model's (see `model_to_state_dict`); otherwise nothing is
    changed and one CheckpointError lists every missing, unexpected and mis-shaped tensor.
    """
    expected = hf_shapes(model)
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    misshaped = [
        f"{key}: checkpoint {tuple(np.shape(state_dict[key]))}, model {shape}"
        for key, shape in expected.items()
        if key in state_dict and tuple(np.shape(state_dict[key])) != shape
    ]
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
    set_params(model, params_from_state_dict(model, state_dict))


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
    config = read_hf_config(d)
    name = architecture or (config.architectures[0] if config.architectures else "DebertaV2Model")
    cls = architecture_class(name)
    state = with_base_prefix(read_hf_weights(d), base=cls is DebertaV2Model)
    if cls is DebertaV2ForMaskedLM:
        config = _mlm_layout_from_weights(config, state)
    model = cls(config, rngs=nnx.Rngs(0), compute=compute)
    expected = hf_shapes(model)
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


def _ignored_like_hf(key: str, config: DebertaV2Config) -> bool:
    # HEAD_PREFIXES covers the tied cls.predictions.decoder.* copies too.
    return key.startswith(HEAD_PREFIXES) or (
        "embeddings.position_embeddings." in key and not config.position_biased_input
    )


def _mlm_layout_from_weights(config: DebertaV2Config, state: dict) -> DebertaV2Config:
    legacy = mlm_layout(state)
    if legacy is not None and legacy != config.legacy:
        log.info(
            "MLM head weights are in the %s layout; using legacy=%s",
            "legacy" if legacy else "lm_predictions",
            legacy,
        )
        return config.replace(legacy=legacy)
    return config


def to_hf(model: nnx.Module, path: str | Path, dtype: str = "float32") -> None:
    """Write config.json + model.safetensors that transformers loads with no missing or
    unexpected keys. dtype: "float32", "bfloat16" or "float16"."""
    write_hf_dir(path, model.config, type(model).__name__, model_to_state_dict(model), dtype=dtype)
