"""The loss pieces against numbers worked out by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from debertina_jax.pretraining import losses


def test_mlm_loss_and_accuracy_by_hand():
    # Row 0: two real predictions; row 1: one real, one padding slot (weight 0).
    logits = jnp.array(
        [
            [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
            [[0.0, 0.0, 3.0], [50.0, -50.0, 0.0]],
        ]
    )
    labels = jnp.array([[0, 2], [1, 1]])
    weights = jnp.array([[1.0, 1.0], [1.0, 0.0]])

    def nll(row, label):
        return math.log(sum(math.exp(v) for v in row)) - row[label]

    expected = (nll([2, 0, 0], 0) + nll([0, 1, 0], 2) + nll([0, 0, 3], 1)) / 3
    assert float(losses.mlm_loss(logits, labels, weights)) == pytest.approx(expected, rel=1e-6)
    # Arg-max hits only the first prediction; the padding slot would be a miss but has weight 0.
    assert float(losses.mlm_accuracy(logits, labels, weights)) == pytest.approx(1 / 3)


def test_mlm_loss_of_empty_batch_is_zero_not_nan():
    logits = jnp.zeros((1, 2, 4))
    zero = jnp.zeros((1, 2))
    assert float(losses.mlm_loss(logits, zero.astype(jnp.int32), zero)) == 0.0
    assert float(losses.mlm_accuracy(logits, zero.astype(jnp.int32), zero)) == 0.0


def test_replace_positions_writes_only_real_slots():
    ids = jnp.array([[1, 10, 11, 12, 2], [1, 20, 21, 2, 0]])
    # Row 1's second slot is padding and points at 0 ([CLS]); it must not overwrite it.
    positions = jnp.array([[1, 3], [2, 0]])
    samples = jnp.array([[7, 8], [9, 99]])
    weights = jnp.array([[1.0, 1.0], [1.0, 0.0]])
    out = losses.replace_positions(ids, positions, samples, weights)
    np.testing.assert_array_equal(out, [[1, 7, 11, 8, 2], [1, 20, 9, 2, 0]])


def test_rtd_label_rule_sample_equal_to_original_is_original():
    original = jnp.array([[1, 10, 11, 12, 2]])
    # Positions 1 and 3 were masked; position 1's sample equals the original token.
    disc_ids = jnp.array([[1, 10, 11, 5, 2]])
    np.testing.assert_array_equal(losses.rtd_labels(disc_ids, original), [[0, 0, 0, 1, 0]])


def test_rtd_loss_by_hand_ignores_padding():
    logits = jnp.array([[0.0, 2.0, -1.0, 100.0]])
    labels = jnp.array([[0, 1, 1, 0]])
    mask = jnp.array([[1, 1, 1, 0]])  # the last token is padding: its huge logit must not count
    bce = [math.log(2.0), math.log1p(math.exp(-2.0)), math.log1p(math.exp(1.0))]
    assert float(losses.rtd_loss(logits, labels, mask)) == pytest.approx(sum(bce) / 3, rel=1e-6)


def test_rtd_loss_is_stable_for_large_logits():
    logits = jnp.array([[1000.0, -1000.0]])
    labels = jnp.array([[1, 0]])
    assert float(losses.rtd_loss(logits, labels, jnp.ones((1, 2)))) == pytest.approx(0.0, abs=1e-6)


def test_rtd_metrics_by_hand():
    # predicted replaced: positions 0, 1, 4 (logit > 0); actually replaced: 1, 2; 5 is padding.
    logits = jnp.array([[0.5, 3.0, -2.0, -1.0, 0.1, 9.0]])
    labels = jnp.array([[0, 1, 1, 0, 0, 1]])
    mask = jnp.array([[1, 1, 1, 1, 1, 0]])
    m = losses.rtd_metrics(logits, labels, mask)
    assert float(m["rtd_accuracy"]) == pytest.approx(2 / 5)  # positions 1 and 3 are right
    assert float(m["rtd_precision"]) == pytest.approx(1 / 3)
    assert float(m["rtd_recall"]) == pytest.approx(1 / 2)
    assert float(m["replaced_fraction"]) == pytest.approx(2 / 5)


def test_sampling_follows_the_tempered_softmax():
    logits = jnp.log(jnp.array([0.7, 0.2, 0.1]))
    tiled = jnp.broadcast_to(logits, (20000, 3))
    draws = losses.sample_replacements(jax.random.key(0), tiled, temperature=1.0)
    freq = np.bincount(np.asarray(draws), minlength=3) / draws.size
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.015)
    # A temperature of 2 flattens the distribution to softmax(log p / 2) ~ sqrt(p).
    draws = losses.sample_replacements(jax.random.key(1), tiled, temperature=2.0)
    freq = np.bincount(np.asarray(draws), minlength=3) / draws.size
    root = np.sqrt([0.7, 0.2, 0.1])
    np.testing.assert_allclose(freq, root / root.sum(), atol=0.015)


def test_total_loss_weights_rtd():
    assert float(losses.total_loss(jnp.array(2.0), jnp.array(0.5), 50.0)) == pytest.approx(27.0)
