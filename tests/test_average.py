"""Checkpoint averaging at export (`convert_to_pt.py --average-last K`): the written tensors are
the mean of the checkpoints' tensors, verified and loadable like one checkpoint's."""

import numpy as np
import pytest

from debertina_jax.export.checkpoint import load_checkpoint
from debertina_jax.export.export import export
from debertina_jax.export.weights import WeightsError
from debertina_jax.hf.convert import model_to_state_dict
from debertina_jax.hf.files import read_hf_weights


def test_average_of_the_last_two_checkpoints(tiny_run_dir, tmp_path):
    # tiny_run_dir keeps the checkpoints of steps 10 and 20.
    result = export(tiny_run_dir, tmp_path / "avg", average_last=2)
    assert result.checks and all(c.passed for c in result.checks)  # read back by transformers
    described = "the uniform average of the raw weights of the 2 checkpoints of steps 10, 20"
    assert result.weights == described
    for name in ("discriminator", "generator"):
        runs = [load_checkpoint(tiny_run_dir, step).model(name) for step in (10, 20)]
        first, second = (model_to_state_dict(m) for m in runs)
        written = read_hf_weights(tmp_path / "avg" / name)
        assert set(first) <= set(written)
        moved = 0
        for key in first:
            mean = (first[key].astype(np.float64) + second[key]) / 2
            np.testing.assert_allclose(written[key], mean, rtol=1e-6, atol=1e-7, err_msg=key)
            moved += not np.array_equal(first[key], second[key])
        assert moved > len(first) // 2  # the two checkpoints differ: a real average

    from transformers import DebertaV2ForMaskedLM, DebertaV2Model

    assert DebertaV2Model.from_pretrained(tmp_path / "avg" / "discriminator") is not None
    assert DebertaV2ForMaskedLM.from_pretrained(tmp_path / "avg" / "generator") is not None


def test_averaging_or_ema_that_the_run_cannot_give_is_refused(tiny_run_dir):
    with pytest.raises(WeightsError, match=r"--average-last 3: .* keeps only 2 checkpoint"):
        load_checkpoint(tiny_run_dir, average_last=3)
    with pytest.raises(WeightsError, match="has no EMA weights: the run had train.ema_decay off"):
        load_checkpoint(tiny_run_dir, weights="ema")
    one = load_checkpoint(tiny_run_dir, step=10, average_last=1)
    assert one.weights == "the raw weights of step 10"
