"""The generator/discriminator pair of a run: `build_pair(config)`, with the compute settings of
config.train.

Kept apart from the train state (state.py) so that reading a run back (export/) can build the
pair without the optimizer or the train step.
"""

from __future__ import annotations

from flax import nnx

from debertina_jax.config import Config
from debertina_jax.model.attention import resolve_attention_impl
from debertina_jax.model.compute import Compute
from debertina_jax.model.electra import ElectraPair


def compute_settings(config: Config) -> Compute:
    """The model's compute settings from config.train ("auto" attention resolved here)."""
    return Compute(
        dtype=config.train.dtype,
        scan_layers=config.train.scan_layers,
        remat=config.train.remat,
        attention_impl=resolve_attention_impl(config.train.attention_impl),
    )


def build_pair(config: Config, rng_seed: int) -> ElectraPair:
    """The generator/discriminator pair with the compute settings of `config.train`.

    Built with a "params" rng stream only, so it holds no rng state: dropout keys come from
    the train step's `rng` argument, and a resumed run replays exactly.
    """
    return ElectraPair(config, rngs=nnx.Rngs(params=rng_seed), compute=compute_settings(config))
