"""The model-FLOP formula against counts done by hand for tiny configs; the chips whose peak
FLOP/s gives the MFU."""

import pytest

from debertina_jax.config import config_from_dict
from debertina_jax.pretraining.chips import peak_flops_per_second
from debertina_jax.pretraining.flops import (
    TRAIN_MULTIPLIER,
    mfu,
    relative_rows_used,
    train_step_flops,
)


def tiny(**model_overrides):
    """V=50, H=A=8 (2 heads), I=16, 2 layers (generator 1), span 4 without buckets, mask 25%."""
    model = dict(
        vocab_size=50,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        relative_attention=True,
        position_buckets=-1,
        max_relative_positions=4,
        pos_att_type="p2c|c2p",
        share_att_key=True,
        position_biased_input=False,
    )
    model.update(model_overrides)
    # data.vocab_size: the model's rows less [MASK].
    return config_from_dict({"model": model, "data": {"mask_prob": 0.25, "vocab_size": 49}})


def test_hand_count_batch_2_length_4():
    # B=2, L=4, T=8 tokens. Per layer:
    #   q, k, v: 3 * 2*8*8*8 = 3072; output: 2*8*8*8 = 1024; FFN: 2 * 2*8*8*16 = 4096 -> 8192
    #   c2c, c2p, p2c, probs@v: 4 * 2*2*4*4*8 = 2048
    #   relative rows: distances -3..3 -> indices 1..7 = 7 rows; 2 terms * 2*7*8*8 = 1792
    # 3 layers in all (discriminator 2 + generator 1).
    # MLM: round(0.25 * 4) = 1 masked per row, 2 in all: 2*2*8*8 + 2*2*8*50 = 256 + 1600 = 1856
    # RTD: 2*8*8*8 + 2*8*8 = 1152
    f = train_step_flops(tiny(), batch=2, seq_len=4)
    assert (f.dense, f.attention, f.relative) == (3 * 8192, 3 * 2048, 3 * 1792)
    assert (f.mlm_head, f.rtd_head) == (1856, 1152)
    assert f.forward == 39104
    assert f.total == TRAIN_MULTIPLIER * 39104 == 117312
    assert f.per_token == 117312 / 8
    assert f.attention_share == pytest.approx(6144 / 39104)


def test_one_relative_term_and_no_relative_attention():
    base = train_step_flops(tiny(), batch=2, seq_len=4)
    c2p = train_step_flops(tiny(pos_att_type="c2p"), batch=2, seq_len=4)
    # One score term and one table projection fewer per layer (3 layers).
    assert base.attention - c2p.attention == 3 * 2 * 2 * 4 * 4 * 8
    assert c2p.relative == base.relative // 2
    plain = train_step_flops(tiny(relative_attention=False), batch=2, seq_len=4)
    assert plain.attention == 3 * 2 * 2 * 2 * 4 * 4 * 8  # c2c + probs @ v only
    assert plain.relative == 0


def test_embedding_projection_and_separate_generator_depth():
    f = train_step_flops(tiny(embedding_size=4), batch=2, seq_len=4)
    # embed_proj E=4 -> H=8 in each encoder; the legacy MLM head transforms H -> E.
    assert f.dense == 3 * 8192 + 2 * (2 * 8 * 4 * 8)
    assert f.mlm_head == 2 * 2 * 8 * 4 + 2 * 2 * 4 * 50
    raw = tiny().to_dict()
    raw["generator"] = {"num_hidden_layers": 2}
    deeper = train_step_flops(config_from_dict(raw), batch=2, seq_len=4)
    assert deeper.dense == 4 * 8192


def test_relative_rows_follow_the_buckets():
    # Without buckets, a sequence reaches 2L - 1 rows, clipped to the table's 2k.
    assert relative_rows_used(tiny().model, 4) == 7
    assert relative_rows_used(tiny().model, 16) == 8
    # DeBERTa-v3 (256 buckets, 512 positions): L=128 is inside the linear range.
    v3 = config_from_dict(
        {
            "model": {
                "relative_attention": True,
                "position_buckets": 256,
                "max_relative_positions": -1,
            }
        }
    ).model
    assert relative_rows_used(v3, 128) == 255
    assert relative_rows_used(v3, 512) == 511
    # 8 buckets over 64 positions: every distance lands in one of 2*8-1 log buckets.
    small = tiny(position_buckets=8, max_relative_positions=64, max_position_embeddings=64).model
    assert relative_rows_used(small, 64) == 15


def test_mfu_and_bad_input():
    assert mfu(100.0, 2.0, 100.0) == 0.5
    with pytest.raises(ValueError, match="step time"):
        mfu(1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="seq_len"):
        train_step_flops(tiny(), batch=2, seq_len=0)


def test_enhanced_mask_decoder_runs_the_last_generator_layer_twice():
    raw = tiny().to_dict()
    raw["generator"] = {"num_hidden_layers": 2, "enhanced_mask_decoder": True}
    emd = train_step_flops(config_from_dict(raw), batch=2, seq_len=4)
    # discriminator 2 layers + generator 1 backbone layer + 2 EMD passes of its last layer.
    assert emd.dense == 5 * 8192


@pytest.mark.parametrize(
    "kind, peak",
    [("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
     ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
     ("cpu", None), ("TPU v3", None)],
)  # fmt: skip
def test_chip_peaks(kind, peak):
    assert peak_flops_per_second(kind) == peak
