"""Continued pretraining: start the generator / discriminator pair from Hugging Face directories.

    init.discriminator_from_hf: DIR   # our export's OUT/discriminator, a deberta-v3 download...
    init.generator_from_hf: DIR       # our export's OUT/generator

`init_state_from_hf` overwrites the freshly initialised parameters of a train state with the
tensors of those directories, keeping every parameter's dtype and sharding (it only writes to
the devices, never reads parameters back, so it works on a pod). The optimizer state is left as
initialised (Adam's moments start at zero either way).

The HF model must have the run's architecture: every tensor of the backbone must be there with
the run's shape, and the config.json settings that shapes cannot reveal (activation, LayerNorm
eps, relative-position settings...) must agree; otherwise one HFInitError lists every difference,
naming each tensor with both shapes. Heads are optional: a missing RTD head (`mask_predictions.*`,
absent from a plain encoder) keeps its fresh initialisation, with a warning. The MLM head may be
in either HF layout (cls.predictions.* or lm_predictions.lm_head.*).

Embedding sharing: the discriminator's table as HF stores it is the one it reads, E_D.
- gdes: the pair stores E_G (the generator's table) and E_delta, and the discriminator reads
  E_G + E_delta. E_G comes from the generator import; without one, the generator starts from
  E_D (E_G = E_D). Then E_delta = E_D - E_G, so that E_G + E_delta reproduces E_D exactly (in
  float32, fl(a + fl(fl(a + b) - a)) = fl(a + b), so a table exported by us comes back bit for
  bit). The same holds for absolute position tables (position_biased_input).
- es: one table; the discriminator's import is written last, so E_D wins.
- nes: two independent tables.
Enhanced mask decoder: our generator export puts the EMD layer last and its position table under
EMD_POSITIONS_KEY; a run with generator.enhanced_mask_decoder takes them back from there.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from debertina_jax.config import Config, generator_model_config
from debertina_jax.config.model import DebertaV2Config
from debertina_jax.hf.convert import CONFIG_NAME, SAFETENSORS_NAME, read_hf_weights
from debertina_jax.hf.names import TensorName, tensor_names
from debertina_jax.model.electra import ElectraPair
from debertina_jax.model.models import DebertaV2ForMaskedLM, DebertaV2Model

log = logging.getLogger(__name__)

TrainState = dict[str, Any]

WORD_KEY = "deberta.embeddings.word_embeddings.weight"
POSITION_KEY = "deberta.embeddings.position_embeddings.weight"
# Our generator export keeps the EMD's position table under the name of an absolute position
# table: HF's DebertaV2 classes ignore it on load (their _keys_to_ignore_on_load_unexpected), and
# the official DeBERTa code keeps the EMD's table there too. EMD generators have no absolute
# positions in their input, so the name is free. The safetensors metadata flags such files.
EMD_POSITIONS_KEY = POSITION_KEY
EMD_METADATA_KEY = "debertina_enhanced_mask_decoder"  # "true" / "false"
RTD_HEAD = "mask_predictions."
# The two HF layouts of the MLM head (same math when the decoder is tied): legacy -> other.
_MLM_LAYOUTS = {
    "cls.predictions.transform.dense.": "lm_predictions.lm_head.dense.",
    "cls.predictions.transform.LayerNorm.": "lm_predictions.lm_head.LayerNorm.",
    "cls.predictions.bias": "lm_predictions.lm_head.bias",
}
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


# ---- entry points --------------------------------------------------------------------------------
def init_state_from_hf(config: Config, graphdef: nnx.GraphDef, state: TrainState) -> TrainState:
    """The train state with its parameters taken from config.init's HF directories."""
    pair = nnx.merge(graphdef, state["params"])
    init_pair_from_hf(pair, config)
    return {**state, "params": nnx.state(pair, nnx.Param)}


def init_pair_from_hf(pair: ElectraPair, config: Config) -> None:
    """Loads config.init.generator_from_hf, then config.init.discriminator_from_hf, into `pair`."""
    generator_tables = None
    if config.init.generator_from_hf:
        generator_tables = _load_generator(pair, config, Path(config.init.generator_from_hf))
    if config.init.discriminator_from_hf:
        _load_discriminator(pair, config, Path(config.init.discriminator_from_hf), generator_tables)


