"""The generator/discriminator pair: embedding sharing (GDES, ES, NES), export, and the EMD."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tolerances import parity_tolerance

from debertina_jax.config import Config, DataConfig, GeneratorConfig, TrainConfig
from debertina_jax.config.model import ConfigError, DebertaV2Config
from debertina_jax.hf.convert import model_to_state_dict
from debertina_jax.model import electra
from debertina_jax.pretraining.pair import build_pair
from debertina_jax.pretraining.step import electra_loss

MODEL = DebertaV2Config.deberta_v3(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=32,
    position_buckets=8,
    hidden_dropout_prob=0.0,  # deterministic gradients; dropout adds nothing to these checks
    attention_probs_dropout_prob=0.0,
)


def _config(sharing: str = "gdes", emd: bool = False, **model) -> Config:
    return Config(
        model=MODEL.replace(**model),
        generator=GeneratorConfig(
            num_hidden_layers=1 if not emd else 2,
            embedding_sharing=sharing,
            enhanced_mask_decoder=emd,
        ),
        data=DataConfig(vocab_size=90),
        train=TrainConfig(rtd_weight=50.0),
    )


def _batch(seed: int = 0) -> jax.Array:
    ids = np.random.default_rng(seed).integers(4, 90, size=(4, 16)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 1, 2
    ids[1, 9:] = 0  # a padded row
    return jnp.asarray(ids)


def _gradients(config: Config) -> dict[str, dict]:
    """d(loss), d(mlm_loss), d(rtd_loss) / d(params), as pure dicts."""
    graphdef, params = nnx.split(build_pair(config, 0), nnx.Param)
    ids, rng = _batch(), jax.random.key(3)

    # One jit per sharing mode: with LLVM's optimisations off (tests/process_testing.py) three
    # whole programs compile faster than the hundreds of per-op programs of eager mode.
    def parts(p):
        _, m = electra_loss(nnx.merge(graphdef, p), ids, rng, config, train=True)
        return jnp.stack([m["loss"], m["mlm_loss"], m["rtd_loss"]])

    jac = nnx.to_pure_dict(jax.jit(jax.jacrev(parts))(params))
    return {
        name: jax.tree.map(lambda g, i=i: np.asarray(g[i]), jac)
        for i, name in enumerate(("loss", "mlm", "rtd"))
    }


def _table(grads: dict, model: str) -> np.ndarray:
    return grads[model]["deberta"]["embeddings"]["word_embeddings"]["embedding"]


@pytest.fixture(scope="module")
def gdes_grads():
    return _gradients(_config("gdes"))


def test_gdes_generator_table_gets_only_the_mlm_gradient(gdes_grads):
    e_g = {k: _table(g, "generator") for k, g in gdes_grads.items()}
    assert np.abs(e_g["mlm"]).max() > 0
    np.testing.assert_array_equal(e_g["rtd"], 0.0)
    np.testing.assert_allclose(e_g["loss"], e_g["mlm"], rtol=1e-5, atol=1e-7)


def test_gdes_delta_gets_only_the_rtd_gradient(gdes_grads):
    delta = {k: _table(g, "discriminator") for k, g in gdes_grads.items()}
    assert np.abs(delta["rtd"]).max() > 0
    np.testing.assert_array_equal(delta["mlm"], 0.0)
    np.testing.assert_allclose(delta["loss"], 50.0 * delta["rtd"], rtol=1e-4, atol=1e-6)


def test_gdes_delta_starts_at_zero_and_export_merges_it():
    pair = build_pair(_config("gdes"), 0)
    e_g = pair.generator.deberta.embeddings.word_embeddings.embedding[...]
    delta = pair.discriminator.deberta.embeddings.word_embeddings.embedding
    np.testing.assert_array_equal(delta[...], 0.0)
    delta[...] = jax.random.normal(jax.random.key(1), delta.shape) * 0.1  # as after training
    exported = pair.export_discriminator()
    table = exported.deberta.embeddings.word_embeddings.embedding[...]
    np.testing.assert_allclose(table, e_g + delta[...], rtol=1e-6)
    # The standalone model computes what the pair's discriminator computes.
    ids = _batch()
    mask = (ids != 0).astype(jnp.int32)
    np.testing.assert_allclose(
        exported(ids, mask), pair.discriminator_logits(ids, mask), rtol=1e-5, atol=1e-6
    )
    # The pair itself is untouched by the export.
    np.testing.assert_array_equal(
        pair.discriminator.deberta.embeddings.word_embeddings.embedding[...], delta[...]
    )


def test_gdes_covers_absolute_position_tables():
    config = _config("gdes", position_biased_input=True)
    pair = build_pair(config, 0)
    delta = pair.discriminator.deberta.embeddings.position_embeddings.embedding[...]
    np.testing.assert_array_equal(delta, 0.0)
    e_g = pair.generator.deberta.embeddings.position_embeddings.embedding[...]
    _, position = pair._gdes_tables()  # [word, position]
    np.testing.assert_allclose(position, e_g)


def test_es_shares_one_table_trained_by_both_losses():
    config = _config("es")
    pair = build_pair(config, 0)
    g, d = pair.generator.deberta.embeddings, pair.discriminator.deberta.embeddings
    assert g.word_embeddings is d.word_embeddings
    grads = _gradients(config)
    # One shared parameter (stored once, under the discriminator), no generator copy.
    assert "word_embeddings" not in grads["loss"]["generator"]["deberta"]["embeddings"]
    shared = {k: _table(v, "discriminator") for k, v in grads.items()}
    assert np.abs(shared["mlm"]).max() > 0 and np.abs(shared["rtd"]).max() > 0
    np.testing.assert_allclose(
        shared["loss"], shared["mlm"] + 50.0 * shared["rtd"], rtol=1e-4, atol=1e-6
    )
    exported = pair.export_discriminator()
    np.testing.assert_array_equal(
        exported.deberta.embeddings.word_embeddings.embedding[...], g.word_embeddings.embedding[...]
    )


def test_nes_keeps_the_tables_apart():
    grads = _gradients(_config("nes"))
    np.testing.assert_array_equal(_table(grads["rtd"], "generator"), 0.0)
    np.testing.assert_array_equal(_table(grads["mlm"], "discriminator"), 0.0)
    assert np.abs(_table(grads["rtd"], "discriminator")).max() > 0
    assert np.abs(_table(grads["mlm"], "generator")).max() > 0


# ---- enhanced mask decoder ------------------------------------------------------------------


@pytest.fixture(scope="module")
def emd_pair():
    return build_pair(_config("gdes", emd=True), 0)


def _emd_inputs(pair):
    ids = _batch()
    mask = (ids != 0).astype(jnp.int32)
    hidden = jax.random.normal(jax.random.key(0), ids.shape + (MODEL.hidden_size,))
    return hidden, mask, pair.generator.deberta.encoder


def test_emd_queries_see_only_the_hidden_states(emd_pair):
    emd = emd_pair.enhanced_mask_decoder
    hidden, mask, encoder = _emd_inputs(emd_pair)
    out = emd(hidden, mask, encoder)
    # Changing the hidden state of one real token changes other rows (they attend to it);
    # changing a padded token's state changes no real row.
    bumped = emd(hidden.at[0, 5].add(1.0), mask, encoder)
    assert np.abs(np.asarray(bumped - out)[0, 3]).max() > 1e-4
    padded = emd(hidden.at[1, 12].add(1.0), mask, encoder)
    np.testing.assert_allclose(padded[1, :9], out[1, :9], atol=1e-5)


def test_emd_first_pass_is_the_last_layer_when_queries_equal_keys(emd_pair, monkeypatch):
    # With a zero position table the first query stream equals the keys, so one pass of the
    # [K; Q] trick must reproduce the plain layer on the hidden states.
    emd = nnx.clone(emd_pair.enhanced_mask_decoder)
    emd.position_embeddings.embedding[...] = jnp.zeros_like(emd.position_embeddings.embedding[...])
    hidden, mask, encoder = _emd_inputs(emd_pair)
    monkeypatch.setattr(electra, "EMD_STEPS", 1)
    rel_pos, rel_embeddings = encoder.relative_inputs(hidden.shape[1])
    token = mask.astype(bool)
    pair_mask = token[:, None, :, None] & token[:, None, None, :]
    expected = emd.layer(hidden, pair_mask, rel_pos, rel_embeddings)
    real = np.asarray(token)
    np.testing.assert_allclose(
        np.asarray(emd(hidden, mask, encoder))[real], np.asarray(expected)[real], atol=1e-5
    )


def _official_emd_logits(generator, emd_positions, ids, mask):
    """The official generator with its EMD (DeBERTa's `emd_context_layer`), written with HF
    transformers' modules in float64: hidden = the states entering the generator's last layer;
    queries = hidden + absolute position embeddings; the last layer runs twice with
    query_states = the previous output while keys and values stay `hidden`; the MLM head reads
    the second output. Returns logits [B, L, V]."""
    hf = transformers.DebertaV2ForMaskedLM(
        transformers.DebertaV2Config.from_dict(generator.config.to_dict())
    )
    weights = {k: torch.tensor(v) for k, v in model_to_state_dict(generator).items()}
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.startswith("cls.predictions.decoder.") for k in missing)
    hf = hf.double().eval()
    # The decoder is tied to the word table and the head's bias, as in the official model.
    assert torch.equal(
        hf.get_output_embeddings().weight, hf.deberta.embeddings.word_embeddings.weight
    )
    ids, mask = torch.tensor(np.asarray(ids)), torch.tensor(np.asarray(mask))
    with torch.no_grad():
        encoder = hf.deberta.encoder
        hidden = hf.deberta.embeddings(input_ids=ids, mask=mask)
        pair_mask = encoder.get_attention_mask(mask)
        rel_pos, rel = encoder.get_rel_pos(hidden), encoder.get_rel_embedding()
        for layer in encoder.layer[:-1]:
            hidden = layer(hidden, pair_mask, relative_pos=rel_pos, rel_embeddings=rel)[0]
        query = hidden + torch.tensor(np.asarray(emd_positions), dtype=torch.float64)
        for _ in range(2):
            query = encoder.layer[-1](
                hidden, pair_mask, query_states=query, relative_pos=rel_pos, rel_embeddings=rel
            )[0]
        if hf.legacy:
            return hf.cls(query).numpy()
        return hf.lm_predictions(query, hf.deberta.embeddings.word_embeddings).numpy()


def test_emd_matches_the_official_formula_on_hf_modules(emd_pair):
    pair = nnx.clone(emd_pair)
    noise = np.random.default_rng(0)
    params = nnx.state(pair, nnx.Param)  # LayerNorms not 1/0, a non-trivial position table
    nnx.update(
        pair,
        jax.tree.map(lambda x: x + 0.05 * noise.standard_normal(x.shape).astype(x.dtype), params),
    )
    ids = _batch()
    mask = (ids != 0).astype(jnp.int32)
    positions = jnp.array([[1, 4, 14], [2, 5, 8], [3, 9, 11], [1, 7, 15]])  # real tokens only
    ours = np.asarray(pair.generator_logits(ids, mask, positions))
    length = ids.shape[1]
    table = pair.enhanced_mask_decoder.position_embeddings.embedding[...][:length]
    full = _official_emd_logits(pair.export_generator(), table, ids, mask)
    expected = np.take_along_axis(full, np.asarray(positions)[..., None], axis=1)
    diff = float(np.abs(ours - expected).max())
    print(f"\nEMD vs official formula on HF modules (float64): max abs diff {diff:.2e}")
    assert diff <= parity_tolerance("EMD generator vs official formula")


def test_emd_export_puts_its_layer_last(emd_pair):
    exported = emd_pair.export_generator()
    assert exported.deberta.encoder.config.num_hidden_layers == 2  # generator depth, EMD included
    layers = nnx.to_pure_dict(nnx.state(exported.deberta.encoder.layers))
    ours = nnx.to_pure_dict(nnx.state(emd_pair.generator.deberta.encoder.layers))
    jax.tree.map(np.testing.assert_array_equal, layers[0], ours[0])
    last = nnx.to_pure_dict(nnx.state(emd_pair.enhanced_mask_decoder.layer))
    jax.tree.map(np.testing.assert_array_equal, layers[1], last)


def test_emd_generator_logits_run(emd_pair):
    ids = _batch()
    logits = emd_pair.generator_logits(ids, (ids != 0).astype(jnp.int32), jnp.zeros((4, 3), int))
    assert logits.shape == (4, 3, MODEL.vocab_size)
    assert np.isfinite(np.asarray(logits)).all()


def test_emd_needs_relative_positions_and_two_layers():
    with pytest.raises(ConfigError, match="position_biased_input"):
        build_pair(_config("gdes", emd=True, position_biased_input=True), 0)
    config = _config("gdes", emd=True)
    # The config refuses it already (config/run.py checks across sections).
    with pytest.raises(ConfigError, match="num_hidden_layers >= 2"):
        build_pair(dataclasses.replace(config, generator=GeneratorConfig(1, "gdes", True)), 0)


def test_import_is_the_inverse_of_export(emd_pair):
    source = nnx.clone(emd_pair)
    delta = source.discriminator.deberta.embeddings.word_embeddings.embedding
    delta[...] = jax.random.normal(jax.random.key(1), delta.shape) * 0.1  # as after training
    target = build_pair(_config("gdes", emd=True), 1)  # other random weights
    target.import_models(
        generator=source.export_generator(), discriminator=source.export_discriminator()
    )
    # A standalone generator has no EMD position table (HF has no EMD): that one stays as is.
    table = target.enhanced_mask_decoder.position_embeddings.embedding
    table[...] = source.enhanced_mask_decoder.position_embeddings.embedding[...]
    ids = _batch()
    mask = (ids != 0).astype(jnp.int32)
    positions = jnp.tile(jnp.arange(1, 4), (4, 1))
    np.testing.assert_allclose(
        target.discriminator_logits(ids, mask),
        source.discriminator_logits(ids, mask),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        target.generator_logits(ids, mask, positions),
        source.generator_logits(ids, mask, positions),
        rtol=1e-5,
        atol=1e-5,
    )
    got = target.discriminator.deberta.embeddings.word_embeddings.embedding[...]
    np.testing.assert_allclose(got, delta[...], atol=1e-6)  # E_delta = E_D - E_G again


def test_import_rejects_a_model_of_another_shape(emd_pair):
    other = build_pair(_config("nes", hidden_size=48), 0)
    with pytest.raises(ValueError, match="cannot load the discriminator"):
        nnx.clone(emd_pair).import_models(discriminator=other.export_discriminator())
