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
(E_D = E_G + E_delta), for checkpoint loading and conversion to HF; `import_models` /
`import_weights` are their inverse, for continued pretraining.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from debertina_jax.config import Config, generator_model_config
from debertina_jax.config.model import DebertaV2Config
from debertina_jax.model.blocks import embed, gather_positions, split_key
from debertina_jax.model.compute import DEFAULT_COMPUTE, Compute
from debertina_jax.model.layers import Encoder, EncoderLayer
from debertina_jax.model.models import DebertaV2ForMaskedLM, DebertaV2ForReplacedTokenDetection
from debertina_jax.model.params import ParamPath, host_params, params_by_path, set_params

log = logging.getLogger(__name__)

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
        if config.generator.enhanced_mask_decoder:  # Config has checked its needs (run.py)
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

    # ---- export and import ---------------------------------------------------------------
    # The rules between the pair and standalone models live here only: the GDES merge
    # (E_D = E_G + E_delta) and split (E_delta = E_D - E_G), and the EMD layer as the
    # standalone generator's last layer. hf/init.py imports HF directories through them.
    def export_discriminator(self) -> DebertaV2ForReplacedTokenDetection:
        """A standalone discriminator whose tables are the ones it reads (GDES: E_G + E_delta)."""
        merged = self._gdes_tables()
        disc = nnx.clone(self.discriminator)  # ES: the copy gets its own copy of E_G
        for table, value in zip(_absolute_tables(disc.deberta.embeddings), merged, strict=False):
            table.embedding[...] = value  # GDES only: `merged` is empty otherwise
        return disc

    def abstract_generator(self) -> DebertaV2ForMaskedLM:
        """The standalone generator's structure (nnx.eval_shape: no arrays), full depth."""
        return nnx.eval_shape(
            lambda: DebertaV2ForMaskedLM(
                self.generator_config, rngs=nnx.Rngs(params=0), compute=self.compute
            )
        )

    def export_generator(self) -> DebertaV2ForMaskedLM:
        """A standalone generator; with the EMD, its layer becomes the backbone's last layer
        (the official generator's weights as HF lays them out; HF does not run the EMD)."""
        if self.enhanced_mask_decoder is None:
            return nnx.clone(self.generator)
        graphdef, target, rest = nnx.split(self.abstract_generator(), nnx.Param, ...)
        weights = _join_last_layer(
            _arrays(self.generator),
            _arrays(self.enhanced_mask_decoder.layer),
            self.generator_config.num_hidden_layers - 1,
            self.compute.scan_layers,
        )
        nnx.replace_by_pure_dict(target, traverse_util.unflatten_dict(weights))
        return nnx.merge(graphdef, target, rest)

    def import_models(
        self,
        *,
        generator: DebertaV2ForMaskedLM | None = None,
        discriminator: DebertaV2ForReplacedTokenDetection | None = None,
    ) -> None:
        """The inverse of the exports: copies standalone models of this pair's config in (see
        `import_weights`). The EMD position table, which standalone (HF) generators do not
        have, keeps its current values."""
        if generator is not None:
            generator = host_params(generator)
            _check_complete(generator, self.abstract_generator(), "generator")
        if discriminator is not None:
            discriminator = host_params(discriminator)
            _check_complete(discriminator, self.discriminator, "discriminator")
        self.import_weights(generator=generator, discriminator=discriminator)

    def import_weights(
        self,
        *,
        generator: dict[ParamPath, np.ndarray] | None = None,
        discriminator: dict[ParamPath, np.ndarray] | None = None,
        emd_positions: np.ndarray | None = None,
    ) -> None:
        """Writes host arrays of standalone models (by their parameter paths: `abstract_generator`
        and `discriminator`'s) into the pair; parameters left out keep their values. Each
        parameter keeps its dtype and sharding (model.params.set_params).

        The generator goes first (it holds E_G). With the EMD, the generator's last layer
        becomes the EMD layer, and `emd_positions` (if given) its position table. Under GDES
        the discriminator's tables become E_delta = E_D - E_G, so that the table it reads is
        exactly its own; without a generator, the generator starts from the discriminator's
        tables (E_G = E_D, E_delta = 0). Under ES the shared table takes the discriminator's
        values; NES imports both tables as they are.
        """
        emd = self.enhanced_mask_decoder
        generator_tables = None
        if generator is not None:
            if emd is not None:
                depth = self.generator_config.num_hidden_layers
                generator, last = _split_last_layer(generator, depth, self.compute.scan_layers)
                set_params(emd.layer, last)
            set_params(self.generator, generator)
            generator_tables = _tables(self.generator, generator)
        if emd_positions is not None:
            set_params(emd, {("position_embeddings", "embedding"): emd_positions})
        if discriminator is None:
            return
        discriminator = dict(discriminator)
        tables = _tables(self.discriminator, discriminator)
        if self.sharing == "gdes":
            if generator_tables is None:
                set_params(self.generator, tables)
                generator_tables = tables
            for path, e_d in tables.items():
                discriminator[path] = e_d - generator_tables[path]  # E_delta = E_D - E_G
        elif self.sharing == "es" and generator_tables is not None:
            if any(not np.array_equal(generator_tables[p], tables[p]) for p in tables):
                log.warning(
                    "embedding_sharing es: the generator's and the discriminator's imported "
                    "tables differ; the shared table takes the discriminator's"
                )
        set_params(self.discriminator, discriminator)


