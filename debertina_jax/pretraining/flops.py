"""Model FLOPs of one ELECTRA / DeBERTa-v3 training step, for MFU.

"Model FLOPs" count the matrix multiplications the model's math needs, whatever the
implementation does (PaLM's convention): a multiply-add is 2 FLOPs, elementwise work (softmax,
GELU, LayerNorm, Adam) is not counted, the backward pass is 2x the forward (so a step is 3x the
forward), and rematerialisation is not counted. For one encoder of hidden size H, attention
width A = heads * head_dim, FFN width I, on a batch of B sequences of L tokens (T = B * L):

    per layer   q, k, v projections          3 * 2 T H A
                attention output             2 T A H
                FFN in + out                 2 * 2 T H I
                c2c scores  q_i . k_j        2 B L^2 A
                c2p scores  q_i . Kr[c(i,j)] 2 B L^2 A  (one d-dot per (i, j))
                p2c scores  k_j . Qr[c'(i,j)] 2 B L^2 A
                probs @ v                    2 B L^2 A
                relative table projections   2 R H A per term (once per step, not per sequence)
    embeddings  embed_proj when E != H: 2 T E H; nGiE conv: 2 T H (H / groups) kernel

R is the number of rows of the relative table the sequence length can reach (2L - 1 at most;
fewer when distances fall into shared log buckets), so a short sequence is not charged for the
whole 2k-row table. The heads: the generator's MLM head (dense + tied vocab projection) runs
on the masked positions only, max(1, round(mask_prob * L)) per sequence (full lines, as the
masking code picks them); the discriminator's RTD head (dense H -> H, then H -> 1) on every
token. The generator is the discriminator's config at the generator's depth; with the enhanced
mask decoder its last layer runs EMD_STEPS times (on L query tokens each) instead of once.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from debertina_jax.config import Config, generator_model_config
from debertina_jax.config.model import DebertaV2Config
from debertina_jax.model.electra import EMD_STEPS
from debertina_jax.model.relative_position import log_bucket_positions

# Forward + backward (gradients w.r.t. activations and w.r.t. weights): 3x the forward.
TRAIN_MULTIPLIER = 3


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Forward model FLOPs of one training step, by part; `total` is the training (3x) count."""

    dense: int  # q/k/v/output/FFN projections (+ embed_proj, conv) of both encoders
    attention: int  # c2c, c2p, p2c scores and probs @ v, both encoders
    relative: int  # projecting the relative-position table, both encoders
    mlm_head: int  # generator head at the masked positions, vocab projection included
    rtd_head: int  # discriminator head on every token
    tokens: int  # B * L

    @property
    def forward(self) -> int:
        return self.dense + self.attention + self.relative + self.mlm_head + self.rtd_head

    @property
    def total(self) -> int:
        return TRAIN_MULTIPLIER * self.forward

    @property
    def per_token(self) -> float:
        return self.total / self.tokens

    @property
    def attention_share(self) -> float:
        """Fraction of the step's model FLOPs spent in the attention scores and probs @ v."""
        return self.attention / self.forward


def relative_rows_used(config: DebertaV2Config, seq_len: int) -> int:
    """How many rows of the [2k, H] relative table a sequence of `seq_len` can index (c2p)."""
    distances = np.arange(-(seq_len - 1), seq_len)
    if config.position_buckets > 0:
        distances = log_bucket_positions(
            distances, config.position_buckets, config.relative_max_position
        )
    span = config.relative_span
    return int(np.unique(np.clip(distances + span, 0, 2 * span - 1)).size)


def masked_per_sequence(seq_len: int, mask_prob: float) -> int:
    """Predictions in a full line of `seq_len` tokens, as `masking.mask_tokens` counts them."""
    return max(1, round(seq_len * mask_prob))


def _relative_terms(config: DebertaV2Config) -> tuple[str, ...]:
    return tuple(config.pos_att_type) if config.relative_attention else ()


def encoder_forward_flops(
    config: DebertaV2Config, batch: int, seq_len: int
) -> tuple[int, int, int]:
    """(dense, attention, relative) forward FLOPs of one encoder on a [batch, seq_len] input."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    a = config.num_attention_heads * config.head_dim
    tokens = batch * seq_len
    terms = _relative_terms(config)

    dense_per_layer = 3 * 2 * tokens * h * a + 2 * tokens * a * h + 2 * 2 * tokens * h * i
    # c2c + probs @ v, plus one [L, L] score term per relative term.
    attention_per_layer = (2 + len(terms)) * 2 * batch * seq_len * seq_len * a
    relative_per_layer = (
        len(terms) * 2 * relative_rows_used(config, seq_len) * h * a if terms else 0
    )

    dense = layers * dense_per_layer
    if config.embedding_dim != h:
        dense += 2 * tokens * config.embedding_dim * h
    if config.conv_kernel_size > 0:
        dense += 2 * tokens * h * (h // config.conv_groups) * config.conv_kernel_size
    return dense, layers * attention_per_layer, layers * relative_per_layer


def train_step_flops(config: Config, batch: int, seq_len: int) -> StepFlops:
    """Model FLOPs of one RTD training step (generator + discriminator) at [batch, seq_len]."""
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be >= 1, got batch={batch} seq_len={seq_len}")
    disc = config.model
    gen = generator_model_config(config)
    if config.generator.enhanced_mask_decoder:
        gen = gen.replace(num_hidden_layers=gen.num_hidden_layers - 1 + EMD_STEPS)
    d_dense, d_attn, d_rel = encoder_forward_flops(disc, batch, seq_len)
    g_dense, g_attn, g_rel = encoder_forward_flops(gen, batch, seq_len)

    h = disc.hidden_size
    tokens = batch * seq_len
    masked = batch * masked_per_sequence(seq_len, config.data.mask_prob)
    width = gen.embedding_dim if gen.legacy else h  # the MLM head's transform width
    mlm_head = 2 * masked * h * width + 2 * masked * width * gen.vocab_size
    rtd_head = 2 * tokens * h * h + 2 * tokens * h
    return StepFlops(
        dense=d_dense + g_dense,
        attention=d_attn + g_attn,
        relative=d_rel + g_rel,
        mlm_head=mlm_head,
        rtd_head=rtd_head,
        tokens=tokens,
    )


def mfu(flops_per_step: float, step_time_s: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak FLOP/s."""
    if step_time_s <= 0 or peak_flops_per_s <= 0:
        raise ValueError(
            f"step time and peak must be > 0, got {step_time_s} s and {peak_flops_per_s} FLOP/s"
        )
    return flops_per_step / step_time_s / peak_flops_per_s