# ---- reading and checking a directory ------------------------------------------------------------
@dataclasses.dataclass
class _HFDir:
    key: str  # the config key that named it, for messages
    path: Path
    config: DebertaV2Config
    tensors: dict[str, np.ndarray]  # float32, backbone keys with the "deberta." prefix
    emd: bool | None  # what our export's metadata says; None: not written by us


def _read_dir(key: str, path: Path) -> _HFDir:
    where = f"{key}={path}"
    if not path.is_dir():
        raise FileNotFoundError(f"{where}: not a directory")
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{where}: no {CONFIG_NAME}, not a Hugging Face model directory")
    try:
        hf_config = DebertaV2Config.from_json_file(path / CONFIG_NAME)
        raw = read_hf_weights(path)
    except ValueError as e:
        raise HFInitError(f"{where}: {e}") from None
    tensors = {}
    for name, value in raw.items():
        if name.startswith(("embeddings.", "encoder.")):  # a bare DebertaV2Model's keys
            name = "deberta." + name
        tensors[name] = np.asarray(value, np.float32)
    return _HFDir(key, path, hf_config, tensors, _emd_flag(path))


def _emd_flag(path: Path) -> bool | None:
    if not (path / SAFETENSORS_NAME).is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path / SAFETENSORS_NAME), "np") as f:
        value = (f.metadata() or {}).get(EMD_METADATA_KEY)
    return None if value is None else value == "true"


def _expected(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """HF key -> HF shape of every tensor of `model` (a real or an abstract one)."""
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    return {t.hf_key: t.hf_shape(tuple(params[t.path].shape)) for t in tensor_names(model)}


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
        if name.startswith("deberta.") and name not in expected and name != POSITION_KEY
    ]
    if problems:
        more = len(problems) - MAX_LISTED
        shown = problems[:MAX_LISTED] + ([f"... and {more} more"] if more > 0 else [])
        raise HFInitError(
            f"{source.key}={source.path} does not fit this run's model:\n  " + "\n  ".join(shown)
        )


def _ignored(source: _HFDir, used: set[str]) -> None:
    unused = sorted(k for k in source.tensors if k not in used)
    if unused:
        log.info("%s: not used: %s", source.key, ", ".join(unused))


# ---- writing parameters --------------------------------------------------------------------------
def _put(param: nnx.Variable, value: np.ndarray) -> None:
    """Writes a host value into `param` with its dtype and sharding; each device gets its slice,
    so no process needs the whole array on a device."""
    old = param[...]
    value = np.asarray(value, old.dtype)
    param[...] = jax.make_array_from_callback(value.shape, old.sharding, lambda i: value[i])


def _assign(
    params: dict[tuple, nnx.Variable], names: list[TensorName], tensors: dict[str, np.ndarray]
) -> None:
    """Sets the parameters whose HF keys are in `tensors`; a stacked (scan) parameter is set only
    from all of its layers."""
    stacks: dict[tuple, dict[int, np.ndarray]] = {}
    for t in names:
        if t.hf_key not in tensors:
            continue
        value = t.from_hf(tensors[t.hf_key])
        if t.layer is None:
            _put(params[t.path], value)
        else:
            stacks.setdefault(t.path, {})[t.layer] = value
    for path, layers in stacks.items():
        depth = params[path][...].shape[0]
        if sorted(layers) != list(range(depth)):
            raise ValueError(f"stacked {path} needs all {depth} layers, got {sorted(layers)}")
        _put(params[path], np.stack([layers[i] for i in range(depth)]))


def _assign_model(model: nnx.Module, tensors: dict[str, np.ndarray]) -> None:
    _assign(dict(nnx.to_flat_state(nnx.state(model, nnx.Param))), tensor_names(model), tensors)


