"""Continued pretraining: start the generator / discriminator pair from Hugging Face directories.

    init.discriminator_from_hf: DIR   # our export's OUT/discriminator, a deberta-v3 download...
    init.generator_from_hf: DIR       # our export's OUT/generator
(DIR may be a gs:// URL: it is read through a temporary local copy.)

`init_pair_from_hf` overwrites the freshly initialised parameters of a pair with the tensors of
those directories, keeping every parameter's dtype and sharding (it only writes to the devices,
never reads parameters back, so it works on a pod). The optimizer state is left as initialised
(Adam's moments start at zero either way).

The HF model must have the run's architecture: every tensor of the backbone must be there with
the run's shape, and the config.json settings that shapes cannot reveal (activation, LayerNorm
eps, relative-position settings...) must agree; otherwise one HFInitError lists every difference,
naming each tensor with both shapes. Heads are optional: a missing RTD head (`mask_predictions.*`,
absent from a plain encoder) keeps its fresh initialisation, with a warning. The MLM head may be
in either HF layout (cls.predictions.* or lm_predictions.lm_head.*).

The tensors go in through `ElectraPair.import_weights`, which holds the rules between the pair
and standalone models: GDES (the pair stores E_G and E_delta = E_D - E_G; without a generator
directory, E_G = E_D), ES (the discriminator's table wins), and the enhanced mask decoder (the
generator export's last layer is the EMD layer). In float32, fl(a + fl(fl(a + b) - a)) =
fl(a + b), so a table exported by us comes back bit for bit. Our generator export keeps the
EMD's position table under EMD_POSITIONS_KEY; a run with generator.enhanced_mask_decoder takes
it back from there.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import numpy as np

from debertina_jax import storage
from debertina_jax.config import Config, generator_model_config
from debertina_jax.config.model import DebertaV2Config
from debertina_jax.hf.convert import hf_shapes, params_from_state_dict
from debertina_jax.hf.files import read_hf_config, read_hf_weights, read_weights_metadata
from debertina_jax.hf.names import (
    BASE_PREFIX,
    EMD_METADATA_KEY,
    EMD_POSITIONS_KEY,
    POSITION_KEY,
    RTD_HEAD,
    WORD_KEY,
    to_mlm_layout,
    with_base_prefix,
)
from debertina_jax.model.electra import ElectraPair
from debertina_jax.model.params import ParamPath

log = logging.getLogger(__name__)

MAX_LISTED = 30  # problems listed in one error
# Settings that change the computation without changing any tensor's shape.
_SEMANTIC_FIELDS = (
    "hidden_act",
    "layer_norm_eps",
    "relative_attention",
    "relative_max_position",
    "relative_span",
    "layer_norm_rel_embeddings",
    "share_att_key",
    "pos_att_type",
    "position_biased_input",
    "conv_act",
    "head_dim",
)


class HFInitError(ValueError):
    """An HF directory that does not fit the run's model (names, shapes or settings)."""


def init_pair_from_hf(pair: ElectraPair, config: Config) -> None:
    """Loads config.init.generator_from_hf and config.init.discriminator_from_hf into `pair`."""
    generator = emd_positions = discriminator = None
    if config.init.generator_from_hf:
        generator, emd_positions = _generator(pair, config, config.init.generator_from_hf)
    if config.init.discriminator_from_hf:
        discriminator = _discriminator(pair, config, config.init.discriminator_from_hf)
    pair.import_weights(
        generator=generator, discriminator=discriminator, emd_positions=emd_positions
    )


# ---- reading and checking a directory ------------------------------------------------------------
@dataclasses.dataclass
class _HFDir:
    key: str  # the config key that named it, for messages
    path: Path | str  # a directory or a gs:// URL
    config: DebertaV2Config
    tensors: dict[str, np.ndarray]  # float32, backbone keys with the "deberta." prefix
    emd: bool | None  # what our export's metadata says; None: not written by us


