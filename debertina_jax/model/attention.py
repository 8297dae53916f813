"""Disentangled self-attention (DeBERTa): content->content + content->position + position->content.

score(i, j) = [q_i . k_j  +  q_i . Kr[c2p(i, j)]  +  k_j . Qr[p2c(j, i)]] / sqrt(d * (1 + #terms))

with c2p(i, j) = clip(rel(i, j) + k, 0, 2k - 1) and p2c(j, i) = clip(-rel(j, i) + k, 0, 2k - 1),
rel the (bucketed) relative positions, k the span and Kr / Qr the projected relative embeddings
[heads, 2k, d]. The relative terms need a per-(i, j) lookup into a [.., L, 2k] score table; how
that lookup is done is pluggable (`impl`), all variants give the same numbers:

- "gather": HF's formulation, the [L, 2k] table then take_along_axis. Its backward is a
  scatter-add over [B, N, L, L], slow on CPU and notoriously slow on TPU.
- "onehot": the gather as a contraction with a one-hot [L, L, 2k] tensor (HF's TPU path): no
  gather, but 2k / d times the FLOPs of the c2c term.
- "shift": uses that the index depends only on i - j. The 2L - 1 relative rows a sequence can
  reach are laid out by distance, q @ rows^T gives every (i, distance) score with one matmul, and
  a reshape "skew" (Transformer-XL's relative shift) moves distance i - j under column j. Only a
  small [2L - 1, d] row gather on the parameter side remains. Query rows run in blocks so the
  matmul covers L * (L + block - 1) scores instead of L * (2L - 1). See docs/performance.md.

`auto` picks per backend from measurements (`default_attention_impl`).
"""

from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from debertina_jax.config.model import DebertaV2Config
from debertina_jax.model.blocks import apply_dropout, dense
from debertina_jax.model.compute import DEFAULT_COMPUTE, Compute

# (content [B, N, L, d], pos [N, R, d], index [L, L'] into R) -> scores [B, N, L, L'] with
# scores[b, n, i, j] = content[b, n, i] . pos[n, index[i, j]].
RelativeScoreFn = Callable[[jax.Array, jax.Array, np.ndarray | jax.Array], jax.Array]


def gather_relative_scores(content: jax.Array, pos: jax.Array, index) -> jax.Array:
    """HF's formulation: all [L, R] scores with one matmul, then a gather along R."""
    table = jnp.einsum("bnid,nrd->bnir", content, pos)
    index = jnp.broadcast_to(jnp.asarray(index), table.shape[:2] + tuple(np.shape(index)))
    return jnp.take_along_axis(table, index, axis=-1)


def onehot_relative_scores(content: jax.Array, pos: jax.Array, index) -> jax.Array:
    """The gather as a contraction with a one-hot [L, L', R] tensor (exact: one 1 per row)."""
    table = jnp.einsum("bnid,nrd->bnir", content, pos)
    onehot = jax.nn.one_hot(jnp.asarray(index), pos.shape[1], dtype=table.dtype)
    return jnp.einsum("bnir,ijr->bnij", table, onehot)


def relative_by_distance(index) -> np.ndarray | None:
    """For a static [Lq, Lk] index that depends only on j - i: the vector e of length
    Lq + Lk - 1 with index[i, j] = e[j - i + Lq - 1]. None for anything else (a traced index,
    or e.g. the enhanced mask decoder's tiled positions)."""
    if not isinstance(index, np.ndarray) or index.ndim != 2:
        return None
    query_len, key_len = index.shape
    by_distance = np.concatenate([index[::-1, 0], index[0, 1:]])
    offsets = np.arange(key_len)[None, :] - np.arange(query_len)[:, None] + query_len - 1
    return by_distance if np.array_equal(by_distance[offsets], index) else None


