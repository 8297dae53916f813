"""Parity with HF transformers' PyTorch DeBERTa-v2 on random weights.

Each case builds the HF model from a config, perturbs every weight (so LayerNorms are not 1/0),
saves it with save_pretrained, loads it with `from_hf` and compares outputs on a padded batch at
the non-padded positions: max abs diff within tolerances.py's measured bound per case (float32).
Run with `pytest -s` to see the diffs.
"""

import numpy as np
import pytest
import torch
import transformers
from deberta_testing import padded_batch, perturb_nnx, perturb_torch, run, tiny_config
from flax import nnx
from tolerances import parity_tolerance

from debertina_jax.config.model import DebertaV2Config
from debertina_jax.hf.convert import from_hf, load_state_dict, model_to_state_dict
from debertina_jax.model.compute import Compute
from debertina_jax.model.models import DebertaV2ForReplacedTokenDetection, DebertaV2Model

# Rows padded to different lengths; the longest exceed the 8 position buckets of tiny_config.
LENGTHS = [40, 31, 6]

XSMALL_SHAPE = DebertaV2Config.deberta_v3(
    vocab_size=300,
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    intermediate_size=1536,
)

CASES = {
    "v3 tiny": (tiny_config(), "DebertaV2Model", LENGTHS),
    # Real v3 shape and buckets (256): rows longer than 256 use the log buckets.
    "v3 xsmall shape (vocab 300)": (XSMALL_SHAPE, "DebertaV2Model", [272, 40]),
    "share_att_key false": (tiny_config(share_att_key=False), "DebertaV2Model", LENGTHS),
    "c2p only": (tiny_config(pos_att_type="c2p"), "DebertaV2Model", LENGTHS),
    "p2c only": (tiny_config(pos_att_type=["p2c"]), "DebertaV2Model", LENGTHS),
    "c2p only, separate pos_key_proj": (
        tiny_config(pos_att_type="c2p", share_att_key=False),
        "DebertaV2Model",
        LENGTHS,
    ),
    "p2c only, separate pos_query_proj": (
        tiny_config(pos_att_type="p2c", share_att_key=False),
        "DebertaV2Model",
        LENGTHS,
    ),
    "norm_rel_ebd none": (tiny_config(norm_rel_ebd="none"), "DebertaV2Model", LENGTHS),
    "abs positions + 2 token types + embedding_size 24 (MLM legacy)": (
        tiny_config(position_biased_input=True, type_vocab_size=2, embedding_size=24),
        "DebertaV2ForMaskedLM",
        LENGTHS,
    ),
    "position_buckets 0, max_relative_positions 64": (
        tiny_config(position_buckets=0, max_relative_positions=64, max_position_embeddings=128),
        "DebertaV2Model",
        [90, 70, 5],
    ),
    "no relative attention (BERT-like)": (
        tiny_config(relative_attention=False, position_biased_input=True),
        "DebertaV2Model",
        LENGTHS,
    ),
    "conv k3 gelu": (tiny_config(conv_kernel_size=3, conv_act="gelu"), "DebertaV2Model", LENGTHS),
    "conv k5 groups 4 tanh": (
        tiny_config(conv_kernel_size=5, conv_groups=4, conv_act="tanh"),
        "DebertaV2Model",
        LENGTHS,
    ),
    "MaskedLM legacy (cls.predictions)": (tiny_config(), "DebertaV2ForMaskedLM", LENGTHS),
    "MaskedLM lm_predictions (legacy false)": (
        tiny_config(legacy=False),
        "DebertaV2ForMaskedLM",
        LENGTHS,
    ),
    "SequenceClassification (3 labels)": (
        tiny_config(label_names=("a", "b", "c")),
        "DebertaV2ForSequenceClassification",
        LENGTHS,
    ),
    "TokenClassification (5 labels)": (
        tiny_config(label_names=tuple("abcde")),
        "DebertaV2ForTokenClassification",
        LENGTHS,
    ),
}


