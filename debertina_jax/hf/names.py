"""Our parameter paths <-> HF `modeling_deberta_v2` state-dict keys, and the tensor layouts.

Every nnx.Param of a model gets one HF key (one per layer for stacked `scan_layers` params), so
nothing can be silently left out of an export. Layouts: a Linear kernel is [in, out] here and
[out, in] in torch; a Conv1d kernel is [width, in/groups, out] here and [out, in/groups, width]
in torch; everything else is identical.

Also here: the key variants HF checkpoints come in (backbone keys with or without "deberta.",
the two MLM head layouts) and the names of the tensors other code looks up (word and position
tables, the RTD head, the enhanced mask decoder's table).
"""

import dataclasses
from collections.abc import Iterable

import numpy as np
from flax import nnx

# Within encoder layer i (HF prefix "encoder.layer.{i}.").
_LAYER_MODULES = {
    ("attention", "query_proj"): "attention.self.query_proj",
    ("attention", "key_proj"): "attention.self.key_proj",
    ("attention", "value_proj"): "attention.self.value_proj",
    ("attention", "pos_key_proj"): "attention.self.pos_key_proj",
    ("attention", "pos_query_proj"): "attention.self.pos_query_proj",
    ("attention_output",): "attention.output.dense",
    ("attention_norm",): "attention.output.LayerNorm",
    ("intermediate",): "intermediate.dense",
    ("output",): "output.dense",
    ("output_norm",): "output.LayerNorm",
}
_BACKBONE_MODULES = {
    ("embeddings", "word_embeddings"): "embeddings.word_embeddings",
    ("embeddings", "position_embeddings"): "embeddings.position_embeddings",
    ("embeddings", "token_type_embeddings"): "embeddings.token_type_embeddings",
    ("embeddings", "embed_proj"): "embeddings.embed_proj",
    ("embeddings", "layer_norm"): "embeddings.LayerNorm",
    ("encoder", "rel_norm"): "encoder.LayerNorm",
    ("encoder", "conv", "conv"): "encoder.conv.conv",
    ("encoder", "conv", "layer_norm"): "encoder.conv.LayerNorm",
}
_HEAD_MODULES = {
    ("pooler", "dense"): "pooler.dense",
    ("classifier",): "classifier",
    ("mask_predictions", "layer_norm"): "mask_predictions.LayerNorm",
    ("mask_predictions", "dense"): "mask_predictions.dense",
    ("mask_predictions", "classifier"): "mask_predictions.classifier",
}
# The MLM head's names depend on HF's `legacy` flag.
_MLM_MODULES = {
    True: {
        ("lm_head", "dense"): "cls.predictions.transform.dense",
        ("lm_head", "layer_norm"): "cls.predictions.transform.LayerNorm",
    },
    False: {
        ("lm_head", "dense"): "lm_predictions.lm_head.dense",
        ("lm_head", "layer_norm"): "lm_predictions.lm_head.LayerNorm",
    },
}
# Bare Params (not inside a Linear/LayerNorm/Embed) map to a full key.
_PARAMS = {
    ("encoder", "rel_embeddings"): "encoder.rel_embeddings.weight",
}
_MLM_PARAMS = {
    True: {("lm_head", "bias"): "cls.predictions.bias"},
    False: {("lm_head", "bias"): "lm_predictions.lm_head.bias"},
}
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

# Top-level prefixes of head weights in HF checkpoints (ours or other architectures').
HEAD_PREFIXES = ("cls.", "lm_predictions.", "mask_predictions.", "pooler.", "classifier.")
RTD_HEAD = "mask_predictions."
# The first key of each HF MLM head layout (legacy: True, lm_predictions: False).
_MLM_ROOTS = {True: "cls.predictions.", False: "lm_predictions."}

# Head models keep the backbone under "deberta."; the bare DebertaV2Model has no prefix.
BASE_PREFIX = "deberta."
_BACKBONE_ROOTS = ("embeddings.", "encoder.")
WORD_KEY = BASE_PREFIX + "embeddings.word_embeddings.weight"
POSITION_KEY = BASE_PREFIX + "embeddings.position_embeddings.weight"
# Our generator export keeps the EMD's position table under the name of an absolute position
# table: HF's DebertaV2 classes ignore it on load (their _keys_to_ignore_on_load_unexpected), and
# the official DeBERTa code keeps the EMD's table there too. EMD generators have no absolute
# positions in their input, so the name is free. The safetensors metadata flags such files.
EMD_POSITIONS_KEY = POSITION_KEY
EMD_METADATA_KEY = "debertina_enhanced_mask_decoder"  # "true" / "false"


