"""Sequence-length phases (`train.phases`): which steps run at which length and batch size.

    train:
      steps: 500000
      phases:
        - {until_step: 450000, max_seq_length: 128, batch_size: 8192}
        - {until_step: 500000, max_seq_length: 512}   # batch_size: train.batch_size

Phase k runs the steps (until_step of phase k-1, until_step of phase k], 1-based like the
run's steps; the last phase ends at train.steps. A run without phases is one phase at
data.max_seq_length and train.batch_size. Every length is cut from the same prepared data
(data/phased.py), prepared at data.max_seq_length, so no phase may be longer than that.

The arithmetic lives here, once, for the loop (which loader, which compile, tokens seen) and
the loader (where in the token stream a phase starts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from debertina_jax.config.checks import ConfigError

if TYPE_CHECKING:
    from debertina_jax.config.run import Config


@dataclass(frozen=True)
class TrainPhase:
    """One item of train.phases, as written in the config."""

    until_step: int  # the phase's last step (1-based, inclusive)
    max_seq_length: int
    batch_size: int | None = None  # None: train.batch_size

    def __post_init__(self) -> None:
        if self.until_step < 1:
            raise ConfigError(f"until_step must be >= 1, got {self.until_step}")
        if self.max_seq_length < 8:
            raise ConfigError(f"max_seq_length must be >= 8, got {self.max_seq_length}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class Phase:
    """A phase with everything resolved: it runs steps first_step .. last_step (1-based)."""

    index: int
    first_step: int
    last_step: int
    max_seq_length: int
    batch_size: int

    @property
    def steps(self) -> int:
        return self.last_step - self.first_step + 1

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.max_seq_length


def sequence_phases(config: Config) -> tuple[Phase, ...]:
    """The run's phases in order (one when train.phases is empty)."""
    train = config.train
    if not train.phases:
        return (Phase(0, 1, train.steps, config.data.max_seq_length, train.batch_size),)
    phases, first = [], 1
    for index, item in enumerate(train.phases):
        batch = train.batch_size if item.batch_size is None else item.batch_size
        phases.append(Phase(index, first, item.until_step, item.max_seq_length, batch))
        first = item.until_step + 1
    return tuple(phases)


def phase_of_step(phases: tuple[Phase, ...], step: int) -> Phase:
    """The phase that runs `step` (1-based); steps past the end belong to the last phase."""
    for phase in phases:
        if step <= phase.last_step:
            return phase
    return phases[-1]


def tokens_seen(phases: tuple[Phase, ...], step: int) -> int:
    """Tokens (padded lines x length, as the step computes on) of steps 1..step."""
    total = 0
    for phase in phases:
        done = min(step, phase.last_step) - phase.first_step + 1
        if done <= 0:
            break
        total += done * phase.tokens_per_step
    return total


def check_phases(config: Config) -> None:
    """The rules of train.phases that involve other keys; each error names its keys."""
    train, data = config.train, config.data
    previous = 0
    for i, item in enumerate(train.phases):
        key = f"train.phases[{i}]"
        if item.until_step <= previous:
            raise ConfigError(
                f"{key}.until_step ({item.until_step}) must be larger than the previous phase's "
                f"({previous}): phases run in order"
            )
        previous = item.until_step
        if item.max_seq_length > data.max_seq_length:
            raise ConfigError(
                f"{key}.max_seq_length ({item.max_seq_length}) exceeds data.max_seq_length "
                f"({data.max_seq_length}): every phase is cut from data prepared at "
                "data.max_seq_length, so set that to the longest phase's length"
            )
        batch = train.batch_size if item.batch_size is None else item.batch_size
        if batch % config.optimizer.grad_accum_steps:
            raise ConfigError(
                f"{key}.batch_size ({batch}) must be a multiple of optimizer.grad_accum_steps "
                f"({config.optimizer.grad_accum_steps})"
            )
        if data.max_predictions is not None and data.max_predictions > item.max_seq_length:
            raise ConfigError(
                f"data.max_predictions ({data.max_predictions}) exceeds {key}.max_seq_length "
                f"({item.max_seq_length}); leave data.max_predictions out to get 15% per length"
            )
    if train.phases and previous != train.steps:
        raise ConfigError(
            f"the last of train.phases ends at until_step {previous}, but train.steps is "
            f"{train.steps}: the last phase must end at train.steps (change both together)"
        )


def phase_config(config: Config, phase: Phase) -> Config:
    """The run's config as one phase sees it: data.max_seq_length and train.batch_size are the
    phase's (and train.phases is empty), for what is computed per step shape (FLOPs,
    tokens/s)."""
    return dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, max_seq_length=phase.max_seq_length),
        train=dataclasses.replace(config.train, batch_size=phase.batch_size, phases=()),
    )
