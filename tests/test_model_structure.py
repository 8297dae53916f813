"""Model structure: parameter counts, logical axis names, scan/remat equivalence, dropout and the
embedding-table overrides the pretraining code relies on."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from deberta_testing import padded_batch, perturb_nnx, run, tiny_config
from flax import nnx

from debertina_jax.config import load_config
from debertina_jax.config.model import DebertaV2Config
from debertina_jax.hf.convert import load_state_dict, model_to_state_dict
from debertina_jax.model.compute import Compute
from debertina_jax.model.models import (
    DebertaV2ForMaskedLM,
    DebertaV2Model,
)

# The discriminator of each shipped config, as load_config builds it (model.vocab_size =
# data.vocab_size + 1 for [MASK]): (backbone, word embeddings) parameters, exactly. README's
# table of configs quotes these, rounded to 0.01M.
CONFIG_PARAMS = {
    "tiny": (204_288, 128_064),
    "xsmall": (21_491_712, 49_152_384),  # 21.49M + 49.15M = 70.64M
    "small": (42_923_520, 98_304_768),  # 42.92M + 98.30M = 141.23M
    "base": (85_450_752, 24_576_768),  # 85.45M + 24.58M = 110.03M
    "base-128k": (85_450_752, 98_304_768),  # 85.45M + 98.30M = 183.76M
    "large": (302_837_760, 131_073_024),  # 302.84M + 131.07M = 433.91M
}
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def _param_counts(config: DebertaV2Config) -> tuple[int, int]:
    """(backbone, word embeddings) parameter counts from abstract shapes, nothing allocated."""
    abstract = nnx.eval_shape(lambda: DebertaV2Model(config, rngs=nnx.Rngs(0)))
    total = sum(int(np.prod(p.shape)) for _, p in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    words = int(np.prod(abstract.embeddings.word_embeddings.embedding.shape))
    return total - words, words


def test_every_shipped_config_has_a_parameter_count():
    assert {p.stem for p in CONFIGS_DIR.glob("*.yaml")} == set(CONFIG_PARAMS)


@pytest.mark.parametrize("name", list(CONFIG_PARAMS))
def test_parameter_counts_of_the_shipped_configs_match_hf(name):
    config = load_config(CONFIGS_DIR / f"{name}.yaml").model
    assert config.vocab_size == load_config(CONFIGS_DIR / f"{name}.yaml").data.vocab_size + 1
    backbone, words = _param_counts(config)
    print(
        f"\nparams | {name} | backbone {backbone / 1e6:.2f}M + embeddings {words / 1e6:.2f}M "
        f"= {(backbone + words) / 1e6:.2f}M"
    )
    assert (backbone, words) == CONFIG_PARAMS[name]
    with torch.device("meta"):  # HF's count, exactly, without allocating
        hf = transformers.DebertaV2Model(transformers.DebertaV2Config.from_dict(config.to_dict()))
    assert backbone + words == sum(p.numel() for p in hf.parameters())
    hf_words = hf.embeddings.word_embeddings.weight.numel()
    assert hf_words == words


ALLOWED_AXES = {"vocab", "embed", "heads", "mlp", "relpos", "layers", None}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_parameter_has_logical_axes(scan_layers):
    config = tiny_config(
        conv_kernel_size=3, share_att_key=False, position_biased_input=True, type_vocab_size=2
    )
    compute = Compute(scan_layers=scan_layers)
    model = nnx.eval_shape(lambda: DebertaV2ForMaskedLM(config, rngs=nnx.Rngs(0), compute=compute))
    axes = {}
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = param.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(param.shape), path
        assert set(names) <= ALLOWED_AXES, (path, names)
        named = [n for n in names if n is not None]
        assert len(named) == len(set(named)), (path, names)  # a mesh axis may appear only once
        assert (names[0] == "layers") == ("layers" in path and scan_layers), (path, names)
        axes[".".join(map(str, path))] = tuple(names)
    layer = "deberta.encoder.layers." + ("" if scan_layers else "0.")
    stack = ("layers",) if scan_layers else ()
    assert axes["deberta.embeddings.word_embeddings.embedding"] == ("vocab", "embed")
    assert axes["deberta.encoder.rel_embeddings"] == ("relpos", "embed")
    assert axes[layer + "attention.query_proj.kernel"] == stack + ("embed", "heads")
    assert axes[layer + "attention_output.kernel"] == stack + ("heads", "embed")
    assert axes[layer + "intermediate.kernel"] == stack + ("embed", "mlp")
    assert axes[layer + "output.kernel"] == stack + ("mlp", "embed")
    assert axes["lm_head.bias"] == ("vocab",)
    assert nnx.get_partition_spec(nnx.state(model))["lm_head"]["bias"].get_value() == jax.P("vocab")


@pytest.fixture(scope="module")
def plain_mlm():
    """A plain (unscanned) MLM with non-trivial weights, and a padded batch."""
    config = tiny_config()
    model = DebertaV2ForMaskedLM(config, rngs=nnx.Rngs(0))
    perturb_nnx(model)
    ids, mask = padded_batch(config.vocab_size, [40, 31, 6])
    return model, ids, mask


def _copy(model, **kwargs):
    """Same weights in a model built with other options (scan/remat/impl)."""
    other = type(model)(model.config, rngs=nnx.Rngs(1), compute=Compute(**kwargs))
    load_state_dict(other, model_to_state_dict(model))
    return other


def test_scan_with_conv_layer_matches_plain():
    config = tiny_config(conv_kernel_size=3, conv_act="gelu")
    model = DebertaV2Model(config, rngs=nnx.Rngs(0))
    perturb_nnx(model)
    ids, mask = padded_batch(config.vocab_size, [20, 9])
    np.testing.assert_allclose(
        run(_copy(model, scan_layers=True), ids, mask), run(model, ids, mask), atol=2e-5
    )


def _forward_and_grads(model, ids, mask):
    """The training forward (dropout on, a fixed key) and d(loss)/d(weights) by HF name:
    remat must replay the same dropout masks in its recomputation."""

    def loss(m):
        out = m(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=3))
        return jnp.sum(out * jnp.cos(out)) / 1e3, out  # a non-uniform cotangent

    (_, out), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    holder = _copy(model, scan_layers=model.compute.scan_layers)
    nnx.update(holder, grads)
    return np.asarray(out), model_to_state_dict(holder)


@pytest.fixture(scope="module")
def plain_grads(plain_mlm):
    """The plain layer loop (scan_layers false, remat none) on a short batch: 12 tokens still
    reach the log buckets (8), and a small batch compiles and runs faster."""
    model, _, _ = plain_mlm
    ids, mask = padded_batch(model.config.vocab_size, [12, 7])
    return ids, mask, _forward_and_grads(model, ids, mask)


@pytest.mark.parametrize(
    "scan_layers, remat",
    [(False, "full"), (False, "dots"), (True, "none"), (True, "full"), (True, "dots")],
)
def test_gradients_equal_under_every_scan_and_remat(plain_mlm, plain_grads, scan_layers, remat):
    """The same forward and gradients through every (scan, remat) variant as through the plain
    layer loop: jax.checkpoint never changes a forward, so only gradients can show a bad remat."""
    ids, mask, (plain_out, plain) = plain_grads
    variant = _copy(plain_mlm[0], scan_layers=scan_layers, remat=remat)
    out, grads = _forward_and_grads(variant, ids, mask)
    np.testing.assert_allclose(out, plain_out, atol=2e-5)
    assert grads.keys() == plain.keys()
    assert max(np.abs(g).max() for g in grads.values()) > 0
    for key in plain:
        np.testing.assert_allclose(grads[key], plain[key], atol=1e-5, err_msg=key)


def test_dropout_uses_rng_streams(plain_mlm):
    model, ids, mask = plain_mlm  # hidden and attention dropout 0.1
    clean = model(ids, mask)
    np.testing.assert_array_equal(model(ids, mask, rngs=nnx.Rngs(dropout=3)), clean)
    seeded = model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=3))
    np.testing.assert_array_equal(
        model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=3)), seeded
    )
    assert not np.allclose(seeded, clean, atol=1e-3)
    own = _copy(model)
    own.deberta.rngs = nnx.Rngs(dropout=5)
    first, second = (own(ids, mask, deterministic=False) for _ in range(2))
    assert not np.allclose(first, second, atol=1e-3)  # the model's own stream advances
    # The scanned model splits the same key the same way per layer.
    scanned = _copy(model, scan_layers=True)
    np.testing.assert_allclose(
        scanned(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=3)), seeded, atol=2e-5
    )
    no_stream = DebertaV2ForMaskedLM(model.config, rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match="dropout"):
        no_stream(ids, mask, deterministic=False)


def test_embedding_overrides_and_head_on_gathered_positions(plain_mlm):
    model, ids, mask = plain_mlm
    table = model.deberta.embeddings.word_embeddings.embedding[...]
    logits = model(ids, mask)
    np.testing.assert_array_equal(model(ids, mask, word_embeddings=table), logits)

    # GDES: E_G (frozen) + E_delta replaces the table in the embeddings *and* the tied MLM head.
    delta = 0.1 * jax.random.normal(jax.random.key(0), table.shape)
    swapped = _copy(model)
    swapped.deberta.embeddings.word_embeddings.embedding[...] = table + delta
    np.testing.assert_allclose(
        model(ids, mask, word_embeddings=jax.lax.stop_gradient(table) + delta),
        swapped(ids, mask),
        atol=1e-6,
    )

    # The trainer projects only the gathered masked positions [B, P, H].
    hidden = model.deberta(ids, mask)
    positions = jnp.array([[1, 5], [2, 3], [0, 4]])
    gathered = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    np.testing.assert_allclose(
        model.lm_head(gathered, table),
        jnp.take_along_axis(logits, positions[..., None], axis=1),
        atol=1e-5,
    )


def test_position_embedding_override():
    config = tiny_config(position_biased_input=True)
    model = DebertaV2Model(config, rngs=nnx.Rngs(0))
    ids, mask = padded_batch(config.vocab_size, [10, 4])
    own = model.embeddings.position_embeddings.embedding[...]
    np.testing.assert_array_equal(model(ids, mask, position_embeddings=own), model(ids, mask))
    assert not np.allclose(model(ids, mask, position_embeddings=own * 2), model(ids, mask))
    too_long = np.zeros((1, config.max_position_embeddings + 1), np.int64)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(too_long)


def test_bad_model_options_are_rejected():
    config = tiny_config()
    with pytest.raises(ValueError, match="remat"):
        DebertaV2Model(config, rngs=nnx.Rngs(0), compute=Compute(remat="some"))
    with pytest.raises(ValueError, match="attention impl"):
        DebertaV2Model(config, rngs=nnx.Rngs(0), compute=Compute(attention_impl="fast"))