def _read_dir(key: str, path: str) -> _HFDir:
    where = f"{key}={path}"
    if storage.is_remote(storage.check_path(path, key)):
        # The HF readers (safetensors, torch) want local files: read a copy of the directory.
        if not storage.is_dir(path):
            raise FileNotFoundError(f"{where}: not a directory: {path}")
        with tempfile.TemporaryDirectory(prefix="debertina-hf-") as local:
            storage.copy_tree(path, local)
            return dataclasses.replace(_read_dir(key, local), path=path)
    path = Path(path)
    try:
        hf_config = read_hf_config(path)
        raw = read_hf_weights(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{where}: {e}") from None
    except ValueError as e:
        raise HFInitError(f"{where}: {e}") from None
    tensors = {k: np.asarray(v, np.float32) for k, v in with_base_prefix(raw, base=False).items()}
    flag = read_weights_metadata(path).get(EMD_METADATA_KEY)
    return _HFDir(key, path, hf_config, tensors, None if flag is None else flag == "true")


def _check(
    source: _HFDir,
    expected: dict[str, tuple[int, ...]],
    run_config: DebertaV2Config,
    optional: tuple[str, ...] = (),
) -> None:
    """One HFInitError listing every differing setting and every missing, extra or mis-shaped
    tensor (settings first: they explain the tensors)."""
    problems = []
    rows = expected.get(WORD_KEY, (0,))[0]
    if WORD_KEY in source.tensors and source.tensors[WORD_KEY].shape[0] != rows:
        problems.append(
            f"vocabulary: the HF model has {source.tensors[WORD_KEY].shape[0]} rows, this run "
            f"{rows} (model.vocab_size); continue with the HF model's tokenizer "
            "(data.tokenizer_dir) and its vocab_size"
        )
    for field in _SEMANTIC_FIELDS:
        ours, theirs = getattr(run_config, field), getattr(source.config, field)
        if field == "pos_att_type":
            ours, theirs = sorted(ours), sorted(theirs)
        if ours != theirs:
            problems.append(f"setting {field}: HF {theirs!r}, this run {ours!r}")
    for name, shape in expected.items():
        if name not in source.tensors:
            if not name.startswith(optional):
                problems.append(f"missing tensor {name} (this run: {shape})")
        elif source.tensors[name].shape != shape:
            problems.append(f"tensor {name}: HF {source.tensors[name].shape}, this run {shape}")
    # An absolute position table the run does not use is ignored, as HF does (and it may be an
    # EMD table); any other backbone tensor the run lacks means a different architecture.
    problems += [
        f"tensor {name} is not in this run's model"
        for name in sorted(source.tensors)
        if name.startswith(BASE_PREFIX) and name not in expected and name != POSITION_KEY
    ]
    if problems:
        more = len(problems) - MAX_LISTED
        shown = problems[:MAX_LISTED] + ([f"... and {more} more"] if more > 0 else [])
        raise HFInitError(
            f"{source.key}={source.path} does not fit this run's model:\n  " + "\n  ".join(shown)
        )


def _not_used(source: _HFDir, used: set[str]) -> None:
    unused = sorted(k for k in source.tensors if k not in used)
    if unused:
        log.info("%s: not used: %s", source.key, ", ".join(unused))


# ---- the two models ------------------------------------------------------------------------------
def _generator(
    pair: ElectraPair, config: Config, path: str
) -> tuple[dict[ParamPath, np.ndarray], np.ndarray | None]:
    """(the generator's weights by parameter path of the standalone generator, the EMD position
    table or None), checked against the run."""
    source = _read_dir("init.generator_from_hf", path)
    gen_config = generator_model_config(config)
    source.tensors = to_mlm_layout(source.tensors, gen_config.legacy)
    standalone = pair.abstract_generator()
    expected = hf_shapes(standalone)
    _check(source, expected, gen_config)
    used = set(expected)

    emd = pair.enhanced_mask_decoder
    positions = None
    if emd is None:
        if source.emd:
            log.warning(
                "%s was trained with the enhanced mask decoder; this run has none, so its last "
                "layer becomes a plain layer and the EMD position table is dropped",
                path,
            )
    else:
        table = emd.position_embeddings.embedding
        if EMD_POSITIONS_KEY not in source.tensors:
            log.warning(
                "%s has no %s (not an EMD generator export): the enhanced mask decoder keeps its "
                "fresh position table",
                path,
                EMD_POSITIONS_KEY,
            )
        elif source.tensors[EMD_POSITIONS_KEY].shape != table.shape:
            raise HFInitError(
                f"init.generator_from_hf={path}: tensor {EMD_POSITIONS_KEY} (the EMD position "
                f"table): HF {source.tensors[EMD_POSITIONS_KEY].shape}, this run {table.shape}"
            )
        else:
            positions = source.tensors[EMD_POSITIONS_KEY]
            used.add(EMD_POSITIONS_KEY)
        if source.emd is False:
            log.warning("%s was trained without the EMD; its last layer becomes the EMD", path)
    _not_used(source, used)
    return params_from_state_dict(standalone, source.tensors), positions


def _discriminator(pair: ElectraPair, config: Config, path: str) -> dict[ParamPath, np.ndarray]:
    """The discriminator's weights by parameter path, checked against the run."""
    source = _read_dir("init.discriminator_from_hf", path)
    expected = hf_shapes(pair.discriminator)
    _check(source, expected, config.model, optional=(RTD_HEAD,))
    if not any(k.startswith(RTD_HEAD) for k in source.tensors):
        log.warning(
            "%s has no RTD head (mask_predictions.*): it starts from a fresh initialisation", path
        )
    _not_used(source, set(expected))
    return params_from_state_dict(pair.discriminator, source.tensors)
