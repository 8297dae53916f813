"""The DeBERTa backbone pieces: embeddings, the post-LN encoder layer, the nGiE conv layer and the
encoder (relative embeddings + the layer stack, plain or scanned, with optional remat).

Parameter names follow our own tree (see hf_names.py for the HF correspondence). The word table
is `Embeddings.word_embeddings.embedding`, an nnx.Param inside an nnx.Embed; lookups are done here
with `jnp.take` so that a caller-supplied table (GDES: stop_gradient(E_G) + E_delta) can replace it.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from debertina_jax.config.model import DebertaV2Config
from debertina_jax.model.activations import activation
from debertina_jax.model.attention import DisentangledSelfAttention
from debertina_jax.model.blocks import (
    apply_dropout,
    apply_norm,
    dense,
    embed,
    key_rngs,
    layer_norm,
    normal_init,
    partitioned,
    split_key,
)
from debertina_jax.model.compute import DEFAULT_COMPUTE, REMAT_CHOICES, Compute
from debertina_jax.model.relative_position import build_relative_positions

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep matmul outputs, recompute the cheap elementwise work (GELU, LayerNorm, softmax).
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
assert set(REMAT_POLICIES) == set(REMAT_CHOICES)


class Embeddings(nnx.Module):
    """word (+ absolute position) (+ token type) -> [embed_proj] -> LayerNorm -> *mask -> dropout"""

    def __init__(
        self, config: DebertaV2Config, *, rngs: nnx.Rngs, compute: Compute = DEFAULT_COMPUTE
    ):
        self.config = config
        self.dtype = dtype = compute.dtype
        e = config.embedding_dim
        self.word_embeddings = embed(config.vocab_size, e, ("vocab", "embed"), config, rngs=rngs)
        if config.pad_token_id is not None and 0 <= config.pad_token_id < config.vocab_size:
            # HF zeroes the padding row at initialisation (nn.Embedding padding_idx).
            table = self.word_embeddings.embedding
            table[...] = table[...].at[config.pad_token_id].set(0.0)
        self.position_embeddings = (
            embed(config.max_position_embeddings, e, (None, "embed"), config, rngs=rngs)
            if config.position_biased_input
            else None
        )
        self.token_type_embeddings = (
            embed(config.type_vocab_size, e, (None, "embed"), config, rngs=rngs)
            if config.type_vocab_size > 0
            else None
        )
        self.embed_proj = (
            dense(
                e,
                config.hidden_size,
                (None, "embed"),
                config,
                rngs=rngs,
                dtype=dtype,
                use_bias=False,
            )
            if e != config.hidden_size
            else None
        )
        self.layer_norm = layer_norm(config.hidden_size, config, rngs=rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob)

    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array | None,
        mask: jax.Array,
        *,
        word_embeddings: jax.Array | None = None,
        position_embeddings: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        if word_embeddings is None:
            word_embeddings = self.word_embeddings.embedding[...]
        x = jnp.take(word_embeddings, input_ids, axis=0)
        if self.position_embeddings is not None:
            if position_embeddings is None:
                position_embeddings = self.position_embeddings.embedding[...]
            length = input_ids.shape[1]
            if length > position_embeddings.shape[0]:
                raise ValueError(
                    f"sequence length {length} exceeds max_position_embeddings "
                    f"{position_embeddings.shape[0]} (position_biased_input is true)"
                )
            x = x + position_embeddings[None, :length]
        elif position_embeddings is not None:
            raise ValueError(
                "position_embeddings given but the config has position_biased_input false"
            )
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_ids)
            x = x + jnp.take(self.token_type_embeddings.embedding[...], token_type_ids, axis=0)
        x = x.astype(self.dtype)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = apply_norm(self.layer_norm, x, self.dtype)
        x = x * mask[..., None].astype(self.dtype)
        return apply_dropout(self.dropout, x, rngs)


class EncoderLayer(nnx.Module):
    """Post-LN block: LN(x + attn(x)), then LN(h + FFN(h))."""

    def __init__(
        self,
        config: DebertaV2Config,
        *,
        rngs: nnx.Rngs,
        compute: Compute = DEFAULT_COMPUTE,
    ):
        self.dtype = dtype = compute.dtype
        hidden, inner = config.hidden_size, config.num_attention_heads * config.head_dim
        self.attention = DisentangledSelfAttention(
            config, rngs=rngs, compute=compute
        )
        self.attention_output = dense(
            inner, hidden, ("heads", "embed"), config, rngs=rngs, dtype=dtype
        )
        self.attention_norm = layer_norm(hidden, config, rngs=rngs)
        self.intermediate = dense(
            hidden, config.intermediate_size, ("embed", "mlp"), config, rngs=rngs, dtype=dtype
        )
        self.output = dense(
            config.intermediate_size, hidden, ("mlp", "embed"), config, rngs=rngs, dtype=dtype
        )
        self.output_norm = layer_norm(hidden, config, rngs=rngs)
        self.act = activation(config.hidden_act)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob)

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        rel_pos: np.ndarray | None,
        rel_embeddings: jax.Array | None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        rngs = key_rngs(dropout_key)
        context = self.attention(x, mask, rel_pos, rel_embeddings, rngs)
        attn = apply_dropout(self.dropout, self.attention_output(context), rngs)
        h = apply_norm(self.attention_norm, attn + x, self.dtype)
        ffn = apply_dropout(self.dropout, self.output(self.act(self.intermediate(h))), rngs)
        return apply_norm(self.output_norm, ffn + h, self.dtype)


class ConvLayer(nnx.Module):
    """nGiE: LN(layer0_out + act(conv(embeddings))), padded positions zeroed (DeBERTa-v2)."""

    def __init__(
        self, config: DebertaV2Config, *, rngs: nnx.Rngs, compute: Compute = DEFAULT_COMPUTE
    ):
        self.dtype = dtype = compute.dtype
        h, size = config.hidden_size, config.conv_kernel_size
        self.conv = nnx.Conv(
            h,
            h,
            kernel_size=(size,),
            padding=[((size - 1) // 2, (size - 1) // 2)],
            feature_group_count=config.conv_groups,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=normal_init(config, (None, None, "embed")),
            bias_init=partitioned(nnx.initializers.zeros_init(), ("embed",)),
            rngs=rngs,
        )
        self.layer_norm = layer_norm(h, config, rngs=rngs)
        self.act = activation(config.conv_act)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob)

    def __call__(
        self, embedded: jax.Array, residual: jax.Array, mask: jax.Array, rngs: nnx.Rngs | None
    ) -> jax.Array:
        keep = mask[..., None].astype(self.dtype)
        out = self.conv(embedded) * keep
        out = self.act(apply_dropout(self.dropout, out, rngs))
        return apply_norm(self.layer_norm, residual + out, self.dtype) * keep


class Encoder(nnx.Module):
    """Relative embeddings (+ LayerNorm), the layer stack and the optional conv after layer 0.

    scan_layers=True stores the layers stacked ([num_layers, ...], logical axis "layers") and runs
    them with jax.lax.scan, so compile time does not grow with depth. remat ("none" | "full" |
    "dots") wraps each layer in jax.checkpoint with the matching policy.
    """

    def __init__(
        self,
        config: DebertaV2Config,
        *,
        rngs: nnx.Rngs,
        compute: Compute = DEFAULT_COMPUTE,
    ):
        self.config = config
        self.dtype = compute.dtype
        self.scan_layers = compute.scan_layers
        self.remat = compute.remat
        h = config.hidden_size
        init = normal_init(config, ("relpos", "embed"))
        self.rel_embeddings = (
            nnx.Param(init(rngs.params(), (2 * config.relative_span, h)))
            if config.relative_attention
            else None
        )
        self.rel_norm = (
            layer_norm(h, config, rngs=rngs) if config.layer_norm_rel_embeddings else None
        )
        self.conv = (
            ConvLayer(config, rngs=rngs, compute=compute) if config.conv_kernel_size > 0 else None
        )
        make_layer = partial(EncoderLayer, config, compute=compute)
        if compute.scan_layers:

            @nnx.split_rngs(splits=config.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_stack(rngs: nnx.Rngs) -> EncoderLayer:
                return make_layer(rngs=rngs)

            self.layers = make_stack(rngs)
        else:
            self.layers = nnx.List([make_layer(rngs=rngs) for _ in range(config.num_hidden_layers)])

    def relative_inputs(self, length: int) -> tuple[np.ndarray | None, jax.Array | None]:
        """Bucketed relative positions [L, L] (static) and the normalised relative table."""
        c = self.config
        if not c.relative_attention:
            return None, None
        rel_pos = build_relative_positions(
            length, length, c.position_buckets, c.relative_max_position
        )
        table = self.rel_embeddings[...]
        if self.rel_norm is not None:
            return rel_pos, apply_norm(self.rel_norm, table, self.dtype)
        return rel_pos, table.astype(self.dtype)

    def __call__(
        self, x: jax.Array, mask: jax.Array, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """x: embeddings [B, L, H]; mask: [B, L] (1 = token)."""
        rel_pos, rel_embeddings = self.relative_inputs(x.shape[1])
        token = mask.astype(bool)
        # HF's 2-D -> 4-D mask: a pair (i, j) attends when both i and j are tokens.
        pair_mask = token[:, None, :, None] & token[:, None, None, :]
        embedded = x

        def run(layer_def, layer_state, h, key):
            layer = nnx.merge(layer_def, layer_state)
            return layer(h, pair_mask, rel_pos, rel_embeddings, key)

        if self.remat != "none":
            run = jax.checkpoint(
                run,
                policy=REMAT_POLICIES[self.remat],
                prevent_cse=not self.scan_layers,
                static_argnums=(0,),
            )
        n = self.config.num_hidden_layers
        conv_key, layer_key = split_key(dropout_key, 2)
        keys = None if layer_key is None else jax.random.split(layer_key, n)
        key_at = (lambda i: None) if keys is None else (lambda i: keys[i])

        def after_first(h):
            if self.conv is None:
                return h
            return self.conv(embedded, h, mask, key_rngs(conv_key))

        if not self.scan_layers:
            for i, layer in enumerate(self.layers):
                x = run(*nnx.split(layer), x, key_at(i))
                if i == 0:
                    x = after_first(x)
            return x

        layer_def, stacked = nnx.split(self.layers)

        def body(h, xs):
            layer_state, key = xs
            return run(layer_def, layer_state, h, key), None

        if self.conv is not None:
            # The conv follows layer 0, so layer 0 runs on its own and the rest is one scan.
            x = run(layer_def, jax.tree.map(lambda p: p[0], stacked), x, key_at(0))
            x = after_first(x)
            stacked = jax.tree.map(lambda p: p[1:], stacked)
            keys = None if keys is None else keys[1:]
        x, _ = jax.lax.scan(body, x, (stacked, keys))
        return x
