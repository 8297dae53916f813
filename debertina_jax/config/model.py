"""The DeBERTa-v2/v3 model configuration, read from and written to HF `config.json`.

Field names and defaults are those of transformers' `DebertaV2Config` (model_type "deberta-v2"),
including the fields HF only reads with getattr (position_buckets, norm_rel_ebd, share_att_key,
embedding_size, conv_*, attention_head_size, cls_dropout). The defaults are HF's, not DeBERTa-v3's,
so a checkpoint's config.json means the same here as in HF; `DebertaV2Config.deberta_v3()` gives
the v3 settings. Optional fields left at None mean "same as hidden_size" (or HF's fallback) and are
not written to config.json.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import typing
from pathlib import Path
from typing import Any

from debertina_jax.config.checks import ConfigError, coerce

MODEL_TYPE = "deberta-v2"

# Keys every HF PretrainedConfig may write (plus generation defaults old 4.x versions wrote).
# They say nothing about the architecture, so they are accepted and dropped.
_GENERIC_HF_KEYS = frozenset(
    """
    transformers_version torch_dtype dtype _name_or_path _commit_hash _attn_implementation
    _attn_implementation_autoset output_attentions output_hidden_states return_dict use_return_dict
    chunk_size_feed_forward is_encoder_decoder is_decoder add_cross_attention tie_encoder_decoder
    cross_attention_hidden_size pruned_heads torchscript use_bfloat16 tf_legacy_loss
    finetuning_task tokenizer_class prefix sep_token_id decoder_start_token_id task_specific_params
    gradient_checkpointing use_cache bad_words_ids begin_suppress_tokens diversity_penalty
    do_sample early_stopping encoder_no_repeat_ngram_size exponential_decay_length_penalty
    forced_bos_token_id forced_eos_token_id length_penalty max_length min_length
    no_repeat_ngram_size num_beam_groups num_beams num_return_sequences output_scores
    remove_invalid_values repetition_penalty return_dict_in_generate suppress_tokens temperature
    top_k top_p typical_p
    """.split()
)

_POS_ATT_TYPES = ("c2p", "p2c")
# The HF activation names the model implements (model/activations.py maps each to a function).
ACTIVATIONS = (
    "gelu",
    "gelu_python",
    "gelu_new",
    "gelu_pytorch_tanh",
    "gelu_fast",
    "relu",
    "tanh",
    "sigmoid",
    "silu",
    "swish",
    "linear",
)
_NORM_REL_EBD = ("none", "layer_norm")


@dataclasses.dataclass(frozen=True)
class DebertaV2Config:
    """HF `DebertaV2Config` as an immutable dataclass (hashable: NNX keeps it as static data)."""

    vocab_size: int = 128100
    hidden_size: int = 1536
    num_hidden_layers: int = 24
    num_attention_heads: int = 24
    intermediate_size: int = 6144
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-7
    # Relative (disentangled) attention.
    relative_attention: bool = False
    max_relative_positions: int = -1
    position_buckets: int = -1
    norm_rel_ebd: str = "none"
    share_att_key: bool = False
    pos_att_type: tuple[str, ...] = ()
    position_biased_input: bool = True
    embedding_size: int | None = None
    attention_head_size: int | None = None
    # nGiE convolution after the first layer (DeBERTa-v2 xlarge/xxlarge).
    conv_kernel_size: int = 0
    conv_groups: int = 1
    conv_act: str = "tanh"
    # Heads.
    pooler_hidden_size: int | None = None
    pooler_dropout: float = 0.0
    pooler_hidden_act: str = "gelu"
    cls_dropout: float | None = None
    legacy: bool = True
    label_names: tuple[str, ...] = ("LABEL_0", "LABEL_1")
    problem_type: str | None = None
    # Bookkeeping HF keeps in the same file.
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    architectures: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Accept HF spellings ("p2c|c2p", lists) when constructed directly, store tuples.
        object.__setattr__(self, "pos_att_type", _parse_pos_att_type(self.pos_att_type))
        hints = _field_hints()
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, coerce(f.name, getattr(self, f.name), hints[f.name]))
        _validate(self)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        """Width of the word/position/type embedding tables (E)."""
        return self.embedding_size if self.embedding_size is not None else self.hidden_size

    @property
    def head_dim(self) -> int:
        if self.attention_head_size is not None:
            return self.attention_head_size
        return self.hidden_size // self.num_attention_heads

    @property
    def relative_max_position(self) -> int:
        """`max_relative_positions`, with HF's fallback to max_position_embeddings when < 1."""
        if self.max_relative_positions < 1:
            return self.max_position_embeddings
        return self.max_relative_positions

    @property
    def relative_span(self) -> int:
        """k: relative distances are clipped to [-k, k); rel_embeddings has 2k rows."""
        return self.position_buckets if self.position_buckets > 0 else self.relative_max_position

    @property
    def layer_norm_rel_embeddings(self) -> bool:
        """Whether `norm_rel_ebd` asks for a LayerNorm on the relative embeddings."""
        return "layer_norm" in _split_norm_rel_ebd(self.norm_rel_ebd)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def classifier_dropout(self) -> float:
        return self.hidden_dropout_prob if self.cls_dropout is None else self.cls_dropout

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def deberta_v3(cls, **overrides: Any) -> DebertaV2Config:
        """The DeBERTa-v3 architecture settings (microsoft/deberta-v3-*), base shape by default."""
        settings: dict[str, Any] = dict(
            vocab_size=128100,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            relative_attention=True,
            position_buckets=256,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            pos_att_type=("p2c", "c2p"),
            max_relative_positions=-1,
            position_biased_input=False,
            type_vocab_size=0,
            layer_norm_eps=1e-7,
        )
        settings.update(overrides)
        return cls.from_dict(settings)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DebertaV2Config:
        """Parse HF config.json content; unknown keys or bad values raise ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object/dict, got {type(d).__name__}")
        d = dict(d)
        model_type = d.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ConfigError(
                f"model_type: {model_type!r} is not supported, only {MODEL_TYPE!r} "
                "(DeBERTa-v2/v3) is"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        labels = _parse_labels(
            d.pop("id2label", None), d.pop("label2id", None), d.pop("num_labels", None)
        )
        if labels is not None:
            kwargs["label_names"] = labels
        for key, value in d.items():
            if key in fields:
                kwargs[key] = value
            elif key not in _GENERIC_HF_KEYS:
                close = difflib.get_close_matches(key, sorted(fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown config key {key!r}{hint}")
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> DebertaV2Config:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def replace(self, **changes: Any) -> DebertaV2Config:
        return dataclasses.replace(self, **changes)

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """HF config.json content (model_type, architectures, labels in HF's id2label form)."""
        d: dict[str, Any] = {"model_type": MODEL_TYPE}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "label_names":
                d["id2label"] = {str(i): name for i, name in enumerate(value)}
                d["label2id"] = {name: i for i, name in enumerate(value)}
            elif isinstance(value, tuple):
                d[f.name] = list(value)
            elif value is not None or f.name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                d[f.name] = value
        return d

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _parse_pos_att_type(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split("|")
    if not isinstance(value, list | tuple):
        raise ConfigError(f"pos_att_type: expected 'p2c|c2p' or a list, got {value!r}")
    parts = tuple(str(v).strip().lower() for v in value if str(v).strip())
    for p in parts:
        if p not in _POS_ATT_TYPES:
            raise ConfigError(f"pos_att_type: unknown attention type {p!r}; use c2p and/or p2c")
    if len(set(parts)) != len(parts):
        raise ConfigError(f"pos_att_type: repeated entry in {value!r}")
    return parts


def _split_norm_rel_ebd(value: str) -> list[str]:
    return [p.strip() for p in value.lower().split("|")]


def _parse_labels(id2label: Any, label2id: Any, num_labels: Any) -> tuple[str, ...] | None:
    if id2label is None:
        if num_labels is None:
            return None
        if not _is_int(num_labels) or num_labels < 1:
            raise ConfigError(f"num_labels: expected a positive int, got {num_labels!r}")
        return tuple(f"LABEL_{i}" for i in range(num_labels))
    if not isinstance(id2label, dict):
        raise ConfigError(f"id2label: expected an object, got {id2label!r}")
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except ValueError:
        raise ConfigError(f"id2label: keys must be integers, got {list(id2label)}") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise ConfigError(f"id2label: ids must be 0..n-1, got {sorted(by_id)}")
    labels = tuple(by_id[i] for i in range(len(by_id)))
    if num_labels is not None and num_labels != len(labels):
        raise ConfigError(f"num_labels: {num_labels} but id2label has {len(labels)} entries")
    if label2id is not None:
        if not isinstance(label2id, dict) or {str(k): int(v) for k, v in label2id.items()} != {
            name: i for i, name in enumerate(labels)
        }:
            raise ConfigError(f"label2id: {label2id!r} does not invert id2label {id2label!r}")
    return labels


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}, got {value!r}")


@functools.cache
def _field_hints() -> dict[str, Any]:
    return typing.get_type_hints(DebertaV2Config)


def _validate(c: DebertaV2Config) -> None:
    """Range and consistency checks (types are `coerce`'s); each error names the key."""
    positive = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "conv_groups",
    )
    for key in positive:
        _check(getattr(c, key) > 0, key, getattr(c, key), "must be > 0")
    for key in ("embedding_size", "attention_head_size", "pooler_hidden_size"):
        v = getattr(c, key)
        _check(v is None or v > 0, key, v, "must be > 0")
    for key in (
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "pooler_dropout",
        "cls_dropout",
    ):
        v = getattr(c, key)
        _check(v is None or 0.0 <= v < 1.0, key, v, "must be in [0, 1)")
    _check(c.type_vocab_size >= 0, "type_vocab_size", c.type_vocab_size, "must be >= 0")
    _check(c.layer_norm_eps > 0, "layer_norm_eps", c.layer_norm_eps, "must be > 0")
    _check(
        c.conv_kernel_size >= 0 and (c.conv_kernel_size == 0 or c.conv_kernel_size % 2 == 1),
        "conv_kernel_size",
        c.conv_kernel_size,
        "must be 0 (no conv) or odd",
    )
    _check(
        c.hidden_size % c.conv_groups == 0,
        "conv_groups",
        c.conv_groups,
        f"must divide hidden_size {c.hidden_size}",
    )
    for key in ("hidden_act", "conv_act", "pooler_hidden_act"):
        v = getattr(c, key)
        _check(v in ACTIVATIONS, key, v, f"supported: {', '.join(sorted(ACTIVATIONS))}")
    parts = _split_norm_rel_ebd(c.norm_rel_ebd)
    _check(
        all(p in _NORM_REL_EBD for p in parts),
        "norm_rel_ebd",
        c.norm_rel_ebd,
        "use 'layer_norm' or 'none'",
    )
    if c.attention_head_size is None:
        _check(
            c.hidden_size % c.num_attention_heads == 0,
            "num_attention_heads",
            c.num_attention_heads,
            f"must divide hidden_size {c.hidden_size}",
        )
    # HF's attention output projection is hidden->hidden, so the heads must tile hidden exactly.
    _check(
        c.head_dim * c.num_attention_heads == c.hidden_size,
        "attention_head_size",
        c.attention_head_size,
        f"num_attention_heads * head size must equal {c.hidden_size}",
    )
    _check(
        c.pooler_hidden_size in (None, c.hidden_size),
        "pooler_hidden_size",
        c.pooler_hidden_size,
        f"HF's ContextPooler only works with hidden_size {c.hidden_size}",
    )
    if c.relative_attention and c.position_buckets > 0:
        # The log-bucket formula divides by log((max_position - 1) / mid), which must be > 0.
        _check(
            c.position_buckets // 2 < c.relative_max_position - 1,
            "position_buckets",
            c.position_buckets,
            f"position_buckets / 2 must be below max relative position "
            f"{c.relative_max_position} - 1",
        )
    _check(
        c.legacy or c.embedding_dim == c.hidden_size,
        "legacy",
        c.legacy,
        "the non-legacy MLM head needs embedding_size == hidden_size",
    )
    _check(len(c.label_names) >= 1, "id2label", c.label_names, "needs at least one label")
