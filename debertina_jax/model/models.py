"""The top-level architectures, named like their HF counterparts.

Every model takes (config, *, rngs, dtype=float32, scan_layers=False, remat="none",
attention_impl="gather"); parameters are float32, `dtype` is the compute dtype. Calls take int
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
from debertina_jax.model.heads import ContextPooler, MLMHead, RTDHead
from debertina_jax.model.layers import Embeddings, Encoder


class DebertaV2Model(nnx.Module):
    """Embeddings + encoder; returns the last hidden state [B, L, H]."""

    def __init__(
        self,
        config: DebertaV2Config,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        scan_layers: bool = False,
        remat: str = "none",
        attention_impl: str = "gather",
    ):
        self.config = config
        self.dtype = dtype
        self.scan_layers = scan_layers
        self.embeddings = Embeddings(config, rngs=rngs, dtype=dtype)
        self.encoder = Encoder(
            config,
            rngs=rngs,
            dtype=dtype,
            scan_layers=scan_layers,
            remat=remat,
            attention_impl=attention_impl,
        )
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


class _WithBackbone(nnx.Module):
    """Shared constructor/forward for the architectures that put a head on `self.deberta`."""

    def __init__(
        self, config: DebertaV2Config, *, rngs: nnx.Rngs, dtype, scan_layers, remat, attention_impl
    ):
        self.config = config
        self.dtype = dtype
        self.deberta = DebertaV2Model(
            config,
            rngs=rngs,
            dtype=dtype,
            scan_layers=scan_layers,
            remat=remat,
            attention_impl=attention_impl,
        )

    def _backbone(
        self,
        input_ids,
        attention_mask,
        token_type_ids,
        word_embeddings,
        position_embeddings,
        deterministic,
        rngs,
    ):
        """(hidden [B, L, H], rngs for the head's dropout or None)."""
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
        return hidden, key_rngs(head_key)


class DebertaV2ForMaskedLM(_WithBackbone):
    """`.deberta` + `.lm_head` (MLMHead); returns logits [B, L, V].

    `legacy` (default: config.legacy) picks the HF layout: True = cls.predictions.*,
    False = lm_predictions.lm_head.*; it is stored in `.config`.
    """

    def __init__(
        self,
        config: DebertaV2Config,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        scan_layers: bool = False,
        remat: str = "none",
        attention_impl: str = "gather",
        legacy: bool | None = None,
    ):
        if legacy is not None:
            config = config.replace(legacy=legacy)
        super().__init__(
            config,
            rngs=rngs,
            dtype=dtype,
            scan_layers=scan_layers,
            remat=remat,
            attention_impl=attention_impl,
        )
        self.lm_head = MLMHead(config, rngs=rngs, dtype=dtype)

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
        hidden, _ = self._backbone(
            input_ids,
            attention_mask,
            token_type_ids,
            word_embeddings,
            position_embeddings,
            deterministic,
            rngs,
        )
        if word_embeddings is None:
            word_embeddings = self.deberta.embeddings.word_embeddings.embedding[...]
        return self.lm_head(hidden, word_embeddings)


class DebertaV2ForSequenceClassification(_WithBackbone):
    """`.deberta` + `.pooler` (ContextPooler) + `.classifier`; returns logits [B, num_labels]."""

    def __init__(
        self,
        config: DebertaV2Config,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        scan_layers: bool = False,
        remat: str = "none",
        attention_impl: str = "gather",
    ):
        super().__init__(
            config,
            rngs=rngs,
            dtype=dtype,
            scan_layers=scan_layers,
            remat=remat,
            attention_impl=attention_impl,
        )
        self.pooler = ContextPooler(config, rngs=rngs, dtype=dtype)
        self.dropout = nnx.Dropout(config.classifier_dropout)
        self.classifier = dense(
            config.hidden_size, config.num_labels, ("embed", None), config, rngs=rngs, dtype=dtype
        )

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
        hidden, head_rngs = self._backbone(
            input_ids,
            attention_mask,
            token_type_ids,
            word_embeddings,
            position_embeddings,
            deterministic,
            rngs,
        )
        pooled = self.pooler(hidden, head_rngs)
        pooled = self.dropout(pooled, deterministic=head_rngs is None, rngs=head_rngs)
        return self.classifier(pooled).astype(jnp.float32)


class DebertaV2ForTokenClassification(_WithBackbone):
    """`.deberta` + `.classifier` on every token; returns logits [B, L, num_labels]."""

    def __init__(
        self,
        config: DebertaV2Config,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        scan_layers: bool = False,
        remat: str = "none",
        attention_impl: str = "gather",
    ):
        super().__init__(
            config,
            rngs=rngs,
            dtype=dtype,
            scan_layers=scan_layers,
            remat=remat,
            attention_impl=attention_impl,
        )
        self.dropout = nnx.Dropout(config.hidden_dropout_prob)
        self.classifier = dense(
            config.hidden_size, config.num_labels, ("embed", None), config, rngs=rngs, dtype=dtype
        )

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
        hidden, head_rngs = self._backbone(
            input_ids,
            attention_mask,
            token_type_ids,
            word_embeddings,
            position_embeddings,
            deterministic,
            rngs,
        )
        hidden = self.dropout(hidden, deterministic=head_rngs is None, rngs=head_rngs)
        return self.classifier(hidden).astype(jnp.float32)


class DebertaV2ForReplacedTokenDetection(_WithBackbone):
    """The ELECTRA-style discriminator: `.deberta` + `.mask_predictions` (RTDHead) -> [B, L].

    HF has no such class; its checkpoints store the head as mask_predictions.*, which HF's own
    architectures ignore on load.
    """

    def __init__(
        self,
        config: DebertaV2Config,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        scan_layers: bool = False,
        remat: str = "none",
        attention_impl: str = "gather",
    ):
        super().__init__(
            config,
            rngs=rngs,
            dtype=dtype,
            scan_layers=scan_layers,
            remat=remat,
            attention_impl=attention_impl,
        )
        self.mask_predictions = RTDHead(config, rngs=rngs, dtype=dtype)

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
        hidden, _ = self._backbone(
            input_ids,
            attention_mask,
            token_type_ids,
            word_embeddings,
            position_embeddings,
            deterministic,
            rngs,
        )
        return self.mask_predictions(hidden)


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
