"""AdamW with global-norm clipping and a linear warmup / linear decay schedule (official recipe).

Weight decay follows the official DeBERTa code (`create_xoptimizer`): every parameter decays
except those named like a bias or a LayerNorm weight. In particular the GDES residual table
E_delta (the discriminator's own word table under GDES, see electra.py) IS decayed, as
Microsoft's `_weight` parameter is: decay pulls the discriminator's effective table
stop_gradient(E_G) + E_delta towards the generator's.

Gradient accumulation does not live here: the train step splits its global batch into
`optimizer.grad_accum_steps` micro-batches and sums their gradients before one update, so a
"step" always means one optimizer update on `train.batch_size` sequences (see train_step.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from debertina_jax.config import Config, OptimizerConfig

# Parameter leaf names that never decay: Linear/LayerNorm biases, the MLM output bias and
# LayerNorm scales (flax names the LayerNorm weight `scale`).
NO_DECAY_NAMES = ("bias", "scale")


def learning_rate_schedule(opt: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """0 -> learning_rate over warmup_steps, then linearly to end_learning_rate at total_steps."""
    warmup = max(0, min(opt.warmup_steps, total_steps))
    decay = optax.linear_schedule(
        init_value=opt.learning_rate,
        end_value=opt.end_learning_rate,
        transition_steps=max(1, total_steps - warmup),
    )
    if warmup == 0:
        return decay
    rise = optax.linear_schedule(0.0, opt.learning_rate, transition_steps=warmup)
    return optax.join_schedules([rise, decay], boundaries=[warmup])


def learning_rate_at(config: Config, step: int) -> float:
    """The learning rate the update numbered `step` (0-based) uses; for logging."""
    return float(learning_rate_schedule(config.optimizer, config.train.steps)(step))


def _path_names(path: tuple[Any, ...]) -> list[str]:
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
    # nnx.Variable leaves end in `.value`; the parameter's own name is the one before it.
    return [n for n in names if n != "value"]


def weight_decay_mask(params: Any) -> Any:
    """A pytree of bools like `params`: True where weight decay applies."""

    def decays(path: tuple[Any, ...], _: Any) -> bool:
        names = _path_names(path)
        return not names or names[-1] not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule, masked decay), hyperparameters from the config.

    The learning rate is injected into the optimizer state (`hyperparams["learning_rate"]`),
    so the value an update really used can be logged even when updates are skipped.
    """
    opt = config.optimizer
    schedule = learning_rate_schedule(opt, config.train.steps)
    adamw: Callable[..., optax.GradientTransformation] = optax.inject_hyperparams(
        optax.adamw, static_args=("mask",)
    )
    parts = []
    if opt.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt.clip_norm))
    parts.append(
        adamw(
            learning_rate=schedule,
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=weight_decay_mask,
        )
    )
    return optax.chain(*parts)


def current_learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate the last update used, read from a state built by make_optimizer."""

    def injected(node: Any) -> bool:
        return isinstance(getattr(node, "hyperparams", None), dict)

    for node in jax.tree.leaves(opt_state, is_leaf=injected):
        if injected(node):
            return node.hyperparams["learning_rate"]
    raise ValueError("optimizer state has no injected learning rate (not from make_optimizer?)")
