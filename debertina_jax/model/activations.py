"""Activation functions by the names Hugging Face configs use (`hidden_act`, `conv_act`, ...).

HF's "gelu" is the exact erf GELU; JAX's default is the tanh approximation, so the mapping
spells `approximate=` out for every GELU flavour.
"""

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

from debertina_jax.config.model import ACTIVATIONS as ACTIVATION_NAMES

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_python": partial(jax.nn.gelu, approximate=False),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu_fast": partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "linear": lambda x: x,
}
# The config accepts exactly the names implemented here.
assert set(ACTIVATIONS) == set(ACTIVATION_NAMES), set(ACTIVATIONS) ^ set(ACTIVATION_NAMES)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation called `name` in HF configs; ValueError naming the choices otherwise."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}"
        ) from None
