"""The train state: built sharded on the mesh, optionally started from Hugging Face weights.

The train state is a plain pytree (a dict, what orbax saves and restores):
    {"step": int32 [], "params": nnx.State of the ElectraPair's Params, "opt_state": optax state}
plus, with train.ema_decay, "ema": the moving average of "params" (same tree, same shardings,
so it is saved and restored like them and `{**state, "params": state["ema"]}` evaluates it).
The model structure travels separately as an nnx GraphDef (`merge_pair(graphdef, state)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from debertina_jax.config import Config
from debertina_jax.hf.init import init_pair_from_hf
from debertina_jax.model.electra import ElectraPair
from debertina_jax.pretraining.optimizer import make_optimizer
from debertina_jax.pretraining.pair import build_pair
from debertina_jax.runtime.sharding import state_shardings

TrainState = dict[str, Any]


def abstract_train_state(
    config: Config, mesh: Mesh, rng_seed: int = 0
) -> tuple[nnx.GraphDef, TrainState, Callable[[], TrainState]]:
    """(graphdef, abstract state, init function) without allocating anything.

    The abstract state holds jax.ShapeDtypeStructs carrying their NamedShardings, the form
    orbax wants as a restore target. `init()` builds the real state; jit it with
    out_shardings (as `create_train_state` does) so it is created directly sharded.
    """
    tx = make_optimizer(config)
    graphdef = _graphdef(nnx.eval_shape(lambda: build_pair(config, rng_seed)))

    def init() -> TrainState:
        params = nnx.state(build_pair(config, rng_seed), nnx.Param)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
        if config.train.ema_decay is not None:
            state["ema"] = _copy(params)
        return state

    shapes = jax.eval_shape(init)
    shardings = state_shardings(shapes, mesh, config.mesh.rules)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    return graphdef, abstract, init


def create_train_state(
    config: Config, mesh: Mesh, rng_seed: int
) -> tuple[nnx.GraphDef, TrainState]:
    """Initialises the pair and the optimizer directly into their shardings on `mesh`, then
    loads config.init's Hugging Face weights, if any (hf/init.py)."""
    graphdef, abstract, init = abstract_train_state(config, mesh, rng_seed)
    state = jax.jit(init, out_shardings=shardings_of(abstract))()
    if config.init.discriminator_from_hf or config.init.generator_from_hf:
        state = init_state_from_hf(config, graphdef, state)
    return graphdef, state


def init_state_from_hf(config: Config, graphdef: nnx.GraphDef, state: TrainState) -> TrainState:
    """The train state with its parameters taken from config.init's HF directories (each
    keeping its dtype and sharding), the EMA (if any) starting from them too; the optimizer
    state is left as it is."""
    pair = merge_pair(graphdef, state)
    init_pair_from_hf(pair, config)
    params = nnx.state(pair, nnx.Param)
    if "ema" not in state:
        return {**state, "params": params}
    return {**state, "params": params, "ema": jax.jit(_copy)(params)}


def ema_decay_at(config: Config, step: jax.Array | int) -> jax.Array:
    """The EMA's decay for the update of train step `step` (0-based: the updates before it):
    min(train.ema_decay, (1 + step) / (10 + step)), the warm-up of TensorFlow's
    ExponentialMovingAverage, so that the average soon forgets the random initialisation
    (with a plain 0.999 it would still hold e^-1 of it after 1000 steps)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(config.train.ema_decay, (1.0 + step) / (10.0 + step))


def _copy(params: nnx.State) -> nnx.State:
    """A copy in its own buffers: the step donates the state, and the EMA must not alias the
    parameters it averages."""
    return jax.tree.map(jnp.copy, params)


def shardings_of(state: TrainState) -> Any:
    """The NamedSharding of every leaf (of a real or an abstract state)."""
    return jax.tree.map(lambda x: x.sharding, state)


def merge_pair(graphdef: nnx.GraphDef, state: TrainState) -> ElectraPair:
    """The ElectraPair module holding the parameters of a train state."""
    return nnx.merge(graphdef, state["params"])


def _graphdef(pair: ElectraPair) -> nnx.GraphDef:
    graphdef, _, rest = nnx.split(pair, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"the ElectraPair holds non-parameter state, which the step drops: {rest}")
    return graphdef