_LAYERS = ("deberta", "encoder", "layers")  # the encoder's layers in a model's parameter paths


def _split_last_layer(
    weights: dict[ParamPath, np.ndarray], depth: int, scan_layers: bool
) -> tuple[dict[ParamPath, np.ndarray], dict[ParamPath, np.ndarray]]:
    """(a generator's weights without its encoder's last layer, that layer's by paths inside
    the layer), for a generator of `depth` layers."""
    body, last = {}, {}
    n = len(_LAYERS)
    for path, value in weights.items():
        if path[:n] != _LAYERS:
            body[path] = value
        elif scan_layers:  # one stacked parameter per layer parameter
            body[path], last[path[n:]] = value[:-1], value[-1]
        elif path[n] == depth - 1:
            last[path[n + 1 :]] = value
        else:
            body[path] = value
    return body, last


def _join_last_layer(
    body: dict[ParamPath, jax.Array],
    last: dict[ParamPath, jax.Array],
    body_depth: int,
    scan_layers: bool,
) -> dict[ParamPath, jax.Array]:
    """The inverse of `_split_last_layer`: `last` appended to the body's `body_depth` layers."""
    out = dict(body)
    for inner, value in last.items():
        if scan_layers:
            out[_LAYERS + inner] = jnp.concatenate([body[_LAYERS + inner], value[None]])
        else:
            out[(*_LAYERS, body_depth, *inner)] = value
    return out


def _arrays(module: nnx.Module) -> dict[ParamPath, jax.Array]:
    return {path: param[...] for path, param in params_by_path(module).items()}


def _check_complete(weights: dict[ParamPath, np.ndarray], like: nnx.Module, name: str) -> None:
    """A standalone model must have exactly the parameters (paths and shapes) of `like`."""
    ours = {path: tuple(p.shape) for path, p in params_by_path(like).items()}
    theirs = {path: np.shape(value) for path, value in weights.items()}
    if ours != theirs:
        wrong = sorted(set(ours.items()) ^ set(theirs.items()), key=str)[:3]
        raise ValueError(
            f"cannot load the {name}: its parameters do not match the pair's "
            f"(first differences, path and shape: {wrong}); was it built from the same config?"
        )


def _table_names(embeddings: nnx.Module) -> list[str]:
    """The absolute tables: the word table and, with position_biased_input, the positions."""
    names = ("word_embeddings", "position_embeddings")
    return [name for name in names if getattr(embeddings, name) is not None]


def _absolute_tables(embeddings: nnx.Module) -> list[nnx.Embed]:
    return [getattr(embeddings, name) for name in _table_names(embeddings)]


def _tables(model: nnx.Module, weights: dict[ParamPath, np.ndarray]) -> dict[ParamPath, np.ndarray]:
    """The absolute tables among a model's `weights`, by path."""
    paths = [
        ("deberta", "embeddings", name, "embedding")
        for name in _table_names(model.deberta.embeddings)
    ]
    return {path: weights[path] for path in paths if path in weights}