def _valid(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-token outputs at non-padded positions; pooled outputs unchanged."""
    return x[mask.astype(bool)] if x.ndim >= 3 or x.shape == mask.shape else x


def _report(name: str, diff: float) -> None:
    print(f"\nparity | {name} | max abs diff {diff:.2e}")


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_hf(name, tmp_path):
    config, architecture, lengths = CASES[name]
    torch.manual_seed(0)
    hf = getattr(transformers, architecture)(
        transformers.DebertaV2Config.from_dict(config.to_dict())
    )
    hf.eval()
    perturb_torch(hf)
    hf.save_pretrained(tmp_path)

    ours = from_hf(tmp_path)
    assert type(ours).__name__ == architecture

    ids, mask = padded_batch(config.vocab_size, lengths)
    token_types = None
    if config.type_vocab_size > 0:
        token_types = np.random.RandomState(1).randint(0, config.type_vocab_size, ids.shape)
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=None if token_types is None else torch.tensor(token_types),
        )[0].numpy()
    out = run(ours, ids, mask, token_types)
    assert out.shape == ref.shape
    diff = float(np.abs(_valid(out, mask) - _valid(ref, mask)).max())
    _report(name, diff)
    assert diff <= parity_tolerance(name)


class TorchRTDHead(torch.nn.Module):
    """Hand-written reference of the official recipe's RTD head."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.LayerNorm = torch.nn.LayerNorm(hidden, eps)
        self.dense = torch.nn.Linear(hidden, hidden)
        self.classifier = torch.nn.Linear(hidden, 1)

    def forward(self, h):
        h = self.LayerNorm(h + h[:, :1])
        return self.classifier(torch.nn.functional.gelu(self.dense(h))).squeeze(-1)


def test_rtd_head_matches_torch_reference():
    config = tiny_config()
    torch.manual_seed(0)
    backbone = transformers.DebertaV2Model(transformers.DebertaV2Config.from_dict(config.to_dict()))
    head = TorchRTDHead(config.hidden_size, config.layer_norm_eps)
    backbone.eval()
    perturb_torch(backbone, seed=1)
    perturb_torch(head, seed=2)
    state = {f"deberta.{k}": v.numpy() for k, v in backbone.state_dict().items()}
    state |= {f"mask_predictions.{k}": v.detach().numpy() for k, v in head.state_dict().items()}

    ours = DebertaV2ForReplacedTokenDetection(config, rngs=nnx.Rngs(0))
    load_state_dict(ours, state)
    ids, mask = padded_batch(config.vocab_size, LENGTHS)
    with torch.no_grad():
        hidden = backbone(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))[0]
        ref = head(hidden).numpy()
    out = run(ours, ids, mask)
    assert out.shape == ids.shape
    diff = float(np.abs(out - ref)[mask.astype(bool)].max())
    _report("RTD head vs torch reference", diff)
    assert diff <= parity_tolerance("RTD head vs torch reference")


# bfloat16 compute (float32 softmax/LayerNorm) against float32, same weights: LayerNorm-ed hidden
# states are O(1); bfloat16 keeps ~3 significant digits, and the error grows with depth.
BF16_MAX_ABS = 0.1
BF16_MEAN_ABS = 0.015


def test_bfloat16_close_to_float32():
    config = tiny_config(num_hidden_layers=4, hidden_size=64, intermediate_size=128)
    f32 = DebertaV2Model(config, rngs=nnx.Rngs(0))
    perturb_nnx(f32)
    bf16 = DebertaV2Model(config, rngs=nnx.Rngs(1), compute=Compute(dtype="bfloat16"))
    load_state_dict(bf16, model_to_state_dict(f32))
    ids, mask = padded_batch(config.vocab_size, LENGTHS)
    ref = run(f32, ids, mask)
    out = run(bf16, ids, mask)
    assert out.dtype == np.dtype("bfloat16")
    err = np.abs(out.astype(np.float32) - ref)[mask.astype(bool)]
    print(f"\nbfloat16 vs float32: max abs {err.max():.3e}, mean abs {err.mean():.3e}")
    assert err.max() <= BF16_MAX_ABS
    assert err.mean() <= BF16_MEAN_ABS
