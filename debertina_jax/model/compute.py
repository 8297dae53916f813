"""How a model computes, kept apart from what it is (the HF config).

One frozen `Compute` goes to every module instead of four keywords threaded by hand:

- dtype: the compute dtype of matmuls and activations. Parameters stay float32 (master weights);
  softmax and LayerNorm run in float32 whatever this is (see blocks.apply_norm, attention).
- scan_layers: stack the encoder layers and run them with jax.lax.scan (compile time flat in
  depth); the parameters then carry a leading "layers" axis.
- remat: "none" | "full" | "dots", the jax.checkpoint policy around each layer.
- attention_impl: how disentangled attention looks up relative scores ("gather", "onehot",
  "shift", or "auto" for the backend's default; see attention.py). All give the same numbers.

None of these changes a parameter's value, so checkpoints and HF exports do not depend on them
(scan_layers only changes how the layer parameters are stacked).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

REMAT_CHOICES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class Compute:
    """Compute settings shared by all modules of a model (hashable: NNX keeps it as static data)."""

    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"
    attention_impl: str = "gather"

    def __post_init__(self) -> None:
        # np.dtype is hashable and compares equal across spellings (jnp.bfloat16, "bfloat16").
        object.__setattr__(self, "dtype", np.dtype(jnp.dtype(self.dtype)))
        if self.remat not in REMAT_CHOICES:
            raise ValueError(f"remat must be one of {', '.join(REMAT_CHOICES)}, got {self.remat!r}")

    def replace(self, **changes: Any) -> Compute:
        return dataclasses.replace(self, **changes)


# float32, plain layers, no remat, HF's gather attention: the numerics of HF's PyTorch model.
DEFAULT_COMPUTE = Compute()