def shift_block_rows(query_len: int, key_len: int) -> int:
    """Query rows per block of the "shift" formulation.

    A block of b rows needs the scores of Lk + b - 1 distances, so blocks of Lk / 4 rows compute
    1.25x the [L, L] scores (L x (2L - 1) for one block) while keeping the matmuls large: 32 rows
    at L = 128 (fastest of 1 / 2 / 4 / 8 blocks on a 2-core CPU), 128 rows (one MXU tile) at 512.
    """
    return max(1, min(query_len, -(-key_len // 4)))


def shift_relative_scores(content: jax.Array, pos: jax.Array, index) -> jax.Array:
    """Gather-free: per block of query rows, one matmul against the relative rows of the
    distances the block can see, then a reshape skew puts distance i - j under column j.

    Falls back to `gather_relative_scores` when `index` is not a static function of j - i.
    """
    by_distance = relative_by_distance(index)
    if by_distance is None:
        return gather_relative_scores(content, pos, index)
    query_len, key_len = index.shape
    rows = shift_block_rows(query_len, key_len)
    blocks = -(-query_len // rows)
    width = key_len + rows - 1  # distances one block of rows can see
    # Block k (query rows k*rows ...) sees distance columns starts[k] ... starts[k] + width - 1 of
    # `by_distance`. One spare column makes the row stride width + 1, which the skew needs; it
    # and the columns of padding rows (clipped) are never read.
    starts = query_len - rows - rows * np.arange(blocks)
    columns = np.clip(starts[:, None] + np.arange(width + 1), 0, by_distance.size - 1)
    heads, _, dim = pos.shape
    windows = jnp.take(pos, by_distance[columns].reshape(-1), axis=1)
    windows = windows.reshape(heads, blocks, width + 1, dim)

    lead = content.shape[:-2]
    content = jnp.pad(content, [(0, 0)] * len(lead) + [(0, blocks * rows - query_len), (0, 0)])
    content = content.reshape(*lead, blocks, rows, dim)
    table = jnp.einsum("...nkid,nkmd->...nkim", content, windows)  # [.., blocks, rows, width+1]
    # Skew: in the flattened block, row r's column j - r + rows - 1 sits at (rows - 1) + r * width
    # + j, so dropping rows - 1 leading entries and re-reading rows of `width` aligns column j.
    flat = table.reshape(*lead, blocks, rows * (width + 1))
    flat = flat[..., rows - 1 : rows - 1 + rows * width]
    scores = flat.reshape(*lead, blocks, rows, width)[..., :key_len]
    return scores.reshape(*lead, blocks * rows, key_len)[..., :query_len, :]


RELATIVE_SCORE_IMPLS: dict[str, RelativeScoreFn] = {
    "gather": gather_relative_scores,
    "onehot": onehot_relative_scores,
    "shift": shift_relative_scores,
}

# Measured (docs/performance.md): "shift" is the fastest on CPU. TPU and GPU were not measured
# here; "shift" is also the pick there, by reasoning: it has no [B, N, L, L] gather or scatter
# (the TPU bottleneck) and about half the FLOPs of "onehot" at L = 512.
_DEFAULT_IMPL = {"cpu": "shift", "tpu": "shift", "gpu": "shift", "cuda": "shift", "rocm": "shift"}


def default_attention_impl(backend: str) -> str:
    """The "auto" choice for a jax backend name ("cpu", "gpu", "tpu", ...)."""
    return _DEFAULT_IMPL.get(backend, "shift")


def resolve_attention_impl(name: str) -> str:
    """The impl for `name`: "auto" -> the running backend's default, a known name -> itself."""
    if name == "auto":
        return default_attention_impl(jax.default_backend())
    relative_score_fn(name)
    return name


def relative_score_fn(impl: str) -> RelativeScoreFn:
    if impl == "auto":
        impl = default_attention_impl(jax.default_backend())
    try:
        return RELATIVE_SCORE_IMPLS[impl]
    except KeyError:
        raise ValueError(
            f"unknown attention impl {impl!r}; choose from auto, "
            f"{', '.join(sorted(RELATIVE_SCORE_IMPLS))}"
        ) from None


def attention_scale(head_dim: int, pos_att_type: Sequence[str]) -> np.float32:
    """sqrt(d * (1 + number of relative terms)), in float32 as HF computes it."""
    return np.sqrt(np.float32(head_dim * (1 + len(pos_att_type))))


def disentangled_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pos_key: jax.Array | None,
    pos_query: jax.Array | None,
    rel_pos: np.ndarray | jax.Array | None,
    mask: jax.Array | None,
    *,
    pos_att_type: Sequence[str],
    span: int,
    scale: float | None = None,
    impl: str = "gather",
    dropout_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Attention context [B, N, L, d] from q, k, v [B, N, L, d].

    pos_key / pos_query: projected relative embeddings [N, 2 * span, d], needed for "c2p" /
    "p2c" in `pos_att_type`. rel_pos: [L, L] relative positions (normally the static NumPy array
    from `build_relative_positions`). mask: bool, broadcastable to [B, N, L, L], True = attend.
    scale: defaults to sqrt(d * (1 + len(pos_att_type))). The softmax runs in float32 whatever the
    input dtype; `dropout_fn` is applied to the probabilities.
    """
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"self-attention needs equal query/key lengths, got {q.shape} {k.shape}")
    relative = relative_score_fn(impl)
    if scale is None:
        scale = attention_scale(q.shape[-1], pos_att_type)
    scale = jnp.asarray(scale, dtype=q.dtype)
    scores = jnp.einsum("bnid,bnjd->bnij", q, k / scale)

    rel_scores = None
    if pos_att_type:
        xp = np if isinstance(rel_pos, np.ndarray) else jnp
        if "c2p" in pos_att_type:
            c2p_index = xp.clip(rel_pos + span, 0, 2 * span - 1)
            rel_scores = relative(q, pos_key, c2p_index) / scale
        if "p2c" in pos_att_type:
            # Computed per key row j (as HF does), then transposed to [.., i, j].
            p2c_index = xp.clip(-rel_pos + span, 0, 2 * span - 1)
            p2c = jnp.swapaxes(relative(k, pos_query, p2c_index), -1, -2) / scale
            rel_scores = p2c if rel_scores is None else rel_scores + p2c
    if rel_scores is not None:
        scores = scores + rel_scores

    scores = scores.astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_fn is not None:
        probs = dropout_fn(probs)
    return jnp.einsum("bnij,bnjd->bnid", probs.astype(v.dtype), v)


class DisentangledSelfAttention(nnx.Module):
    """Projections + `disentangled_attention`; returns the context [B, L, heads * head_dim]."""

    def __init__(
        self,
        config: DebertaV2Config,
        *,
        rngs: nnx.Rngs,
        compute: Compute = DEFAULT_COMPUTE,
    ):
        relative_score_fn(compute.attention_impl)  # fail at construction on a bad name
        self.config = config
        self.dtype = dtype = compute.dtype
        self.impl = compute.attention_impl
        hidden, inner = config.hidden_size, config.num_attention_heads * config.head_dim
        proj = partial(dense, hidden, inner, ("embed", "heads"), config, rngs=rngs, dtype=dtype)
        self.query_proj = proj()
        self.key_proj = proj()
        self.value_proj = proj()
        separate = config.relative_attention and not config.share_att_key
        self.pos_key_proj = proj() if separate and "c2p" in config.pos_att_type else None
        self.pos_query_proj = proj() if separate and "p2c" in config.pos_att_type else None
        self.dropout = nnx.Dropout(config.attention_probs_dropout_prob)
        self.pos_dropout = nnx.Dropout(config.hidden_dropout_prob)

    def _split_heads(self, x: jax.Array) -> jax.Array:
        """[..., L, N * d] -> [..., N, L, d]."""
        x = x.reshape(*x.shape[:-1], self.config.num_attention_heads, self.config.head_dim)
        return jnp.moveaxis(x, -2, -3)

    def __call__(
        self,
        hidden: jax.Array,
        mask: jax.Array | None,
        rel_pos: np.ndarray | None,
        rel_embeddings: jax.Array | None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        c = self.config
        q = self._split_heads(self.query_proj(hidden))
        k = self._split_heads(self.key_proj(hidden))
        v = self._split_heads(self.value_proj(hidden))
        pos_key = pos_query = None
        pos_att_type = c.pos_att_type if c.relative_attention else ()
        if pos_att_type:
            rel = apply_dropout(self.pos_dropout, rel_embeddings, rngs)
            key_proj = self.key_proj if c.share_att_key else self.pos_key_proj
            query_proj = self.query_proj if c.share_att_key else self.pos_query_proj
            if "c2p" in pos_att_type:
                pos_key = self._split_heads(key_proj(rel))
            if "p2c" in pos_att_type:
                pos_query = self._split_heads(query_proj(rel))
        context = disentangled_attention(
            q,
            k,
            v,
            pos_key,
            pos_query,
            rel_pos,
            mask,
            pos_att_type=pos_att_type,
            span=c.relative_span,
            # HF counts pos_att_type in the scale even when relative attention is off.
            scale=attention_scale(c.head_dim, c.pos_att_type),
            impl=self.impl,
            dropout_fn=None if rngs is None else partial(apply_dropout, self.dropout, rngs=rngs),
        )
        context = jnp.moveaxis(context, -3, -2)
        return context.reshape(*context.shape[:-2], -1)
