"""One seed of fine-tuning: epochs of shuffled batches, evaluation on the validation split every
`eval_every` steps (default: each epoch), the best parameters kept, early stopping after
`patience` evaluations without improvement, then the test split scored with the best parameters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from debertina_jax.finetune.batching import train_batches
from debertina_jax.finetune.encoding import Encoded
from debertina_jax.finetune.evaluation import predict_logits, predictions, score
from debertina_jax.finetune.examples import Examples
from debertina_jax.finetune.logbook import Logbook
from debertina_jax.finetune.metrics import is_better


@dataclass
class Plan:
    """Everything a seed's training needs that does not change between seeds."""

    train_step: Any
    predict: Any
    task_type: str
    label_names: list[str]
    metric: str
    train: Encoded
    validation: Encoded
    validation_examples: Examples
    test: Encoded | None
    test_examples: Examples | None
    batch_size: int
    eval_batch_size: int
    max_length: int
    pad_id: int
    epochs: int
    total_steps: int
    steps_per_epoch: int
    eval_every: int
    patience: int
    log_every: int


@dataclass
class SeedResult:
    seed: int
    best_step: int
    steps: int
    stopped_early: bool
    validation: dict[str, float]
    test: dict[str, float] | None
    train_seconds: float
    train_examples_per_second: float | None
    params: Any = field(repr=False)  # the best parameters, on the device mesh

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "best_step": self.best_step,
            "steps": self.steps,
            "stopped_early": self.stopped_early,
            "validation": self.validation,
            "test": self.test,
            "train_seconds": round(self.train_seconds, 3),
            "train_examples_per_second": self.train_examples_per_second,
        }


def evaluate(plan: Plan, params: Any, data: Encoded, examples: Examples):
    logits = predict_logits(
        plan.predict, params, data, plan.eval_batch_size, plan.max_length, plan.pad_id
    )
    predicted = predictions(logits, data, plan.task_type, plan.label_names)
    return score(predicted, examples, plan.task_type), logits


class Throughput:
    """Training examples per second, over the steps whose batch shape has run before (a new
    shape's step compiles: it is left out) and without evaluation."""

    def __init__(self) -> None:
        self.examples, self.seconds, self.started = 0.0, 0.0, None
        self.shapes: set[tuple[int, ...]] = set()

    def timed(self, state: Any, batch: dict) -> bool:
        """Call before a step: whether it counts. Before one that compiles, the clock stops."""
        shape = batch["input_ids"].shape
        if shape in self.shapes:
            if self.started is None:
                self.started = time.perf_counter()
            return True
        self.pause(state)
        self.shapes.add(shape)
        return False

    def done(self, state: Any, batch: dict, timed: bool) -> None:
        """Call after the step."""
        if timed:
            self.examples += float(batch["weights"].sum())
        else:
            jax.block_until_ready(state)  # the compiling step ends before the clock restarts

    def pause(self, state: Any) -> None:
        if self.started is not None:
            jax.block_until_ready(state)
            self.seconds += time.perf_counter() - self.started
            self.started = None

    @property
    def rate(self) -> float | None:
        return round(self.examples / self.seconds, 3) if self.seconds > 0 else None


# One compiled copy for the whole tree (op by op, each parameter shape would compile its own).
_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def train_seed(plan: Plan, state: dict, seed: int, logbook: Logbook) -> SeedResult:
    logbook.start_seed(seed, plan.total_steps)
    step, best, best_step, best_params, bad = 0, None, 0, None, 0
    best_metrics: dict[str, float] = {}
    stopped = False
    clock = Throughput()
    # rbg keys: dropout masks from XLA's RngBitGenerator compile in half the time of
    # threefry's on CPU, and run faster on TPU; fine-tuning needs no bit-exact replay.
    key = jax.random.key(seed, impl="rbg")
    for epoch in range(plan.epochs):
        for batch in train_batches(
            plan.train, plan.batch_size, plan.max_length, plan.pad_id, seed, epoch
        ):
            timed = clock.timed(state, batch)
            state, metrics = plan.train_step(state, batch, jax.random.fold_in(key, step))
            clock.done(state, batch, timed)
            step += 1
            done = step >= plan.total_steps
            if step % plan.log_every == 0 or done:
                values = logbook.log("train", step, step / plan.steps_per_epoch, metrics)
                logbook.advance(step, values.get("loss"))
            if step % plan.eval_every == 0 or done:
                clock.pause(state)
                scores, _ = evaluate(
                    plan, state["params"], plan.validation, plan.validation_examples
                )
                logbook.log("validation", step, step / plan.steps_per_epoch, scores)
                if is_better(plan.metric, scores[plan.metric], best):
                    best, best_step, best_metrics, bad = scores[plan.metric], step, scores, 0
                    # The state is donated to the next step: keep a copy of the best parameters.
                    best_params = _copy(state["params"])
                else:
                    bad += 1
                    stopped = plan.patience > 0 and bad >= plan.patience and not done
            if done or stopped:
                break
        if step >= plan.total_steps or stopped:
            break
    if best_params is None:  # the metric was never defined (e.g. a constant prediction)
        best_params, best_step = state["params"], step
        best_metrics, _ = evaluate(plan, best_params, plan.validation, plan.validation_examples)
    test_metrics = None
    if plan.test is not None:
        test_metrics, _ = evaluate(plan, best_params, plan.test, plan.test_examples)
        logbook.log("test", best_step, best_step / plan.steps_per_epoch, test_metrics)
    logbook.end_seed()
    return SeedResult(
        seed=seed,
        best_step=best_step,
        steps=step,
        stopped_early=stopped,
        validation=best_metrics,
        test=test_metrics,
        train_seconds=clock.seconds,
        train_examples_per_second=clock.rate,
        params=best_params,
    )
