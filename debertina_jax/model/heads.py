"""Output heads on top of the encoder's hidden states.

- MLMHead: dense -> act -> LayerNorm -> tied word table + bias. Same math for HF's two layouts
  (legacy `cls.predictions.*` with a dense H->E, non-legacy `lm_predictions.lm_head.*` with H->H).
- ContextPooler: HF's sequence pooler (dropout -> dense on token 0 -> act).
- RTDHead: the replaced-token-detection head of the official DeBERTa-v3 recipe,
  LayerNorm(h + h[:, 0]) -> dense -> act -> 1 logit per token.
Logits come out in float32 whatever the compute dtype.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from debertina_jax.config.model import DebertaV2Config
from debertina_jax.model.activations import activation
from debertina_jax.model.blocks import apply_dropout, apply_norm, dense, layer_norm, partitioned
from debertina_jax.model.compute import DEFAULT_COMPUTE, Compute


class MLMHead(nnx.Module):
    """Masked-LM head tied to a word table; `config.legacy` picks the HF layout it mirrors."""

    def __init__(
        self, config: DebertaV2Config, *, rngs: nnx.Rngs, compute: Compute = DEFAULT_COMPUTE
    ):
        self.dtype = dtype = compute.dtype
        width = config.embedding_dim if config.legacy else config.hidden_size
        self.dense = dense(
            config.hidden_size, width, ("embed", None), config, rngs=rngs, dtype=dtype
        )
        self.act = activation(config.hidden_act)
        self.layer_norm = layer_norm(width, config, rngs=rngs)
        self.bias = nnx.Param(
            partitioned(nnx.initializers.zeros_init(), ("vocab",))(
                rngs.params(), (config.vocab_size,)
            )
        )

    def __call__(self, hidden: jax.Array, embedding_table: jax.Array) -> jax.Array:
        """hidden [..., H] (any leading shape), embedding_table [V, E] -> logits [..., V]."""
        h = apply_norm(self.layer_norm, self.act(self.dense(hidden)), self.dtype)
        logits = jnp.einsum(
            "...e,ve->...v",
            h,
            embedding_table.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        return logits + self.bias[...]


class ContextPooler(nnx.Module):
    """HF ContextPooler: the first token's state through dropout, dense and `pooler_hidden_act`."""

    def __init__(
        self, config: DebertaV2Config, *, rngs: nnx.Rngs, compute: Compute = DEFAULT_COMPUTE
    ):
        dtype = compute.dtype
        h = config.hidden_size
        self.dense = dense(h, h, ("embed", None), config, rngs=rngs, dtype=dtype)
        self.act = activation(config.pooler_hidden_act)
        self.dropout = nnx.Dropout(config.pooler_dropout)

    def __call__(self, hidden: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.act(self.dense(apply_dropout(self.dropout, hidden[:, 0], rngs)))


class RTDHead(nnx.Module):
    """Replaced-token detection: LayerNorm(h + h[:, :1]) -> dense H->H -> act -> Linear(H, 1).

    The activation is `hidden_act` (exact erf GELU for every DeBERTa config), as in the official
    recipe; HF names: mask_predictions.{LayerNorm, dense, classifier}.
    """

    def __init__(
        self, config: DebertaV2Config, *, rngs: nnx.Rngs, compute: Compute = DEFAULT_COMPUTE
    ):
        self.dtype = dtype = compute.dtype
        h = config.hidden_size
        self.layer_norm = layer_norm(h, config, rngs=rngs)
        self.dense = dense(h, h, ("embed", None), config, rngs=rngs, dtype=dtype)
        self.act = activation(config.hidden_act)
        self.classifier = dense(h, 1, ("embed", None), config, rngs=rngs, dtype=dtype)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, L, H] -> logits [B, L] (float32)."""
        h = apply_norm(self.layer_norm, hidden + hidden[:, :1], self.dtype)
        return self.classifier(self.act(self.dense(h)))[..., 0].astype(jnp.float32)
