"""Shared helpers for the model tests: tiny configs, random batches, non-trivial random weights."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from debertina_jax.config.model import DebertaV2Config
from debertina_jax.hf.convert import load_state_dict, model_to_state_dict


def tiny_config(**overrides) -> DebertaV2Config:
    """DeBERTa-v3 settings at toy size; 8 position buckets so test sequences exceed them."""
    settings = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        position_buckets=8,
    )
    settings.update(overrides)
    return DebertaV2Config.deberta_v3(**settings)


def padded_batch(
    vocab_size: int, lengths: list[int], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """int64 ids [B, max(lengths)] and a 0/1 mask with each row padded after its length."""
    rng = np.random.RandomState(seed)
    width = max(lengths)
    ids = rng.randint(4, vocab_size, size=(len(lengths), width)).astype(np.int64)
    mask = (np.arange(width)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    ids[:, 0] = 1  # [CLS]
    ids[mask == 0] = 0  # [PAD]
    return ids, mask


def perturb_torch(model, scale: float = 0.05, seed: int = 0) -> None:
    """Add noise to every parameter, so LayerNorm weights/biases are not 1/0 and a swapped or
    dropped tensor shows up in the outputs."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def perturb_nnx(model: nnx.Module, scale: float = 0.05, seed: int = 0) -> None:
    """The same for an NNX model (in place), through its HF-named state dict."""
    rng = np.random.RandomState(seed)
    state = model_to_state_dict(model)
    load_state_dict(
        model,
        {k: v + scale * rng.standard_normal(v.shape).astype(v.dtype) for k, v in state.items()},
    )


@nnx.jit
def forward(model: nnx.Module, input_ids, attention_mask, token_type_ids=None):
    return model(input_ids, attention_mask, token_type_ids)


def run(model: nnx.Module, ids: np.ndarray, mask: np.ndarray, token_type_ids=None) -> np.ndarray:
    tt = None if token_type_ids is None else jnp.asarray(token_type_ids)
    return np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask), tt))
