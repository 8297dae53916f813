"""The top-level architectures, named like their HF counterparts.

Every model takes (config, *, rngs, compute=DEFAULT_COMPUTE): `compute` (compute.py) holds the
compute dtype, scan_layers, remat and attention_impl; parameters are float32. Calls take int
arrays [B, L] and run deterministically unless `deterministic=False`, when dropout draws from the
call's `rngs` or else from the "dropout" stream of the constructor's rngs.
`word_embeddings` / `position_embeddings` ([V, E] / [P, E]), when given, replace the model's own
tables for that call (GDES passes stop_gradient(E_G) + E_delta); the MLM head then ties to the
given word table too.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from debertina_jax.config.model import DebertaV2Config
from debertina_jax.model.blocks import dense, dropout_key, dropout_stream, key_rngs, split_key
from debertina_jax.model.compute import DEFAULT_COMPUTE, Compute
from debertina_jax.model.heads import ContextPooler, MLMHead, RTDHead
from debertina_jax.model.layers import Embeddings, Encoder


class DebertaV2Model(nnx.Module):
    """Embeddings + encoder; returns the last hidden state [B, L, H]."""

    def __init__(
        self, config: DebertaV2Config, *, rngs: nnx.Rngs, compute: Compute = DEFAULT_COMPUTE
    ):
        self.config = config
        self.compute = compute
        self.embeddings = Embeddings(config, rngs=rngs, compute=compute)
        self.encoder = Encoder(config, rngs=rngs, compute=compute)
        self.rngs = dropout_stream(rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        word_embeddings: jax.Array | None = None,
        position_embeddings: jax.Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, dtype=jnp.int32)
        embed_key, encoder_key = split_key(dropout_key(deterministic, rngs, self.rngs), 2)
        x = self.embeddings(
            input_ids,
            token_type_ids,
            attention_mask,
            word_embeddings=word_embeddings,
            position_embeddings=position_embeddings,
            rngs=key_rngs(embed_key),
        )
        return self.encoder(x, attention_mask, encoder_key)


class _WithHead(nnx.Module):
    """`.deberta` (DebertaV2Model) plus a head: the constructor and the call every head model
    shares. Subclasses build their head in `_make_head` and apply it in `_head`."""

    def __init__(
        self, config: DebertaV2Config, *, rngs: nnx.Rngs, compute: Compute = DEFAULT_COMPUTE
    ):
        self.config = config
        self.compute = compute
        self.deberta = DebertaV2Model(config, rngs=rngs, compute=compute)
        self._make_head(config, rngs, compute)

    def _make_head(self, config: DebertaV2Config, rngs: nnx.Rngs, compute: Compute) -> None:
        raise NotImplementedError

    def _head(
        self, hidden: jax.Array, rngs: nnx.Rngs | None, word_embeddings: jax.Array | None
    ) -> jax.Array:
        raise NotImplementedError

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        word_embeddings: jax.Array | None = None,
        position_embeddings: jax.Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        body_key, head_key = split_key(dropout_key(deterministic, rngs, self.deberta.rngs), 2)
        hidden = self.deberta(
            input_ids,
            attention_mask,
            token_type_ids,
            word_embeddings=word_embeddings,
            position_embeddings=position_embeddings,
            deterministic=deterministic,
            rngs=key_rngs(body_key),
        )
        return self._head(hidden, key_rngs(head_key), word_embeddings)


class DebertaV2ForMaskedLM(_WithHead):
    """`.deberta` + `.lm_head` (MLMHead); returns logits [B, L, V].

    `legacy` (default: config.legacy) picks the HF layout: True = cls.predictions.*,
    False = lm_predictions.lm_head.*; it is stored in `.config`.
    """

    def __init__(
        self,
        config: DebertaV2Config,
        *,
        rngs: nnx.Rngs,
        compute: Compute = DEFAULT_COMPUTE,
        legacy: bool | None = None,
    ):
        if legacy is not None:
            config = config.replace(legacy=legacy)
        super().__init__(config, rngs=rngs, compute=compute)

    def _make_head(self, config: DebertaV2Config, rngs: nnx.Rngs, compute: Compute) -> None:
        self.lm_head = MLMHead(config, rngs=rngs, compute=compute)

    def _head(self, hidden, rngs, word_embeddings):
        if word_embeddings is None:
            word_embeddings = self.deberta.embeddings.word_embeddings.embedding[...]
        return self.lm_head(hidden, word_embeddings)


class DebertaV2ForSequenceClassification(_WithHead):
    """`.deberta` + `.pooler` (ContextPooler) + `.classifier`; returns logits [B, num_labels]."""

    def _make_head(self, config: DebertaV2Config, rngs: nnx.Rngs, compute: Compute) -> None:
        self.pooler = ContextPooler(config, rngs=rngs, compute=compute)
        self.dropout = nnx.Dropout(config.classifier_dropout)
        self.classifier = _classifier(config, rngs, compute)

    def _head(self, hidden, rngs, word_embeddings):
        pooled = self.pooler(hidden, rngs)
        pooled = self.dropout(pooled, deterministic=rngs is None, rngs=rngs)
        return self.classifier(pooled).astype(jnp.float32)


class DebertaV2ForTokenClassification(_WithHead):
    """`.deberta` + `.classifier` on every token; returns logits [B, L, num_labels]."""

    def _make_head(self, config: DebertaV2Config, rngs: nnx.Rngs, compute: Compute) -> None:
        self.dropout = nnx.Dropout(config.hidden_dropout_prob)
        self.classifier = _classifier(config, rngs, compute)

    def _head(self, hidden, rngs, word_embeddings):
        hidden = self.dropout(hidden, deterministic=rngs is None, rngs=rngs)
        return self.classifier(hidden).astype(jnp.float32)


class DebertaV2ForReplacedTokenDetection(_WithHead):
    """The ELECTRA-style discriminator: `.deberta` + `.mask_predictions` (RTDHead) -> [B, L].

    HF has no such class; its checkpoints store the head as mask_predictions.*, which HF's own
    architectures ignore on load.
    """

    def _make_head(self, config: DebertaV2Config, rngs: nnx.Rngs, compute: Compute) -> None:
        self.mask_predictions = RTDHead(config, rngs=rngs, compute=compute)

    def _head(self, hidden, rngs, word_embeddings):
        return self.mask_predictions(hidden)


def _classifier(config: DebertaV2Config, rngs: nnx.Rngs, compute: Compute) -> nnx.Linear:
    return dense(
        config.hidden_size,
        config.num_labels,
        ("embed", None),
        config,
        rngs=rngs,
        dtype=compute.dtype,
    )


ARCHITECTURES: dict[str, type[nnx.Module]] = {
    cls.__name__: cls
    for cls in (
        DebertaV2Model,
        DebertaV2ForMaskedLM,
        DebertaV2ForSequenceClassification,
        DebertaV2ForTokenClassification,
        DebertaV2ForReplacedTokenDetection,
    )
}


def architecture_class(name: str) -> type[nnx.Module]:
    """The model class for an HF `architectures` entry; ValueError listing the supported ones."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {name!r}; supported: {', '.join(ARCHITECTURES)}"
        ) from None
