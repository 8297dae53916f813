"""NNX building blocks shared by the model files: parameters with logical axis names, float32
LayerNorm, and the dropout-key plumbing.

Logical axis names (every parameter carries them as `out_sharding` metadata):

| name     | dimension                                   | used by                             |
|----------|---------------------------------------------|-------------------------------------|
| "vocab"  | vocabulary rows                             | word embeddings, MLM output bias    |
| "embed"  | hidden_size (embedding_size for the tables) | almost every weight                 |
| "heads"  | num_heads * head_dim                        | q/k/v (+pos) projections, attn out  |
| "mlp"    | intermediate_size                           | FFN in/out                          |
| "relpos" | rows of the relative table (2k)             | encoder.rel_embeddings              |
| "layers" | stacked layer axis (scan_layers=True only)  | everything under encoder.layers     |
| None     | LayerNorm, conv taps, absolute-position and | LayerNorm, conv, 1-logit and label  |
|          | token-type rows, output side of square head | dims, square head projections       |
|          | projections                                 |                                     |

A kernel never carries the same name twice (that would map one mesh axis onto two dims), so the
hidden->hidden projections of the heads are ("embed", None) and `embed_proj` is (None, "embed").
Parameters are created with `eager_sharding=False`: the model builds anywhere (no mesh needed) and
the trainer maps logical names to mesh axes by rules, e.g.
`nnx.get_partition_spec(nnx.state(model))` then renaming with its rule table.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from debertina_jax.config.model import DebertaV2Config

Axes = tuple[str | None, ...]


def partitioned(init: nnx.Initializer, axes: Axes) -> nnx.Initializer:
    """`init` with logical axis names attached (metadata only, no eager sharding)."""
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def normal_init(config: DebertaV2Config, axes: Axes) -> nnx.Initializer:
    """HF's initialisation for weights: N(0, initializer_range)."""
    return partitioned(nnx.initializers.normal(config.initializer_range), axes)


def dense(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    config: DebertaV2Config,
    *,
    rngs: nnx.Rngs,
    dtype: jnp.dtype,
    use_bias: bool = True,
) -> nnx.Linear:
    """A Linear layer (kernel [in, out], the transpose of torch's) computing in `dtype`."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=normal_init(config, axes),
        bias_init=partitioned(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


def embed(
    num_embeddings: int, features: int, axes: Axes, config: DebertaV2Config, *, rngs: nnx.Rngs
) -> nnx.Embed:
    """An embedding table; lookups are done by the caller on `.embedding` (see Embeddings)."""
    return nnx.Embed(
        num_embeddings,
        features,
        param_dtype=jnp.float32,
        embedding_init=normal_init(config, axes),
        rngs=rngs,
    )


def layer_norm(features: int, config: DebertaV2Config, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm with HF's eps; parameters and statistics in float32 (see `apply_norm`)."""
    return nnx.LayerNorm(
        features,
        epsilon=config.layer_norm_eps,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        # The two-pass variance is what torch computes; E[x^2] - E[x]^2 loses digits.
        use_fast_variance=False,
        scale_init=partitioned(nnx.initializers.ones_init(), (None,)),
        bias_init=partitioned(nnx.initializers.zeros_init(), (None,)),
        rngs=rngs,
    )


def apply_norm(norm: nnx.LayerNorm, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Normalise in float32 (bfloat16 statistics are too coarse), return in the compute dtype."""
    return norm(x.astype(jnp.float32)).astype(dtype)


def dropout_stream(rngs: nnx.Rngs) -> nnx.Rngs | None:
    """A private "dropout" stream forked from `rngs` at construction, or None when it has none."""
    try:
        return nnx.Rngs(dropout=rngs.dropout())
    except AttributeError:
        return None


def dropout_key(
    deterministic: bool, rngs: nnx.Rngs | None, fallback: nnx.Rngs | None
) -> jax.Array | None:
    """A fresh key from the call's `rngs`, else the model's own stream; None if deterministic."""
    if deterministic:
        return None
    stream = rngs if rngs is not None else fallback
    if stream is None:
        raise ValueError(
            "deterministic=False needs a 'dropout' rng stream: build the model with "
            "rngs=nnx.Rngs(params=..., dropout=...) or call it with rngs=nnx.Rngs(dropout=...)"
        )
    return stream.dropout()


def split_key(key: jax.Array | None, n: int) -> Sequence[jax.Array | None]:
    """n independent keys, or n Nones when there is no key (deterministic)."""
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n))


def key_rngs(key: jax.Array | None) -> nnx.Rngs | None:
    """An Rngs whose "dropout" stream starts at `key` (each draw advances it)."""
    return None if key is None else nnx.Rngs(dropout=key)


def apply_dropout(dropout: nnx.Dropout, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    """Dropout that is active exactly when an rng stream is given."""
    return dropout(x, deterministic=rngs is None, rngs=rngs)


def gather_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x [B, L, ...] at positions [B, P] -> [B, P, ...]."""
    return jax.vmap(lambda row, pos: row[pos])(x, positions)