@dataclasses.dataclass(frozen=True)
class TensorName:
    """One HF tensor: its key, the nnx.Param path holding it, and how to slice/lay it out."""

    hf_key: str
    path: tuple
    layer: int | None  # index on the stacked layer axis (scan_layers), else None
    layout: str  # "same" | "linear" | "conv"

    def to_hf(self, param: np.ndarray) -> np.ndarray:
        """The HF tensor from our full parameter array."""
        a = param if self.layer is None else param[self.layer]
        return np.ascontiguousarray(_relayout(a, self.layout))

    def from_hf(self, tensor: np.ndarray) -> np.ndarray:
        """Our (per-layer) array from the HF tensor."""
        return np.ascontiguousarray(_relayout(np.asarray(tensor), self.layout))

    def hf_shape(self, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = param_shape if self.layer is None else param_shape[1:]
        if self.layout == "linear":
            return tuple(reversed(shape))
        if self.layout == "conv":
            return (shape[2], shape[1], shape[0])
        return tuple(shape)


def _relayout(a: np.ndarray, layout: str) -> np.ndarray:
    # Both relayouts are their own inverse.
    if layout == "linear":
        return a.T
    if layout == "conv":
        return a.transpose(2, 1, 0)
    return a


def _layout(leaf: str, ndim: int) -> str:
    if leaf != "kernel":
        return "same"
    return "conv" if ndim == 3 else "linear"


def _module_key(table: dict, module: tuple, leaf: str) -> str | None:
    name = table.get(module)
    return None if name is None else f"{name}.{_LEAVES[leaf]}"


def _names_for(path: tuple, shape: tuple[int, ...], legacy: bool) -> list[TensorName]:
    module, leaf = path[:-1], path[-1]
    head = _MLM_PARAMS[legacy].get(path) or _module_key(
        {**_HEAD_MODULES, **_MLM_MODULES[legacy]}, module, leaf
    )
    if head is not None:
        return [TensorName(head, path, None, _layout(leaf, len(shape)))]

    prefix, body = (BASE_PREFIX, path[1:]) if path[0] == "deberta" else ("", path)
    if body[:2] == ("encoder", "layers"):
        if isinstance(body[2], int):  # nnx.List of layers
            layers, inner, stacked = [body[2]], body[3:], False
        else:  # one stacked layer (scan_layers)
            layers, inner, stacked = range(shape[0]), body[2:], True
        name = _LAYER_MODULES.get(inner[:-1])
        if name is not None:
            ndim = len(shape) - stacked
            return [
                TensorName(
                    f"{prefix}encoder.layer.{i}.{name}.{_LEAVES[inner[-1]]}",
                    path,
                    i if stacked else None,
                    _layout(inner[-1], ndim),
                )
                for i in layers
            ]
    else:
        key = _PARAMS.get(body) or _module_key(_BACKBONE_MODULES, body[:-1], body[-1])
        if key is not None:
            return [TensorName(prefix + key, path, None, _layout(body[-1], len(shape)))]
    raise KeyError(f"no Hugging Face name for parameter {'.'.join(map(str, path))}")


def tensor_names(model: nnx.Module) -> list[TensorName]:
    """The HF tensors of `model` (one of models.ARCHITECTURES), in parameter order."""
    legacy = bool(getattr(model.config, "legacy", True))
    names: list[TensorName] = []
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names.extend(_names_for(tuple(path), tuple(param.shape), legacy))
    return names


# ---- key variants of HF checkpoints ----------------------------------------------------------
def with_base_prefix(tensors: dict[str, np.ndarray], *, base: bool) -> dict[str, np.ndarray]:
    """Backbone keys without "deberta." for the bare DebertaV2Model (`base`), with it for every
    head model; checkpoints of either kind come both ways."""
    out = {}
    for key, value in tensors.items():
        if key.startswith(BASE_PREFIX):
            key = key.removeprefix(BASE_PREFIX) if base else key
        elif key.startswith(_BACKBONE_ROOTS) and not base:
            key = BASE_PREFIX + key
        out[key] = value
    return out


def mlm_layout(keys: Iterable[str]) -> bool | None:
    """The HF `legacy` flag matching the MLM head keys present: True for cls.predictions.*,
    False for lm_predictions.*; None when there are none, or both."""
    found = {legacy for key in keys for legacy, root in _MLM_ROOTS.items() if key.startswith(root)}
    return found.pop() if len(found) == 1 else None


def to_mlm_layout(tensors: dict[str, np.ndarray], legacy: bool) -> dict[str, np.ndarray]:
    """The tensors with the MLM head renamed to the `legacy` layout (same math: only the names
    differ; the tied decoder copies of the legacy layout are left as they are)."""
    renames = {
        f"{_MLM_MODULES[not legacy][m]}.": f"{_MLM_MODULES[legacy][m]}." for m in _MLM_MODULES[True]
    }
    renames.update({_MLM_PARAMS[not legacy][p]: _MLM_PARAMS[legacy][p] for p in _MLM_PARAMS[True]})
    out = {}
    for key, value in tensors.items():
        old = next((o for o in renames if key.startswith(o)), None)
        out[key if old is None else renames[old] + key[len(old) :]] = value
    return out
