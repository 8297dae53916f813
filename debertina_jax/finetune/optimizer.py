"""AdamW for fine-tuning: global-norm clipping, linear warmup then linear decay, weight decay off
biases and LayerNorm scales (the pretraining rules, reused), and layer-wise learning-rate decay.

Layer-wise decay multiplies each parameter's update by layer_decay ** depth, where depth counts
down from the head: the head (pooler, classifier) 0, the top encoder layer 1, ..., the bottom
layer N, and N + 1 for everything below the layers (embeddings, and the relative position table
with its LayerNorm, which every layer reads). Scaling the whole AdamW update scales its weight
decay too, as a per-group learning rate does in torch's AdamW.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from debertina_jax.config import OptimizerConfig
from debertina_jax.finetune.settings import OptimizerSettings
from debertina_jax.pretraining.optimizer import learning_rate_schedule, weight_decay_mask


def warmup_steps(settings: OptimizerSettings, total_steps: int) -> int:
    if settings.warmup_steps is not None:
        return settings.warmup_steps
    return int(round(settings.warmup_ratio * total_steps))


def schedule(settings: OptimizerSettings, total_steps: int) -> optax.Schedule:
    """0 -> learning_rate over the warmup, then linearly to end_learning_rate at total_steps
    (the same curve as HF's get_linear_schedule_with_warmup)."""
    shape = OptimizerConfig(
        learning_rate=settings.learning_rate,
        warmup_steps=warmup_steps(settings, total_steps),
        end_learning_rate=settings.end_learning_rate,
    )
    return learning_rate_schedule(shape, total_steps)


def _names(path: tuple[Any, ...]) -> list[str]:
    """The names along a pytree path (dict keys, attributes, list indices as strings)."""
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
    return [n for n in names if n != "value"]  # nnx.Variable's own leaf


def layer_depths(params: Any, num_layers: int) -> Any:
    """A pytree like `params`: each leaf's depth from the head (see the module doc) as an int,
    or, for scanned layers (a leading layer axis), an int array [N, 1, ...]."""

    def depth(path: tuple[Any, ...], leaf: Any) -> Any:
        names = _names(path)
        if names[0] != "deberta":
            return 0
        if "layers" not in names:
            return num_layers + 1
        after = names[names.index("layers") + 1]
        if after.isdigit():
            return num_layers - int(after)
        shape = (num_layers,) + (1,) * (len(leaf.shape) - 1)
        return (num_layers - np.arange(num_layers)).reshape(shape)

    return jax.tree_util.tree_map_with_path(depth, params)


def scale_by_layer(
    params: Any, num_layers: int, layer_decay: float
) -> optax.GradientTransformation:
    """Multiplies each update by layer_decay ** depth (identity when layer_decay is 1)."""
    factors = jax.tree.map(
        lambda d: jnp.asarray(layer_decay ** np.asarray(d, np.float64), jnp.float32),
        layer_depths(params, num_layers),
    )

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, f: u * f.astype(u.dtype), updates, factors), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(
    settings: OptimizerSettings, params: Any, num_layers: int, total_steps: int
) -> optax.GradientTransformation:
    parts = []
    if settings.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(settings.clip_norm))
    parts.append(
        optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
            learning_rate=schedule(settings, total_steps),
            b1=settings.b1,
            b2=settings.b2,
            eps=settings.eps,
            weight_decay=settings.weight_decay,
            mask=weight_decay_mask,
        )
    )
    if settings.layer_decay != 1.0:
        parts.append(scale_by_layer(params, num_layers, settings.layer_decay))
    return optax.chain(*parts)
