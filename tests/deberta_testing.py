"""Shared test helpers that are not fixtures (the fixtures are in conftest.py).

Tiny model configs, random batches and non-trivial random weights for the model tests; the
overrides of configs/tiny.yaml that the pretraining and export tests train with.
"""


import jax.numpy as jnp
import numpy as np
from flax import nnx
from process_testing import REPO

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


# ---- runs: configs/tiny.yaml made smaller, so that a run compiles and steps in seconds ----------
TINY_YAML = REPO / "configs" / "tiny.yaml"

# The data and batch settings every test run shares: a 400-piece vocabulary, 64-token lines.
SMALL_RUN = [
    "data.vocab_size=400",
    "data.max_seq_length=64",
    "data.eval_lines=16",
    "train.batch_size=8",
    "train.eval_batches=1",
    "optimizer.warmup_steps=2",
]

# The run the export tests read back (conftest.tiny_run_dir): 20 steps of a 2-layer model with a
# 1-layer generator, sharded over mesh data 2 x fsdp 2 x tensor 2, checkpoints at steps 10 and 20.
TINY_RUN = SMALL_RUN + [
    "model.num_hidden_layers=2",
    "generator.num_hidden_layers=1",
    "data.prepare_workers=1",
    "train.steps=20",
    "train.log_every_steps=5",
    "train.eval_every_steps=20",
    "checkpoint.every_steps=10",
    "mesh.data=2",
    "mesh.fsdp=2",
    "mesh.tensor=2",
]

# A run short enough to start, stop and resume several times in one test (tests/test_pretrain.py,
# tests/test_reliability.py): SMALL_RUN's data (with conftest.small_run_overrides' paths), a
# 1-layer discriminator and generator, 8 steps with checkpoints 2, 4, 6 and 8, every step logged,
# no evaluation (one program less to compile).
SHORT_RUN = [
    "model.num_hidden_layers=1",
    "generator.num_hidden_layers=1",
    "train.steps=8",
    "train.log_every_steps=1",
    "train.eval_every_steps=1000",
    "train.eval_batches=0",
    "checkpoint.every_steps=2",
    "checkpoint.keep=4",
]
