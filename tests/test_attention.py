"""Relative positions and the pure disentangled-attention function."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from deberta_testing import padded_batch, run, tiny_config
from flax import nnx
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf_deberta

from debertina_jax.model.attention import (
    RELATIVE_SCORE_IMPLS,
    attention_scale,
    disentangled_attention,
)
from debertina_jax.model.models import DebertaV2ForMaskedLM
from debertina_jax.model.relative_position import build_relative_positions, log_bucket_positions

# (position_buckets, max_relative_positions): v3's (256, 512) and other plausible settings.
BUCKET_SETTINGS = [(256, 512), (128, 512), (64, 128), (256, 1024), (512, 2048), (8, 64), (16, 64)]


@pytest.mark.parametrize("buckets,max_position", BUCKET_SETTINGS)
def test_log_buckets_equal_hf(buckets, max_position):
    rel = np.arange(-5000, 5001)
    ours = log_bucket_positions(rel, buckets, max_position)
    hf = hf_deberta.make_log_bucket_position(torch.tensor(rel), buckets, max_position)
    np.testing.assert_array_equal(ours, hf.long().numpy())


@pytest.mark.parametrize(
    "q_len,k_len,buckets,max_position",
    [(300, 300, 256, 512), (7, 12, 8, 64), (12, 7, 8, 64), (20, 20, -1, -1), (20, 20, 0, 64)],
)
def test_relative_position_matrix_equals_hf(q_len, k_len, buckets, max_position):
    ours = build_relative_positions(q_len, k_len, buckets, max_position)
    hf = hf_deberta.build_relative_position(
        torch.zeros(q_len, 1), torch.zeros(k_len, 1), bucket_size=buckets, max_position=max_position
    )[0].numpy()
    assert ours.shape == (q_len, k_len) and ours.dtype == np.int32
    np.testing.assert_array_equal(ours, hf)


def _random_inputs(dtype=jnp.float32, batch=2, heads=3, length=11, dim=4, span=4, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q, k, v = (jax.random.normal(keys[i], (batch, heads, length, dim), dtype) for i in range(3))
    pos_key = jax.random.normal(keys[3], (heads, 2 * span, dim), dtype)
    pos_query = jax.random.normal(keys[4], (heads, 2 * span, dim), dtype)
    rel_pos = build_relative_positions(length, length, span, 16)
    lengths = np.array([length, length - 4])[:batch]
    token = np.arange(length)[None] < lengths[:, None]
    mask = jnp.asarray(token[:, None, :, None] & token[:, None, None, :])
    return q, k, v, pos_key, pos_query, rel_pos, mask, span


def _loop_reference(q, k, v, pos_key, pos_query, rel_pos, mask, span, pos_att_type):
    """The docstring's formula, one (i, j) at a time in float64."""
    q, k, v, pk, pq = (np.asarray(x, np.float64) for x in (q, k, v, pos_key, pos_query))
    b_, n_, length, d = q.shape
    scale = np.sqrt(d * (1 + len(pos_att_type)))
    scores = np.empty((b_, n_, length, length))
    for b, n, i, j in itertools.product(range(b_), range(n_), range(length), range(length)):
        s = q[b, n, i] @ k[b, n, j]
        if "c2p" in pos_att_type:
            s += q[b, n, i] @ pk[n, np.clip(rel_pos[i, j] + span, 0, 2 * span - 1)]
        if "p2c" in pos_att_type:
            s += k[b, n, j] @ pq[n, np.clip(-rel_pos[j, i] + span, 0, 2 * span - 1)]
        scores[b, n, i, j] = s / scale if mask[b, 0, i, j] else -1e30
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    return np.einsum("bnij,bnjd->bnid", probs, v)


@pytest.mark.parametrize("pos_att_type", [("p2c", "c2p"), ("c2p",), ("p2c",), ()])
def test_matches_loop_reference(pos_att_type):
    q, k, v, pk, pq, rel_pos, mask, span = _random_inputs()
    out = disentangled_attention(
        q, k, v, pk, pq, rel_pos, mask, pos_att_type=pos_att_type, span=span
    )
    ref = _loop_reference(q, k, v, pk, pq, rel_pos, np.asarray(mask), span, pos_att_type)
    token = np.asarray(mask)[:, 0].any(-1)  # fully padded query rows are not compared
    np.testing.assert_allclose(
        np.asarray(out).transpose(0, 2, 1, 3)[token], ref.transpose(0, 2, 1, 3)[token], atol=1e-5
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("pos_att_type", [("p2c", "c2p"), ("c2p",), ("p2c",)])
def test_gather_and_onehot_are_identical(dtype, pos_att_type):
    args = _random_inputs(dtype)
    span = args[-1]
    outs = {
        impl: disentangled_attention(*args[:-1], pos_att_type=pos_att_type, span=span, impl=impl)
        for impl in RELATIVE_SCORE_IMPLS
    }
    assert outs["gather"].dtype == dtype
    np.testing.assert_array_equal(
        np.asarray(outs["gather"], np.float32), np.asarray(outs["onehot"], np.float32)
    )


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="unknown attention impl 'skew'"):
        disentangled_attention(*_random_inputs()[:-1], pos_att_type=("c2p",), span=4, impl="skew")


def test_scale_counts_relative_terms():
    assert attention_scale(64, ("p2c", "c2p")) == np.float32(np.sqrt(192))
    assert attention_scale(64, ()) == np.float32(8.0)


def _auto_mesh():
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.parametrize("impl", list(RELATIVE_SCORE_IMPLS))
def test_attention_jit_on_8_device_mesh_with_batch_sharded(impl):
    q, k, v, pk, pq, rel_pos, _, span = _random_inputs(batch=8)
    token = np.arange(q.shape[2])[None] < np.arange(3, 11)[:, None]
    mask = jnp.asarray(token[:, None, :, None] & token[:, None, None, :])
    expected = disentangled_attention(
        q, k, v, pk, pq, rel_pos, mask, pos_att_type=("p2c", "c2p"), span=span, impl=impl
    )
    mesh = _auto_mesh()
    batch = jax.sharding.NamedSharding(mesh, jax.P("data"))
    fn = jax.jit(
        lambda q, k, v, pk, pq, m: disentangled_attention(
            q, k, v, pk, pq, rel_pos, m, pos_att_type=("p2c", "c2p"), span=span, impl=impl
        ),
        in_shardings=(batch, batch, batch, None, None, batch),
        out_shardings=batch,
    )
    with jax.set_mesh(mesh):
        out = fn(
            *(jax.device_put(x, batch) for x in (q, k, v)), pk, pq, jax.device_put(mask, batch)
        )
    assert out.sharding.spec == jax.P("data")
    assert len(out.addressable_shards) == 8
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-6)


def test_model_jit_on_8_device_mesh_with_batch_sharded():
    config = tiny_config()
    model = DebertaV2ForMaskedLM(config, rngs=nnx.Rngs(0))
    ids, mask = padded_batch(config.vocab_size, [40, 33, 20, 12, 9, 40, 2, 17])
    expected = run(model, ids, mask)
    mesh = _auto_mesh()
    batch = jax.sharding.NamedSharding(mesh, jax.P("data"))
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    with jax.set_mesh(mesh):
        out = logits(state, jax.device_put(ids, batch), jax.device_put(mask, batch))
    assert out.sharding.spec[0] == "data"
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
