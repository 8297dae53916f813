"""Masking: official counts, never special tokens, strategies, fixed-size predictions, jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from debertina_jax.model.blocks import gather_positions
from debertina_jax.pretraining.masking import default_max_predictions, mask_tokens

PAD, CLS, SEP, UNK, MASK = 0, 1, 2, 3, 4
VOCAB = 1000
SPECIAL = (CLS, SEP, UNK)
STATIC = ("strategy", "vocab_size", "mask_prob", "max_predictions")
eager = functools.partial(mask_tokens, mask_id=MASK, pad_id=PAD, special_ids=SPECIAL)
mask = jax.jit(eager, static_argnames=STATIC)  # one compile per setting; much faster than eager


def _batch(batch=256, length=64, seed=0):
    """[CLS] tokens [SEP] pad..., of random lengths, with some [UNK] inside."""
    rng = np.random.default_rng(seed)
    ids = np.full((batch, length), PAD, np.int32)
    for row, n in enumerate(rng.integers(3, length + 1, size=batch)):
        body = rng.integers(5, VOCAB, size=n - 2)
        body[rng.random(n - 2) < 0.05] = UNK
        ids[row, :n] = [CLS, *body, SEP]
    ids[0] = PAD  # an all-padding row
    ids[1] = PAD
    ids[1, :3] = [CLS, UNK, SEP]  # a row with nothing to mask
    return jnp.asarray(ids)


@pytest.fixture(scope="module")
def ids():
    return _batch()


def _expected_counts(ids, max_predictions=None):
    ids = np.asarray(ids)
    n = (ids != PAD).sum(1)
    maskable = (~np.isin(ids, (PAD, MASK, *SPECIAL))).sum(1)
    official = np.array([max(1, round(0.15 * k)) if k else 0 for k in n])
    cap = ids.shape[1] if max_predictions is None else max_predictions
    return np.minimum(np.minimum(official, maskable), cap)


def test_counts_and_rate_follow_the_official_rule(ids):
    out = mask(jax.random.key(0), ids)
    counts = np.asarray(out.is_masked).sum(1)
    np.testing.assert_array_equal(counts, _expected_counts(ids))
    assert counts[0] == counts[1] == 0
    rate = counts.sum() / (np.asarray(ids) != PAD).sum()
    assert abs(rate - 0.15) < 0.01
    full_line = jnp.asarray([[CLS, *range(5, 515), SEP]], jnp.int32)
    assert int(mask(jax.random.key(0), full_line).is_masked.sum()) == 77  # round(0.15 * 512)


def test_mask_strategy_never_touches_special_tokens_or_padding(ids):
    out = mask(jax.random.key(1), ids)
    masked = np.asarray(out.is_masked)
    original = np.asarray(ids)
    assert not masked[np.isin(original, (PAD, *SPECIAL))].any()
    np.testing.assert_array_equal(out.labels, original)
    np.testing.assert_array_equal(np.asarray(out.input_ids)[masked], MASK)
    np.testing.assert_array_equal(np.asarray(out.input_ids)[~masked], original[~masked])
    assert out.positions is None and out.weights is None


def test_positions_are_spread_over_the_whole_line():
    # Unlike the official window scheme, the last tokens of a long line get masked too.
    line = jnp.tile(jnp.asarray([[CLS, *range(5, 515), SEP]], jnp.int32), (64, 1))
    per_position = np.asarray(mask(jax.random.key(2), line).is_masked).mean(0)
    assert per_position[-50:-1].mean() > 0.1 and per_position[1:50].mean() > 0.1


def test_same_key_same_result_other_key_other_result(ids):
    a, b = mask(jax.random.key(3), ids), mask(jax.random.key(3), ids)
    c = mask(jax.random.key(4), ids)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert (np.asarray(a.is_masked) != np.asarray(c.is_masked)).any()


def test_bert_strategy_proportions():
    ids = _batch(batch=1024, seed=1)
    out = mask(jax.random.key(5), ids, strategy="bert", vocab_size=VOCAB)
    masked = np.asarray(out.is_masked)
    original, corrupted = np.asarray(ids)[masked], np.asarray(out.input_ids)[masked]
    is_mask = corrupted == MASK
    kept = corrupted == original
    randomised = ~is_mask & ~kept
    assert masked.sum() > 5000
    assert abs(is_mask.mean() - 0.8) < 0.03
    assert abs(kept.mean() - 0.1) < 0.03  # includes the 1/996 random draws of the same id
    assert abs(randomised.mean() - 0.1) < 0.03
    random_ids = corrupted[randomised]
    assert not np.isin(random_ids, (PAD, MASK, *SPECIAL)).any() and random_ids.max() < VOCAB
    np.testing.assert_array_equal(np.asarray(out.input_ids)[~masked], np.asarray(ids)[~masked])


def test_bert_random_tokens_cover_exactly_the_regular_ids():
    # Every token selected, tiny vocabulary with [MASK] inside it: draws must skip 0-4.
    ids = jnp.full((512, 8), 7, jnp.int32)
    out = mask(jax.random.key(6), ids, strategy="bert", vocab_size=10, mask_prob=0.99)
    corrupted = np.asarray(out.input_ids)[np.asarray(out.is_masked)]
    drawn = set(corrupted[corrupted != MASK].tolist())
    assert drawn == {5, 6, 7, 8, 9}


@pytest.mark.parametrize("max_predictions", [4, 16])
def test_max_predictions_lists_every_masked_token(ids, max_predictions):
    out = mask(jax.random.key(7), ids, max_predictions=max_predictions)
    positions, weights = np.asarray(out.positions), np.asarray(out.weights)
    masked = np.asarray(out.is_masked)
    assert positions.shape == weights.shape == (ids.shape[0], max_predictions)
    assert positions.dtype == np.int32 and weights.dtype == np.float32
    counts = _expected_counts(ids, max_predictions)
    np.testing.assert_array_equal(weights.sum(1), counts)
    np.testing.assert_array_equal(masked.sum(1), counts)  # nothing masked beyond the slots
    for row in range(ids.shape[0]):
        used = positions[row, : counts[row]]
        assert (np.diff(used) > 0).all() and (positions[row, counts[row] :] == 0).all()
        np.testing.assert_array_equal(np.flatnonzero(masked[row]), used)
        assert (weights[row, : counts[row]] == 1).all()
    labels = np.asarray(gather_positions(out.labels, out.positions))
    np.testing.assert_array_equal(labels[weights == 1], np.asarray(ids)[masked])


def test_a_large_enough_cap_changes_nothing(ids):
    free = mask(jax.random.key(8), ids)
    capped = mask(jax.random.key(8), ids, max_predictions=16)
    assert _expected_counts(ids).max() <= 16
    np.testing.assert_array_equal(free.input_ids, capped.input_ids)


def test_default_max_predictions_covers_a_full_line():
    assert default_max_predictions(512) == 80
    assert default_max_predictions(128) == 24
    for length in (8, 16, 100, 128, 512):
        assert default_max_predictions(length) >= max(1, round(0.15 * length))


def test_gather_positions_keeps_trailing_axes():
    x = jnp.arange(2 * 5 * 3).reshape(2, 5, 3)
    positions = jnp.asarray([[4, 0], [1, 1]], jnp.int32)
    out = gather_positions(x, positions)
    np.testing.assert_array_equal(out, np.asarray(x)[[[0, 0], [1, 1]], [[4, 0], [1, 1]]])


def test_works_under_jit(ids):
    kwargs = dict(strategy="bert", vocab_size=VOCAB, max_predictions=16)
    jitted = jax.jit(lambda key, x: eager(key, x, **kwargs))(jax.random.key(9), ids)
    expected = eager(jax.random.key(9), ids, **kwargs)
    for a, b in zip(jitted, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_arguments(ids):
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="strategy must be one of"):
        mask(key, ids, strategy="span")
    with pytest.raises(ValueError, match="needs vocab_size"):
        mask(key, ids, strategy="bert")
    with pytest.raises(ValueError, match="mask_prob"):
        mask(key, ids, mask_prob=1.5)
    with pytest.raises(ValueError, match="max_predictions must be in"):
        mask(key, ids, max_predictions=0)
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        mask(key, ids[0])
    with pytest.raises(ValueError, match="no regular token"):
        mask(key, ids, strategy="bert", vocab_size=4)


def test_batch_sharded_inputs_need_no_communication(ids):
    # Masking runs inside the data-parallel train step: each device must mask its own rows.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = jax.device_put(ids, rows)
    kwargs = dict(strategy="bert", vocab_size=VOCAB, max_predictions=16)
    step = jax.jit(lambda key, x: gather_positions(x, eager(key, x, **kwargs).positions))
    hlo = step.lower(jax.random.key(0), sharded).compile().as_text()
    for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
        assert collective not in hlo
    assert step(jax.random.key(0), sharded).sharding.spec == rows.spec
