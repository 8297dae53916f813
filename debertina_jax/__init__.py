"""debertina-jax: DeBERTa-v3 pretraining (RTD + GDES) in JAX/Flax NNX, exported to Hugging Face."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so that `import debertina_jax.config` (the CLI's first step) does not load JAX.
    if name == "load_checkpoint":
        from debertina_jax.export.checkpoint import load_checkpoint

        return load_checkpoint
    raise AttributeError(f"module 'debertina_jax' has no attribute {name!r}")