# ---- the generator -------------------------------------------------------------------------------
def _to_layout(tensors: dict[str, np.ndarray], legacy: bool) -> dict[str, np.ndarray]:
    """The MLM head renamed to the run's layout (config.model.legacy)."""
    renames = {v: k for k, v in _MLM_LAYOUTS.items()} if legacy else _MLM_LAYOUTS
    out = {}
    for name, value in tensors.items():
        for old, new in renames.items():
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        out[name] = value
    return out


def _load_generator(pair: ElectraPair, config: Config, path: Path) -> dict[str, np.ndarray]:
    """Loads the generator (and its EMD); returns its absolute tables by HF key (for GDES)."""
    source = _read_dir("init.generator_from_hf", path)
    gen_config = generator_model_config(config)
    source.tensors = _to_layout(source.tensors, gen_config.legacy)
    full = nnx.eval_shape(lambda: DebertaV2ForMaskedLM(gen_config, rngs=nnx.Rngs(0)))
    expected = _expected(full)
    emd = pair.enhanced_mask_decoder
    _check(source, expected, gen_config)
    used = set(expected)

    if emd is None:
        if source.emd:
            log.warning(
                "%s was trained with the enhanced mask decoder; this run has none, so its last "
                "layer becomes a plain layer and the EMD position table is dropped",
                path,
            )
        _assign_model(pair.generator, source.tensors)
    else:
        last = f"deberta.encoder.layer.{gen_config.num_hidden_layers - 1}."
        body = {k: v for k, v in source.tensors.items() if not k.startswith(last)}
        _assign_model(pair.generator, body)
        emd_params = dict(nnx.to_flat_state(nnx.state(emd.layer, nnx.Param)))
        _assign(emd_params, _layer_names(gen_config, last), source.tensors)
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
            _put(table, source.tensors[EMD_POSITIONS_KEY])
            used.add(EMD_POSITIONS_KEY)
        if source.emd is False:
            log.warning("%s was trained without the EMD; its last layer becomes the EMD", path)
    _ignored(source, used)
    return {k: source.tensors[k] for k in (WORD_KEY, POSITION_KEY) if k in expected}


def _layer_names(config: DebertaV2Config, prefix: str) -> list[TensorName]:
    """Names of one EncoderLayer's parameters (paths inside the layer) under HF `prefix`."""
    probe = nnx.eval_shape(
        lambda: DebertaV2Model(config.replace(num_hidden_layers=1), rngs=nnx.Rngs(0))
    )
    layer0 = "encoder.layer.0."
    return [
        dataclasses.replace(t, hf_key=prefix + t.hf_key[len(layer0) :], path=t.path[3:])
        for t in tensor_names(probe)
        if t.path[:3] == ("encoder", "layers", 0)
    ]


# ---- the discriminator ---------------------------------------------------------------------------
def _load_discriminator(
    pair: ElectraPair,
    config: Config,
    path: Path,
    generator_tables: dict[str, np.ndarray] | None,
) -> None:
    source = _read_dir("init.discriminator_from_hf", path)
    expected = _expected(pair.discriminator)
    _check(source, expected, config.model, optional=(RTD_HEAD,))
    if not any(k.startswith(RTD_HEAD) for k in source.tensors):
        log.warning(
            "%s has no RTD head (mask_predictions.*): it starts from a fresh initialisation", path
        )
    tensors = {k: source.tensors[k] for k in expected if k in source.tensors}
    if pair.sharing == "gdes":
        tables = {k: v for k, v in tensors.items() if k in (WORD_KEY, POSITION_KEY)}
        if generator_tables is None:
            # No generator import: the generator starts from the discriminator's tables.
            _assign_model(pair.generator, tables)
            generator_tables = tables
        for key, merged in tables.items():
            tensors[key] = merged - generator_tables[key]  # E_delta = E_D - E_G
    elif pair.sharing == "es" and generator_tables is not None:
        if any(not np.array_equal(generator_tables[k], tensors[k]) for k in generator_tables):
            log.warning(
                "embedding_sharing es: the generator's and the discriminator's imported tables "
                "differ; the shared table takes the discriminator's"
            )
    _assign_model(pair.discriminator, tensors)
    _ignored(source, set(tensors))
