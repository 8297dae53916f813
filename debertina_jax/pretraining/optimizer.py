"""AdamW with global-norm clipping and a learning-rate schedule: warmup, then linear (the
official recipe), cosine or warmup-stable-decay.

Weight decay follows the official DeBERTa code (`create_xoptimizer`): every parameter decays
except those named like a bias or a LayerNorm weight. In particular the GDES residual table
E_delta (the discriminator's own word table under GDES, see electra.py) IS decayed, as
Microsoft's `_weight` parameter is: decay pulls the discriminator's effective table
stop_gradient(E_G) + E_delta towards the generator's.

One optimizer or two (`optimizer.decoupled`). One: a single AdamW over both models with one
global-norm clip, so a large RTD gradient (weighted by train.rtd_weight) shrinks the
generator's update too. Decoupled, as the official DeBERTa-v3 code trains (its
`decoupled_training`, on by default there): the generator's parameters (with the EMD) and the
discriminator's (with E_delta) each have their own AdamW state, clip, learning rate and weight
decay. The gradients are the same either way: the generator's parameters get only the MLM
loss's gradient and the discriminator's only the RTD loss's (GDES stops the RTD gradient at
E_G, and sampling is not differentiable). Under `es` sharing the one shared table gets both
and belongs to the generator, whose parameter it is in the official code.

Gradient accumulation does not live here: the train step splits its global batch into
`optimizer.grad_accum_steps` micro-batches and sums their gradients before one update, so a
"step" always means one optimizer update on `train.batch_size` sequences (see step.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from debertina_jax.config import Config, OptimizerConfig

# Parameter leaf names that never decay: Linear/LayerNorm biases, the MLM output bias and
# LayerNorm scales (flax names the LayerNorm weight `scale`).
NO_DECAY_NAMES = ("bias", "scale")

# The two parameter groups of a decoupled optimizer, by the top-level module of the pair.
GROUPS = ("generator", "discriminator")
_GROUP_OF_MODULE = {
    "generator": "generator",
    "enhanced_mask_decoder": "generator",
    "discriminator": "discriminator",
}


def learning_rate_schedule(
    opt: OptimizerConfig, total_steps: int, peak: float | None = None
) -> optax.Schedule:
    """0 -> peak (default: learning_rate) over warmup_steps, then to end_learning_rate at
    total_steps by `opt.schedule`; end_learning_rate from there on.

    linear: straight down from the end of warmup. cosine: half a cosine from the end of
    warmup. wsd: the peak until the last wsd_decay_fraction of total_steps (never before the
    end of warmup), then down by wsd_decay_shape (linear, cosine, or 1-sqrt: 1 - sqrt(t) of
    the decay's progress t). A wsd run continued with a larger total_steps from a step before
    its decay therefore goes on at the peak: only the decay moves.
    """
    peak = opt.learning_rate if peak is None else peak
    end = opt.end_learning_rate
    warmup = max(0, min(opt.warmup_steps, total_steps))
    if opt.schedule == "wsd":
        decay_steps = max(1, round(opt.wsd_decay_fraction * total_steps))
        decay_start, shape = max(warmup, total_steps - decay_steps), opt.wsd_decay_shape
    else:
        decay_start, shape = warmup, opt.schedule

    def schedule(count: jax.Array | int) -> jax.Array:
        step = jnp.asarray(count, jnp.float32)
        rise = peak * step / max(warmup, 1)
        t = jnp.clip((step - decay_start) / max(total_steps - decay_start, 1), 0.0, 1.0)
        if shape == "linear":
            fall = 1.0 - t
        elif shape == "cosine":
            fall = 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        else:  # 1-sqrt
            fall = 1.0 - jnp.sqrt(t)
        after = end + (peak - end) * fall
        return jnp.where(step < warmup, rise, after)

    return schedule


def decay_start_step(config: Config) -> int | None:
    """Under wsd, the last step at the peak learning rate (1-based, as the loop counts): the
    checkpoint to continue a run from with a larger train.steps. None for other schedules."""
    opt, total = config.optimizer, config.train.steps
    if opt.schedule != "wsd":
        return None
    warmup = max(0, min(opt.warmup_steps, total))
    return max(warmup, total - max(1, round(opt.wsd_decay_fraction * total)))


def learning_rate_at(config: Config, step: int, group: str = "generator") -> float:
    """The learning rate the update numbered `step` (0-based) uses; for logging."""
    peak = _group_settings(config.optimizer, group)[0]
    return float(learning_rate_schedule(config.optimizer, config.train.steps, peak)(step))


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


def _is_variable(node: Any) -> bool:
    return isinstance(node, nnx.Variable)


def parameter_groups(config: Config) -> Callable[[Any], Any]:
    """A function of the pair's parameters (or gradients) -> the tree of their group names,
    "generator" or "discriminator", one per nnx.Variable: optax.partition then masks whole
    Variables, so the optimizer state holds no Variable without a value (which the state's
    shardings, read per Variable, could not lay out)."""
    shared = config.generator.embedding_sharing == "es"

    def group(path: tuple[Any, ...], _: Any) -> str:
        names = _path_names(path)
        if names[0] not in _GROUP_OF_MODULE:
            raise ValueError(f"parameter {'/'.join(names)} belongs to neither model of the pair")
        # Under ES the shared tables sit in the discriminator's tree (nnx lists a shared
        # variable once, under the first path it finds) but are the generator's.
        if shared and names[:3] == ["discriminator", "deberta", "embeddings"]:
            if names[3] in ("word_embeddings", "position_embeddings"):
                return "generator"
        return _GROUP_OF_MODULE[names[0]]

    return lambda tree: jax.tree_util.tree_map_with_path(group, tree, is_leaf=_is_variable)


def group_norms(config: Config, grads: Any) -> dict[str, jax.Array]:
    """The global norm of each group's gradients (what each decoupled clip sees)."""
    labels = jax.tree.leaves(parameter_groups(config)(grads))
    squares = {name: jnp.zeros((), jnp.float32) for name in GROUPS}
    for label, node in zip(labels, jax.tree.leaves(grads, is_leaf=_is_variable), strict=True):
        for leaf in jax.tree.leaves(node):
            squares[label] = squares[label] + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    return {name: jnp.sqrt(total) for name, total in squares.items()}


def _group_settings(opt: OptimizerConfig, group: str) -> tuple[float, float, float]:
    """(learning rate, weight decay, clip norm) of one group: the discriminator's own keys
    when set, the shared ones otherwise."""
    shared = (opt.learning_rate, opt.weight_decay, opt.clip_norm)
    if group == "generator" or not opt.decoupled:
        return shared
    own = (
        opt.discriminator_learning_rate,
        opt.discriminator_weight_decay,
        opt.discriminator_clip_norm,
    )
    return tuple(s if o is None else o for o, s in zip(own, shared, strict=True))


def _clipped_adamw(config: Config, group: str) -> optax.GradientTransformation:
    """clip_by_global_norm (0: none) -> AdamW(schedule, masked decay) with `group`'s settings.

    The learning rate is injected into the optimizer state (`hyperparams["learning_rate"]`),
    so the value an update really used can be logged even when updates are skipped.
    """
    opt = config.optimizer
    peak, weight_decay, clip_norm = _group_settings(opt, group)
    adamw: Callable[..., optax.GradientTransformation] = optax.inject_hyperparams(
        optax.adamw, static_args=("mask",)
    )
    parts = []
    if clip_norm > 0:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(
        adamw(
            learning_rate=learning_rate_schedule(opt, config.train.steps, peak),
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=weight_decay,
            mask=weight_decay_mask,
        )
    )
    return optax.chain(*parts)


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """The pretraining optimizer of `config`: one clipped AdamW over the whole pair, or, with
    optimizer.decoupled, one per model (optax.partition by `parameter_groups`); inside a
    partition each clip sees only its own group's gradients."""
    if not config.optimizer.decoupled:
        return _clipped_adamw(config, "generator")
    return optax.partition(
        {group: _clipped_adamw(config, group) for group in GROUPS}, parameter_groups(config)
    )


def current_learning_rates(opt_state: Any) -> dict[str, jax.Array]:
    """The learning rates the last update used, by group ("learning_rate" for the only or
    the generator's optimizer, "discriminator_learning_rate" for the decoupled
    discriminator's), read from a state built by make_optimizer."""
    inner = getattr(opt_state, "inner_states", None)
    if inner is None:
        return {"learning_rate": current_learning_rate(opt_state)}
    return {
        "learning_rate": current_learning_rate(inner["generator"]),
        "discriminator_learning_rate": current_learning_rate(inner["discriminator"]),
    }


def current_learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate the last update used, read from a state built by make_optimizer
    (the generator's, when decoupled)."""

    def injected(node: Any) -> bool:
        return isinstance(getattr(node, "hyperparams", None), dict)

    for node in jax.tree.leaves(opt_state, is_leaf=injected):
        if injected(node):
            return node.hyperparams["learning_rate"]
    raise ValueError("optimizer state has no injected learning rate (not from make_optimizer?)")
