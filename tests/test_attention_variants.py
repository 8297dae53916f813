"""Every relative-score formulation equals an independent float64 reference, exactly, forward and
backward; the attention agrees across impls and a model built on each matches HF's PyTorch model.

Inputs are small integers stored as floats: every product and partial sum is then an exactly
representable integer, so the comparison can be bit-for-bit whatever order a matmul sums in.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from deberta_testing import padded_batch, perturb_torch, run, tiny_config
from flax import nnx
from tolerances import parity_tolerance

from debertina_jax.hf.convert import load_state_dict
from debertina_jax.model.attention import (
    RELATIVE_SCORE_IMPLS,
    default_attention_impl,
    disentangled_attention,
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


def reference_scores(content, pos, index) -> np.ndarray:
    """scores[b, n, i, j] = content[b, n, i] . pos[n, index[i, j]], in float64 with numpy."""
    table = np.asarray(pos, np.float64)[:, np.asarray(index)]  # [N, Lq, Lk, d]
    return np.einsum("bnid,nijd->bnij", np.asarray(content, np.float64), table)


def reference_score_grads(content, pos, index, cotangent) -> tuple[np.ndarray, np.ndarray]:
    """d(sum(cotangent * scores)) / d(content, pos), in float64: the lookup's scatter-add."""
    index, cot = np.asarray(index), np.asarray(cotangent, np.float64)
    table = np.asarray(pos, np.float64)[:, index]
    d_content = np.einsum("bnij,nijd->bnid", cot, table)
    per_entry = np.einsum("bnij,bnid->nijd", cot, np.asarray(content, np.float64))
    d_pos = np.zeros(np.shape(pos))
    for n in range(d_pos.shape[0]):
        np.add.at(d_pos[n], index, per_entry[n])
    return d_content, d_pos


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("query_len,key_len,buckets,max_position,span", SHAPES)
def test_relative_scores_equal_the_float64_reference(
    impl, query_len, key_len, buckets, max_position, span
):
    rel = build_relative_positions(query_len, key_len, buckets, max_position)
    content = integers(0, (2, 3, query_len, 8))
    pos = integers(1, (3, 2 * span, 8))
    fn = RELATIVE_SCORE_IMPLS[impl]
    cotangent = integers(2, (2, 3, query_len, key_len))
    for index in (np.clip(rel + span, 0, 2 * span - 1), np.clip(-rel + span, 0, 2 * span - 1)):
        out, vjp = jax.vjp(partial(fn, index=index), content, pos)
        assert out.dtype == jnp.float32
        # Integer-valued float32 sums are exact, so float64 and float32 agree bit for bit.
        np.testing.assert_array_equal(np.asarray(out), reference_scores(content, pos, index))
        expected = reference_score_grads(content, pos, index, cotangent)
        for grad, ref in zip(vjp(cotangent), expected, strict=True):
            np.testing.assert_array_equal(np.asarray(grad), ref)


def test_index_that_does_not_depend_on_i_minus_j_falls_back_to_the_gather():
    # The enhanced mask decoder tiles the relative positions of L tokens over 2L.
    index = np.tile(np.clip(build_relative_positions(6, 6, 8, 64) + 8, 0, 15), (2, 2))
    assert relative_by_distance(index) is None
    content, pos = integers(0, (2, 3, 12, 8)), integers(1, (3, 16, 8))
    for impl in IMPLS:
        out = RELATIVE_SCORE_IMPLS[impl](content, pos, index)
        np.testing.assert_array_equal(out, reference_scores(content, pos, index))


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
def test_model_output_matches_hf_with_every_impl(impl, hf_model_output):
    config, weights, ids, mask, expected = hf_model_output
    model = DebertaV2Model(config, rngs=nnx.Rngs(0), compute=Compute(attention_impl=impl))
    load_state_dict(model, weights)
    valid = mask.astype(bool)
    diff = float(np.abs(run(model, ids, mask)[valid] - expected[valid]).max())
    print(f"\nparity | attention impl {impl} | max abs diff {diff:.2e}")
    assert diff <= parity_tolerance(f"attention impl {impl}")


@pytest.fixture(scope="module")
def hf_model_output():
    """HF's DebertaV2Model (perturbed random weights) on a padded batch: the config, its
    weights by HF name, the batch and HF's outputs."""
    config = tiny_config()  # 8 buckets: the 40-token rows reach the log-bucketed distances
    torch.manual_seed(0)
    hf = transformers.DebertaV2Model(transformers.DebertaV2Config.from_dict(config.to_dict()))
    hf.eval()
    perturb_torch(hf)
    ids, mask = padded_batch(config.vocab_size, [40, 25, 9])
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))[0].numpy()
    weights = {k: v.numpy() for k, v in hf.state_dict().items()}
    return config, weights, ids, mask, expected


def test_auto_picks_a_known_impl_per_backend():
    for backend in ("cpu", "gpu", "tpu", "something-new"):
        assert default_attention_impl(backend) in RELATIVE_SCORE_IMPLS
    assert resolve_attention_impl("auto") == default_attention_impl(jax.default_backend())
    assert resolve_attention_impl("onehot") == "onehot"
    with pytest.raises(ValueError, match="unknown attention impl 'skew'"):
        resolve_attention_impl("skew")
