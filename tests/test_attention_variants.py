"""Every relative-score formulation equals the take_along_axis reference, exactly, forward and
backward; the attention and a model built on each agree to float32 rounding.

Inputs are small integers stored as floats: every product and partial sum is then an exactly
representable integer, so the comparison can be bit-for-bit whatever order a matmul sums in.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from deberta_testing import padded_batch, run, tiny_config
from flax import nnx

from debertina_jax.model.attention import (
    RELATIVE_SCORE_IMPLS,
    default_attention_impl,
    disentangled_attention,
    gather_relative_scores,
    relative_by_distance,
    resolve_attention_impl,
)
from debertina_jax.model.compute import Compute
from debertina_jax.model.models import DebertaV2Model
from debertina_jax.model.relative_position import build_relative_positions

IMPLS = sorted(RELATIVE_SCORE_IMPLS)

# (query_len, key_len, position_buckets, max_position, span): v3's buckets at a length inside the
# linear range and beyond it, lengths above the bucket count, no buckets with clipping (span <
# length), rectangular shapes and a single token.
SHAPES = [
    (24, 24, 256, 512, 256),
    (300, 300, 256, 512, 256),
    (40, 40, 8, 64, 8),
    (13, 13, -1, -1, 4),
    (7, 12, 8, 64, 8),
    (12, 7, 8, 64, 8),
    (1, 1, 8, 64, 8),
]


def integers(key: int, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    return jnp.asarray(np.random.default_rng(key).integers(-3, 4, shape), dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("query_len,key_len,buckets,max_position,span", SHAPES)
def test_relative_scores_equal_the_gather(impl, query_len, key_len, buckets, max_position, span):
    rel = build_relative_positions(query_len, key_len, buckets, max_position)
    content = integers(0, (2, 3, query_len, 8))
    pos = integers(1, (3, 2 * span, 8))
    fn = RELATIVE_SCORE_IMPLS[impl]
    cotangent = integers(2, (2, 3, query_len, key_len))
    for index in (np.clip(rel + span, 0, 2 * span - 1), np.clip(-rel + span, 0, 2 * span - 1)):
        expected, expected_vjp = jax.vjp(partial(gather_relative_scores, index=index), content, pos)
        out, vjp = jax.vjp(partial(fn, index=index), content, pos)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
        for grad, ref in zip(vjp(cotangent), expected_vjp(cotangent), strict=True):
            np.testing.assert_array_equal(np.asarray(grad), np.asarray(ref))


def test_index_that_does_not_depend_on_i_minus_j_falls_back_to_the_gather():
    # The enhanced mask decoder tiles the relative positions of L tokens over 2L.
    index = np.tile(np.clip(build_relative_positions(6, 6, 8, 64) + 8, 0, 15), (2, 2))
    assert relative_by_distance(index) is None
    content, pos = integers(0, (2, 3, 12, 8)), integers(1, (3, 16, 8))
    for impl in IMPLS:
        out = RELATIVE_SCORE_IMPLS[impl](content, pos, index)
        np.testing.assert_array_equal(out, gather_relative_scores(content, pos, index))


def attention_inputs(length=40, span=8, batch=2, heads=3, dim=8):
    q, k, v = (integers(i, (batch, heads, length, dim)) for i in range(3))
    pos_key, pos_query = integers(3, (heads, 2 * span, dim)), integers(4, (heads, 2 * span, dim))
    rel_pos = build_relative_positions(length, length, span, 64)
    token = np.arange(length)[None] < np.array([length, length - 9])[:, None]  # row 1 padded
    mask = jnp.asarray(token[:, None, :, None] & token[:, None, None, :])
    return (q, k, v, pos_key, pos_query, rel_pos, mask), span


@pytest.mark.parametrize("pos_att_type", [("p2c", "c2p"), ("c2p",), ("p2c",)])
def test_attention_and_its_gradients_equal_across_impls(pos_att_type):
    args, span = attention_inputs()

    def loss(impl):
        def f(q, k, v, pos_key, pos_query):
            out = disentangled_attention(
                q,
                k,
                v,
                pos_key,
                pos_query,
                *args[5:],
                pos_att_type=pos_att_type,
                span=span,
                impl=impl,
            )
            return jnp.sum(out * jnp.cos(out)), out  # a non-uniform cotangent

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))

    (_, reference), ref_grads = loss("gather")(*args[:5])
    for impl in IMPLS:
        (_, out), grads = loss(impl)(*args[:5])
        # Scores are bit-equal (above); XLA may fuse the scale and softmax differently per impl.
        np.testing.assert_allclose(np.asarray(out), np.asarray(reference), rtol=1e-5, atol=1e-6)
        for g, r in zip(grads, ref_grads, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_model_output_is_the_same_with_every_impl(impl, gather_model_output):
    config, ids, mask, expected = gather_model_output
    model = DebertaV2Model(config, rngs=nnx.Rngs(0), compute=Compute(attention_impl=impl))
    np.testing.assert_allclose(run(model, ids, mask), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def gather_model_output():
    config = tiny_config()  # 8 buckets: the 40-token rows reach the log-bucketed distances
    ids, mask = padded_batch(config.vocab_size, [40, 25, 9])
    model = DebertaV2Model(config, rngs=nnx.Rngs(0), compute=Compute(attention_impl="gather"))
    return config, ids, mask, run(model, ids, mask)


def test_auto_picks_a_known_impl_per_backend():
    for backend in ("cpu", "gpu", "tpu", "something-new"):
        assert default_attention_impl(backend) in RELATIVE_SCORE_IMPLS
    assert resolve_attention_impl("auto") == default_attention_impl(jax.default_backend())
    assert resolve_attention_impl("onehot") == "onehot"
    with pytest.raises(ValueError, match="unknown attention impl 'skew'"):
        resolve_attention_impl("skew")
