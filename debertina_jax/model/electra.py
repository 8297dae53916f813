"""The ELECTRA-style generator / discriminator pair of DeBERTa-v3, built from one Config.

- generator: DebertaV2ForMaskedLM, same width as the discriminator, `generator_model_config`
  depth, MLM head tied to its own word table E_G.
- discriminator: DebertaV2ForReplacedTokenDetection (encoder + RTD head).
- embedding sharing (`generator.embedding_sharing`, DeBERTa-v3 paper section 3):
  gdes: the discriminator's own word table holds E_delta, initialised to zero, and the table it
        reads is stop_gradient(E_G) + E_delta: only the MLM loss trains E_G, the RTD loss trains
        E_delta. Absolute position tables (position_biased_input) get the same treatment.
  es:   the discriminator's embedding module IS the generator's (one shared parameter), so E_G
        receives the gradients of both losses.
  nes:  two independent tables.
- enhanced mask decoder (EMD, optional, the official generator's head): the generator's last
  layer is run twice more with queries = hidden + absolute position embeddings while keys and
  values stay the hidden states entering that layer; the MLM head reads the second output.
  Here the backbone has depth - 1 layers and the EMD owns the last one, so the parameters are
  exactly the official generator's (plus its position table); `export_generator` puts that layer
  back at the end of a plain DebertaV2ForMaskedLM, which is what HF can run (HF has no EMD).

`export_discriminator` / `export_generator` give standalone models with GDES merged
(E_D = E_G + E_delta), for checkpoint loading and conversion to HF.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from debertina_jax.config import Config, generator_model_config
from debertina_jax.config.model import ConfigError, DebertaV2Config
from debertina_jax.model.blocks import embed, gather_positions, split_key
from debertina_jax.model.compute import DEFAULT_COMPUTE, Compute
from debertina_jax.model.layers import Encoder, EncoderLayer
from debertina_jax.model.models import DebertaV2ForMaskedLM, DebertaV2ForReplacedTokenDetection

EMD_STEPS = 2  # the official EMD applies the shared last layer twice

__all__ = ["ElectraPair", "EnhancedMaskDecoder"]


class EnhancedMaskDecoder(nnx.Module):
    """The official EMD: one encoder layer (the generator's last) and an absolute position table."""

    def __init__(
        self,
        config: DebertaV2Config,
        *,
        rngs: nnx.Rngs,
        compute: Compute = DEFAULT_COMPUTE,
    ):
        self.layer = EncoderLayer(config, rngs=rngs, compute=compute)
        self.position_embeddings = embed(
            config.max_position_embeddings, config.hidden_size, (None, "embed"), config, rngs=rngs
        )

    def __call__(
        self,
        hidden: jax.Array,
        attention_mask: jax.Array,
        encoder: Encoder,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """hidden [B, L, H] (the backbone output) -> the decoder's states [B, L, H].

        EncoderLayer attends within one sequence, so a query stream Q over key/value states K
        is run as one sequence [K; Q] of length 2L: every row may attend only to the K half,
        and positions in both halves are 0..L-1. The Q half of the output is exactly
        layer(query=Q, key=value=K); the K half is discarded.
        """
        length = hidden.shape[1]
        if length > self.position_embeddings.embedding.shape[0]:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings "
                f"{self.position_embeddings.embedding.shape[0]} of the enhanced mask decoder"
            )
        rel_pos, rel_embeddings = encoder.relative_inputs(length)
        if rel_pos is not None:
            rel_pos = np.tile(rel_pos, (2, 2))
        token = attention_mask.astype(bool)
        rows = jnp.concatenate([token, token], axis=1)
        cols = jnp.concatenate([token, jnp.zeros_like(token)], axis=1)
        pair_mask = rows[:, None, :, None] & cols[:, None, None, :]
        positions = self.position_embeddings.embedding[:length].astype(hidden.dtype)
        query = hidden + positions[None]
        for key in split_key(dropout_key, EMD_STEPS):
            both = jnp.concatenate([hidden, query], axis=1)
            query = self.layer(both, pair_mask, rel_pos, rel_embeddings, key)[:, length:]
        return query


class ElectraPair(nnx.Module):
    """`.generator`, `.discriminator`, optionally `.enhanced_mask_decoder`; see the module doc."""

    def __init__(
        self,
        config: Config,
        *,
        rngs: nnx.Rngs,
        compute: Compute = DEFAULT_COMPUTE,
    ):
        self.sharing = config.generator.embedding_sharing
        self.compute = compute
        gen_config = generator_model_config(config)
        self.generator_config = gen_config
        emd = None
        if config.generator.enhanced_mask_decoder:
            _check_emd(gen_config)
            backbone = gen_config.replace(num_hidden_layers=gen_config.num_hidden_layers - 1)
            self.generator = DebertaV2ForMaskedLM(backbone, rngs=rngs, compute=compute)
            emd = EnhancedMaskDecoder(gen_config, rngs=rngs, compute=compute)
        else:
            self.generator = DebertaV2ForMaskedLM(gen_config, rngs=rngs, compute=compute)
        self.enhanced_mask_decoder = nnx.data(emd)
        self.discriminator = DebertaV2ForReplacedTokenDetection(
            config.model, rngs=rngs, compute=compute
        )

        g, d = self.generator.deberta.embeddings, self.discriminator.deberta.embeddings
        if self.sharing == "gdes":
            for table in _absolute_tables(d):
                table.embedding[...] = jnp.zeros_like(table.embedding[...])
        elif self.sharing == "es":
            d.word_embeddings = g.word_embeddings
            if d.position_embeddings is not None:
                d.position_embeddings = g.position_embeddings

    # ---- forward ---------------------------------------------------------------------------
    def generator_logits(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        positions: jax.Array,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """MLM logits [B, P, V] at `positions` [B, P] only; dropout on when `rngs` is given."""
        body_key, emd_key = split_key(None if rngs is None else rngs.dropout(), 2)
        hidden = self.generator.deberta(
            input_ids,
            attention_mask,
            deterministic=body_key is None,
            rngs=None if body_key is None else nnx.Rngs(dropout=body_key),
        )
        if self.enhanced_mask_decoder is not None:
            hidden = self.enhanced_mask_decoder(
                hidden, attention_mask, self.generator.deberta.encoder, emd_key
            )
        table = self.generator.deberta.embeddings.word_embeddings.embedding[...]
        return self.generator.lm_head(gather_positions(hidden, positions), table)

    def discriminator_logits(
        self, input_ids: jax.Array, attention_mask: jax.Array, *, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """RTD logits [B, L] (float32); dropout on when `rngs` is given."""
        tables = self._gdes_tables() + [None, None]
        return self.discriminator(
            input_ids,
            attention_mask,
            word_embeddings=tables[0],
            position_embeddings=tables[1],
            deterministic=rngs is None,
            rngs=rngs,
        )

    def _gdes_tables(self) -> list[jax.Array]:
        """Under GDES, the tables the discriminator reads: stop_gradient(E_G) + E_delta for the
        word table (and the absolute position table); empty otherwise (it reads its own)."""
        if self.sharing != "gdes":
            return []
        g, d = self.generator.deberta.embeddings, self.discriminator.deberta.embeddings
        return [
            jax.lax.stop_gradient(gt.embedding[...]) + dt.embedding[...]
            for gt, dt in zip(_absolute_tables(g), _absolute_tables(d), strict=True)
        ]

    # ---- export ----------------------------------------------------------------------------
    def export_discriminator(self) -> DebertaV2ForReplacedTokenDetection:
        """A standalone discriminator whose tables are the ones it reads (GDES: E_G + E_delta)."""
        merged = self._gdes_tables()
        disc = nnx.clone(self.discriminator)  # ES: the copy gets its own copy of E_G
        for table, value in zip(_absolute_tables(disc.deberta.embeddings), merged, strict=False):
            table.embedding[...] = value  # GDES only: `merged` is empty otherwise
        return disc

    def export_generator(self) -> DebertaV2ForMaskedLM:
        """A standalone generator; with the EMD, its layer becomes the backbone's last layer
        (the official generator's weights as HF lays them out; HF does not run the EMD)."""
        if self.enhanced_mask_decoder is None:
            return nnx.clone(self.generator)
        graphdef, target, rest = nnx.split(
            nnx.eval_shape(
                lambda: DebertaV2ForMaskedLM(
                    self.generator_config,
                    rngs=nnx.Rngs(params=0),
                    compute=self.compute,
                )
            ),
            nnx.Param,
            ...,
        )
        weights = nnx.to_pure_dict(nnx.state(self.generator, nnx.Param))
        last = nnx.to_pure_dict(nnx.state(self.enhanced_mask_decoder.layer, nnx.Param))
        encoder = weights["deberta"]["encoder"]
        if self.compute.scan_layers:
            encoder["layers"] = jax.tree.map(
                lambda stack, x: jnp.concatenate([stack, x[None]]), encoder["layers"], last
            )
        else:
            encoder["layers"][len(encoder["layers"])] = last
        nnx.replace_by_pure_dict(target, weights)
        return nnx.merge(graphdef, target, rest)

    def import_models(
        self,
        *,
        generator: DebertaV2ForMaskedLM | None = None,
        discriminator: DebertaV2ForReplacedTokenDetection | None = None,
    ) -> None:
        """The inverse of the exports, for continued pretraining: copies standalone models in.

        The generator goes first (it holds E_G); under GDES the discriminator's tables become
        E_delta = E_D - E_G, so that the table it reads is exactly its own. Under ES the shared
        table takes the discriminator's values when a discriminator is given. With the EMD, the
        generator's last layer becomes the EMD layer; the EMD position table, which standalone
        (HF) generators do not have, keeps its current values.
        """
        if generator is not None:
            weights = nnx.to_pure_dict(nnx.state(generator, nnx.Param))
            if self.enhanced_mask_decoder is not None:
                weights, last = _split_last_layer(weights, self.compute.scan_layers)
                _copy_weights(self.enhanced_mask_decoder.layer, last, "generator's last layer")
            _copy_weights(self.generator, weights, "generator")
        if discriminator is not None:
            _copy_weights(
                self.discriminator,
                nnx.to_pure_dict(nnx.state(discriminator, nnx.Param)),
                "discriminator",
            )
            if self.sharing == "gdes":
                g, d = self.generator.deberta.embeddings, self.discriminator.deberta.embeddings
                for gt, dt in zip(_absolute_tables(g), _absolute_tables(d), strict=True):
                    dt.embedding[...] = dt.embedding[...] - gt.embedding[...]


def _split_last_layer(weights: dict, scan_layers: bool) -> tuple[dict, dict]:
    """(weights without the encoder's last layer, that layer) of a pure-dict model state."""
    layers = weights["deberta"]["encoder"]["layers"]
    if scan_layers:
        last = jax.tree.map(lambda x: x[-1], layers)
        weights["deberta"]["encoder"]["layers"] = jax.tree.map(lambda x: x[:-1], layers)
    else:
        last = layers.pop(max(layers))
    return weights, last


def _copy_weights(module: nnx.Module, weights: dict, name: str) -> None:
    """Writes a pure dict of arrays into `module`'s Params; the trees and shapes must match."""
    state = nnx.state(module, nnx.Param)
    ours, theirs = _shapes(nnx.to_pure_dict(state)), _shapes(weights)
    if ours != theirs:
        wrong = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
        raise ValueError(
            f"cannot load the {name}: its parameters do not match the pair's "
            f"(first differences, path and shape: {wrong}); was it built from the same config?"
        )
    nnx.replace_by_pure_dict(state, weights)
    nnx.update(module, state)


def _shapes(tree: dict) -> dict[str, tuple[int, ...]]:
    return {
        jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def _absolute_tables(embeddings: nnx.Module) -> list[nnx.Embed]:
    """The word table and, with position_biased_input, the absolute position table."""
    tables = [embeddings.word_embeddings]
    if embeddings.position_embeddings is not None:
        tables.append(embeddings.position_embeddings)
    return tables


def _check_emd(gen_config: DebertaV2Config) -> None:
    if gen_config.position_biased_input:
        raise ConfigError(
            "generator.enhanced_mask_decoder needs model.position_biased_input false: with "
            "absolute positions in the input the official recipe has no EMD"
        )
    if gen_config.num_hidden_layers < 2:
        raise ConfigError(
            "generator.enhanced_mask_decoder needs generator.num_hidden_layers >= 2 (the EMD "
            f"reuses the last layer), got {gen_config.num_hidden_layers}"
        )
