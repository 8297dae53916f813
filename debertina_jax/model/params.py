"""A module's parameters by path, and writing host arrays into them.

Paths are those of `nnx.to_flat_state(nnx.state(module, nnx.Param))`: tuples such as
("deberta", "encoder", "layers", 0, "intermediate", "kernel"). `set_params` is the one way
weights are written into a model from outside (HF checkpoints, continued pretraining, the
generator/discriminator pair's import): each parameter keeps its dtype and sharding, and each
device receives only its own slice (jax.make_array_from_callback), so no process ever needs a
whole parameter on one device and the same code works on one CPU and on a pod.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

ParamPath = tuple  # a path in nnx.to_flat_state


def params_by_path(module: nnx.Module) -> dict[ParamPath, nnx.Variable]:
    """The module's nnx.Param variables (real or abstract) by path."""
    return dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))


def host_params(module: nnx.Module) -> dict[ParamPath, np.ndarray]:
    """Copies of the module's parameters as host NumPy arrays, by path (every parameter must be
    addressable from this process, as on one host)."""
    return {path: np.asarray(param[...]) for path, param in params_by_path(module).items()}


def set_params(module: nnx.Module, values: dict[ParamPath, np.ndarray]) -> None:
    """Writes host arrays into the module's parameters of the same paths, each keeping its dtype
    and sharding; parameters not in `values` keep theirs. A path the module does not have, or a
    shape that differs, is a ValueError raised before anything is written."""
    params = params_by_path(module)
    wrong = []
    for path, value in values.items():
        name = ".".join(map(str, path))
        if path not in params:
            wrong.append(f"{name} is not a parameter of the model")
        elif np.shape(value) != tuple(params[path].shape):
            wrong.append(f"{name}: given {np.shape(value)}, model {tuple(params[path].shape)}")
    if wrong:
        raise ValueError(f"{type(module).__name__}: cannot set its parameters: {'; '.join(wrong)}")
    for path, value in values.items():
        _put(params[path], value)


def _put(param: nnx.Variable, value: np.ndarray) -> None:
    old = param[...]
    host = np.asarray(value, old.dtype)
    param[...] = jax.make_array_from_callback(host.shape, old.sharding, lambda index: host[index])
