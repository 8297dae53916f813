"""The learning-rate schedules (optimizer.schedule: linear | cosine | wsd) at chosen steps, what
extending train.steps does to each, and the config checks of the new optimizer keys."""

import math
from pathlib import Path

import numpy as np
import pytest

from debertina_jax.config import Config, ConfigError, OptimizerConfig, TrainConfig, load_config
from debertina_jax.pretraining import optimizer

PEAK, END, WARMUP, TOTAL = 1e-3, 1e-4, 10, 110
TINY_YAML = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _config(steps=TOTAL, **opt) -> Config:
    opt = {"learning_rate": PEAK, "end_learning_rate": END, "warmup_steps": WARMUP, **opt}
    return Config(optimizer=OptimizerConfig(**opt), train=TrainConfig(steps=steps))


def _at(config: Config, steps) -> list[float]:
    return [optimizer.learning_rate_at(config, s) for s in steps]


def test_linear_values():
    # warmup 0 -> peak over 10 updates, then straight down to END at update 110, then flat.
    got = _at(_config(schedule="linear"), [0, 5, 10, 60, 85, 110, 200])
    want = [0.0, 5e-4, PEAK, 5.5e-4, END + 0.25 * (PEAK - END), END, END]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


def test_cosine_values():
    got = _at(_config(schedule="cosine"), [5, 10, 35, 60, 85, 110, 200])
    half_cos = [0.5 * (1 + math.cos(math.pi * t)) for t in (0.25, 0.5, 0.75)]
    want = [5e-4, PEAK] + [END + (PEAK - END) * c for c in half_cos] + [END, END]
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize(
    "shape, fall_at_half",
    [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))],
)
def test_wsd_values(shape, fall_at_half):
    # 20% of 110 updates = 22 decay updates: the peak from update 10 to 88, then down to END.
    config = _config(schedule="wsd", wsd_decay_fraction=0.2, wsd_decay_shape=shape)
    got = _at(config, [5, 10, 50, 88, 99, 110, 150])
    want = [5e-4, PEAK, PEAK, PEAK, END + (PEAK - END) * fall_at_half, END, END]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert optimizer.decay_start_step(config) == 88


def test_wsd_extended_run_continues_at_the_peak():
    # Resumed from a checkpoint before the decay with train.steps 110 -> 220: every update the
    # shorter run made is the same, and the next ones stay at the peak until the new decay.
    short = _config(schedule="wsd", wsd_decay_fraction=0.2)
    long = _config(steps=220, schedule="wsd", wsd_decay_fraction=0.2)
    np.testing.assert_allclose(_at(long, range(89)), _at(short, range(89)), rtol=1e-7)
    assert _at(long, [89, 120, 176]) == pytest.approx([PEAK] * 3)
    assert optimizer.decay_start_step(long) == 176
    assert optimizer.decay_start_step(_config(schedule="linear")) is None


def test_linear_extended_run_jumps_up():
    # Under linear the whole decay is re-stretched: resuming at update 60 with twice the steps
    # continues at a higher rate than the shorter run had reached (what the README says).
    short, long = _config(schedule="linear"), _config(steps=220, schedule="linear")
    assert optimizer.learning_rate_at(short, 60) == pytest.approx(5.5e-4)
    assert optimizer.learning_rate_at(long, 60) == pytest.approx(END + (PEAK - END) * 160 / 210)


def test_discriminator_learning_rate_has_its_own_peak_on_the_same_schedule():
    config = _config(schedule="cosine", decoupled=True, discriminator_learning_rate=2e-3)
    disc = [optimizer.learning_rate_at(config, s, "discriminator") for s in (5, 10, 60, 110)]
    np.testing.assert_allclose(disc, [1e-3, 2e-3, END + (2e-3 - END) * 0.5, END], rtol=1e-5)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.schedule=step", "optimizer.schedule must be one of linear, cosine, wsd"),
        ("optimizer.wsd_decay_shape=exp", "optimizer.wsd_decay_shape must be one of"),
        ("optimizer.wsd_decay_fraction=0", "optimizer.wsd_decay_fraction must be in (0, 1]"),
        ("optimizer.decoupled=false optimizer.discriminator_clip_norm=2",
         "needs optimizer.decoupled: true"),
        ("optimizer.discriminator_learning_rate=-1", "discriminator_learning_rate must be >= 0"),
        ("train.ema_decay=1.0", "train.ema_decay must be in (0, 1)"),
    ],
)
def test_bad_recipe_keys_are_refused_by_name(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(TINY_YAML, override.split())
    assert message in str(error.value)
