"""A pretraining run -> Hugging Face PyTorch directories, written atomically and verified.

    export("runs/tiny", "hf/tiny")    # what `python convert_to_pt.py` runs

writes
    OUT/discriminator/  config.json (architectures DebertaV2Model), model.safetensors with the
                        GDES table merged (E_G + E_delta) and the RTD head as mask_predictions.*,
                        the run's tokenizer files, README.md (model card)
    OUT/generator/      the same for the DebertaV2ForMaskedLM generator

Everything is written into a hidden temporary directory next to OUT and renamed into place at
the end, so an interrupted export never leaves a half-written model under OUT. Verification (on
by default) reads the written directories back with `transformers` and with our own reader and
compares them with the checkpoint; see `verify` and docs/export.md for what is compared and the
tolerances.

Enhanced mask decoder (EMD): HF has no EMD, so the generator is written as a plain MaskedLM whose
last layer is the EMD layer (see ElectraPair.export_generator); HF runs that layer once, on the
hidden states, instead of twice on position-enriched queries. The EMD's absolute position table
is kept as `deberta.embeddings.position_embeddings.weight`, a name every HF DeBERTa-v2 class
ignores on load, and the safetensors metadata says the file holds an EMD generator, so that
`hf_init` can read it back losslessly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from debertina_jax.config import Config
from debertina_jax.config.model import DebertaV2Config
from debertina_jax.data.tokenizer import Tokenizer
from debertina_jax.export.checkpoint import load_checkpoint
from debertina_jax.hf.convert import from_hf, model_to_state_dict
from debertina_jax.hf.files import CONFIG_NAME, SAFETENSORS_NAME, read_hf_weights
from debertina_jax.hf.names import EMD_METADATA_KEY, EMD_POSITIONS_KEY
from debertina_jax.model.models import DebertaV2ForMaskedLM, DebertaV2ForReplacedTokenDetection
from debertina_jax.runtime.metrics_log import read_metrics

log = logging.getLogger(__name__)

MODELS = ("discriminator", "generator")
EXPORT_DTYPES: dict[str, Any] = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}
# The tokenizer files of tokenizer.export_tokenizer; the first two are required.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spm.model",
)
README_NAME = "README.md"
# HF architectures written to config.json. The discriminator is a plain encoder for HF: HF has no
# RTD class, and fine-tuning starts from the encoder (mask_predictions.* is reported unused).
HF_ARCHITECTURES = {"discriminator": "DebertaV2Model", "generator": "DebertaV2ForMaskedLM"}
# Our class for a lossless re-import of each directory.
OUR_ARCHITECTURES = {
    "discriminator": "DebertaV2ForReplacedTokenDetection",
    "generator": "DebertaV2ForMaskedLM",
}


class ExportError(ValueError):
    """Bad export arguments or weights that cannot be written as asked."""


class OutputPathError(ExportError):
    """The output path is a file, or a non-empty directory without overwrite."""


class Float16OverflowError(ExportError):
    """A tensor holds values beyond float16's range."""


# ---- what is exported ----------------------------------------------------------------------------
@dataclass
class ExportSource:
    """One checkpoint of a run, ready to write: standalone models and what the model card says."""

    generator: DebertaV2ForMaskedLM  # with the EMD, its layer is the last one
    discriminator: DebertaV2ForReplacedTokenDetection  # GDES table merged
    emd_positions: np.ndarray | None  # the EMD's absolute position table, if the run has one
    config: Config
    tokenizer_dir: Path
    step: int
    tokens_seen: int | None
    eval_metrics: dict[str, Any] | None  # the last eval row of metrics.jsonl up to `step`


def load_source(workdir: str | os.PathLike, step: int | None = None) -> ExportSource:
    """Restores checkpoint `step` (default: the latest) of `workdir` onto one CPU device."""
    workdir = Path(workdir)
    run = load_checkpoint(workdir, step)
    missing = [n for n in TOKENIZER_FILES[:2] if not (run.tokenizer_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the run's tokenizer directory {run.tokenizer_dir} lacks {', '.join(missing)}"
        )
    return ExportSource(
        generator=run.generator,
        discriminator=run.discriminator,
        emd_positions=run.emd_positions,
        config=run.config,
        tokenizer_dir=run.tokenizer_dir,
        step=run.step,
        tokens_seen=run.meta.get("tokens_seen"),
        eval_metrics=_last_eval(workdir, run.step),
    )


def _last_eval(workdir: Path, step: int) -> dict[str, Any] | None:
    try:
        rows = [r for r in read_metrics(workdir, split="eval") if r.get("step", 0) <= step]
    except (FileNotFoundError, ValueError) as e:
        log.warning("no eval metrics for the model card: %s", e)
        return None
    return rows[-1] if rows else None


# ---- tensors -------------------------------------------------------------------------------------
def check_dtype(dtype: str) -> None:
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"unsupported dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")


def export_tensors(source: ExportSource, which: str) -> dict[str, np.ndarray]:
    """The float32 HF tensors of the discriminator or the generator, as they are written."""
    if which == "discriminator":
        return model_to_state_dict(source.discriminator)
    tensors = model_to_state_dict(source.generator)
    if source.emd_positions is not None:
        tensors[EMD_POSITIONS_KEY] = np.asarray(source.emd_positions, np.float32)
    return tensors


def cast_tensors(tensors: dict[str, np.ndarray], dtype: str, label: str) -> dict[str, np.ndarray]:
    """Casts to `dtype`; a non-finite value, or one float16 cannot hold, is an error naming the
    tensor (`label` says which model)."""
    check_dtype(dtype)
    limit = float(np.finfo(np.float16).max)
    out = {}
    for key, value in tensors.items():
        value = np.asarray(value, np.float32)
        if not np.isfinite(value).all():
            raise ExportError(f"{label} tensor {key} holds NaN or infinite values")
        if dtype == "float16":
            peak = float(np.abs(value).max(initial=0.0))
            if peak > limit:
                raise Float16OverflowError(
                    f"{label} tensor {key} does not fit float16: its largest magnitude is "
                    f"{peak:.6g} > {limit:g}; export as bfloat16 or float32 instead"
                )
        out[key] = np.ascontiguousarray(value.astype(EXPORT_DTYPES[dtype]))
    return out


def parameter_counts(tensors: dict[str, np.ndarray], *, emd: bool = False) -> dict[str, int]:
    """Sizes as the DeBERTina card counts them: the word table is "embeddings", the rest of the
    encoder "backbone"; heads (and the EMD's position table, with `emd`) apart."""
    counts = {"embeddings": 0, "backbone": 0, "heads": 0}
    for key, value in tensors.items():
        if emd and key == EMD_POSITIONS_KEY:
            counts["heads"] += value.size
        elif key.endswith("embeddings.word_embeddings.weight"):
            counts["embeddings"] += value.size
        elif key.startswith("deberta."):
            counts["backbone"] += value.size
        else:
            counts["heads"] += value.size
    return counts


# ---- one model directory -------------------------------------------------------------------------
def write_model_dir(
    directory: Path,
    model_config: DebertaV2Config,
    tensors: dict[str, np.ndarray],
    *,
    which: str,
    dtype: str,
    source: ExportSource,
) -> None:
    """config.json, model.safetensors, tokenizer files and README.md for one model."""
    directory.mkdir(parents=True)
    config = model_config.replace(architectures=(HF_ARCHITECTURES[which],)).to_dict()
    config["dtype"] = dtype
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    emd = which == "generator" and source.emd_positions is not None
    metadata = {"format": "pt"}
    if which == "generator":
        metadata[EMD_METADATA_KEY] = str(emd).lower()
    save_file(
        cast_tensors(tensors, dtype, which), str(directory / SAFETENSORS_NAME), metadata=metadata
    )
    for name in TOKENIZER_FILES:
        if (source.tokenizer_dir / name).is_file():
            shutil.copy2(source.tokenizer_dir / name, directory / name)
    (directory / README_NAME).write_text(
        model_card(source, which, model_config, parameter_counts(tensors, emd=emd), dtype)
    )


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def model_card(
    source: ExportSource,
    which: str,
    model_config: DebertaV2Config,
    counts: dict[str, int],
    dtype: str,
) -> str:
    """A short README.md: what the model is, its sizes and training, and how to load it."""
    c = model_config
    total = counts["embeddings"] + counts["backbone"]
    tokens = "unknown" if source.tokens_seen is None else f"{source.tokens_seen:,}"
    if which == "discriminator":
        what = (
            "the ELECTRA-style **discriminator** (replaced-token detection), the model to "
            "fine-tune. The word embeddings are the merged GDES table (E_G + E_delta). The RTD "
            "head is stored as `mask_predictions.*`: transformers does not use it and lists it "
            "as unused when loading; `debertina_jax.hf.convert.from_hf(dir, "
            '"DebertaV2ForReplacedTokenDetection")` reads it back.'
        )
        load = (
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            'path = "path/to/this/directory"\n'
            "tokenizer = AutoTokenizer.from_pretrained(path)\n"
            "model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)"
        )
    else:
        what = (
            "the ELECTRA-style **generator** (masked language model) that trained the "
            "discriminator. It is not the model to fine-tune."
        )
        if source.emd_positions is not None:
            what += (
                "\n\n**Warning: this generator was trained with the enhanced mask decoder "
                "(EMD), which transformers cannot run.** Its last layer is the EMD layer, which "
                "transformers applies once to the hidden states instead of twice to "
                "position-enriched queries, so its predictions differ from the ones seen in "
                "pretraining. The EMD's position table is kept as "
                f"`{EMD_POSITIONS_KEY}` (ignored by transformers) so that debertina-jax can "
                "read the generator back without loss."
            )
        load = (
            "from transformers import pipeline\n\n"
            'fill = pipeline("fill-mask", model="path/to/this/directory")\n'
            'fill("A capital de Portugal é [MASK].")'
        )
    lines = [
        f"# DeBERTa-v3 {which}, pretrained with debertina-jax",
        "",
        f"This directory holds {what}",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | DeBERTa-v3 (`model_type` deberta-v2), {c.num_hidden_layers} layers x "
        f"{c.hidden_size} hidden, {c.num_attention_heads} heads, FFN {c.intermediate_size} |",
        f"| vocabulary | {c.vocab_size} rows (tokenizer: {source.config.data.vocab_size} pieces "
        "+ [MASK]) |",
        f"| parameters | backbone {_count(counts['backbone'])} + embeddings "
        f"{_count(counts['embeddings'])} = {_count(total)} (heads "
        f"{_count(counts['heads'])} more) |",
        f"| weights | `{dtype}` |",
        f"| embedding sharing | {source.config.generator.embedding_sharing} |",
        "",
        "## Pretraining",
        "",
        f"- steps: {source.step:,} (batch {source.config.train.batch_size} x "
        f"{source.config.data.max_seq_length} tokens)",
        f"- tokens seen: {tokens}",
    ]
    if source.eval_metrics:
        shown = {
            k: v
            for k, v in sorted(source.eval_metrics.items())
            if k not in ("step", "split", "time") and isinstance(v, int | float)
        }
        lines.append(f"- held-out evaluation at step {source.eval_metrics.get('step')}:")
        lines += [f"  - {k}: {v:.4g}" for k, v in shown.items()]
    else:
        lines.append("- held-out evaluation: none recorded")
    lines += ["", "## How to load", "", "```python", load, "```", ""]
    return "\n".join(lines)


# ---- writing OUT atomically ----------------------------------------------------------------------
def check_output(output: Path, overwrite: bool, workdir: Path) -> None:
    """A file, a non-empty directory without `overwrite`, or a directory holding the run itself
    (which `overwrite` would delete) is refused before any work."""
    if output.resolve() in (workdir.resolve(), *workdir.resolve().parents):
        raise OutputPathError(
            f"output directory {output} holds the run {workdir}; choose another directory"
        )
    if output.exists() and not output.is_dir():
        raise OutputPathError(f"output path {output} is a file; give a directory path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputPathError(
            f"output directory {output} is not empty; pass --overwrite (overwrite=True) to "
            "replace it"
        )
    if output.parent.exists() and not output.parent.is_dir():
        raise OutputPathError(f"cannot create {output}: {output.parent} is a file")


def _umask_permissions(path: Path) -> None:
    """The permissions a plain mkdir/open would give: mkdtemp and safetensors use 0o700/0o600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def publish(staging: Path, output: Path) -> None:
    """Renames the finished `staging` directory to `output`, replacing what was there.

    Both live in the same parent, so each rename is atomic; an old `output` is moved aside
    first and deleted last, so at no time does `output` hold a partial export.
    """
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(output, old)
    try:
        os.rename(staging, output)
    except OSError:
        if old is not None:
            os.rename(old, output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- verification --------------------------------------------------------------------------------
# Portuguese of varied length, with accents, digits and punctuation; padded into one batch.
VERIFY_SENTENCES = (
    "O gato dormia ao sol da manhã.",
    "A ciência avança quando os investigadores partilham dados e métodos de forma aberta.",
    "Você já provou o pão de queijo feito com polvilho azedo? É uma delícia mineira!",
    "Em 1500, a frota de Pedro Álvares Cabral chegou ao litoral do que hoje é o Brasil, e a "
    "história da região mudou para sempre; os relatos da época, como a carta de Pero Vaz de "
    "Caminha, descrevem a terra, as gentes e as primeiras trocas com os navegadores.",
)
VERIFY_MAX_TOKENS = 128
MASK_EVERY = 6  # the generator sees [MASK] at every 6th word piece, as in fill-mask use


# Tolerances are relative: a check passes when max |HF - JAX| <= tolerance * max(1, max |JAX|)
# over the compared positions, since rounding errors scale with the values (trained DeBERTa
# hidden states have outlier dimensions well above 1).
# HF and JAX on the same weights: only the order of float32 operations differs.
SAME_WEIGHTS_TOLERANCE = 1e-4
# HF on the written file against JAX on the checkpoint's float32 weights: the dtype's rounding
# of the weights on top. Set 5-20x above what trained tiny models show (docs/export.md);
# a wrong name or layout gives differences of the order of the values themselves.
TOLERANCES = {"float32": SAME_WEIGHTS_TOLERANCE, "float16": 2e-2, "bfloat16": 1.5e-1}


@dataclass(frozen=True)
class Check:
    model: str  # discriminator | generator
    what: str  # tensors | tokenizer | hidden states | logits
    against: str  # what the written files were compared with
    max_abs_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(self.max_abs_diff <= self.tolerance)

    def __str__(self) -> str:
        status = "ok" if self.passed else "FAILED"
        return (
            f"{self.model:13s} {self.what:13s} vs {self.against:28s} max abs diff "
            f"{self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g})  {status}"
        )


class VerificationError(RuntimeError):
    """The written model does not reproduce the checkpoint within tolerance."""

    def __init__(self, checks: list[Check]):
        self.checks = checks
        failed = "\n  ".join(str(c) for c in checks if not c.passed)
        super().__init__(f"verification failed:\n  {failed}")


def _max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    if mask is not None:
        diff = diff[mask.astype(bool)]
    return float(diff.max(initial=0.0))


def _compare(
    which: str,
    what: str,
    against: str,
    hf: np.ndarray,
    jax_out: np.ndarray,
    mask: np.ndarray,
    relative: float,
) -> Check:
    """max |hf - jax_out| on non-padding positions, against relative * max(1, max |jax_out|)."""
    scale = max(1.0, float(np.abs(jax_out[mask.astype(bool)]).max(initial=0.0)))
    return Check(which, what, against, _max_diff(hf, jax_out, mask), relative * scale)


def _tokenize(directory: Path, tokenizer_dir: Path) -> tuple[dict[str, np.ndarray], int, float]:
    """The verification batch from the written tokenizer, and how far its ids are from the
    pretraining pipeline's (0 when identical)."""
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(directory))
    batch = hf_tokenizer(
        list(VERIFY_SENTENCES),
        padding=True,
        truncation=True,
        max_length=VERIFY_MAX_TOKENS,
        return_tensors="np",
    )
    ours = Tokenizer.load(tokenizer_dir)
    expected = [
        [ours.cls_id, *ids[: VERIFY_MAX_TOKENS - 2], ours.sep_id]
        for ids in ours.encode_batch(VERIFY_SENTENCES)
    ]
    ids, attention = batch["input_ids"], batch["attention_mask"]
    got = [list(row[keep.astype(bool)]) for row, keep in zip(ids, attention, strict=True)]
    mismatch = 0.0 if got == expected else 1.0
    return {"input_ids": ids, "attention_mask": attention}, hf_tokenizer.mask_token_id, mismatch


def _masked_ids(ids: np.ndarray, attention: np.ndarray, mask_id: int) -> np.ndarray:
    """Every MASK_EVERY-th token (not [CLS], not [SEP], not padding) replaced by [MASK]."""
    out = ids.copy()
    lengths = attention.sum(axis=1)
    for row, length in enumerate(lengths):
        out[row, 1 : length - 1 : MASK_EVERY] = mask_id
    return out


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No load report or progress bar: verify checks the loading info itself."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _hf_outputs(directory: Path, which: str, ids: np.ndarray, attention: np.ndarray):
    """(hidden states, logits or None) of transformers' model for `directory`, in float32."""
    import torch
    import transformers

    cls = transformers.AutoModel if which == "discriminator" else transformers.AutoModelForMaskedLM
    with _quiet_transformers():
        model, info = cls.from_pretrained(
            str(directory), dtype=torch.float32, output_loading_info=True
        )
    # The RTD head is the only thing transformers may leave unused; nothing may be missing.
    unused = [k for k in info["unexpected_keys"] if not k.startswith("mask_predictions.")]
    if info["missing_keys"] or unused or info["mismatched_keys"]:
        raise ExportError(
            f"transformers loads {directory} with missing {sorted(info['missing_keys'])}, "
            f"unexpected {sorted(unused)}, mismatched {info['mismatched_keys']}"
        )
    model.eval()
    with torch.no_grad():
        args = dict(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(attention))
        if which == "discriminator":
            return model(**args).last_hidden_state.numpy(), None
        out = model(**args, output_hidden_states=True)
        return out.hidden_states[-1].numpy(), out.logits.numpy()


@nnx.jit
def _forward(model: nnx.Module, ids: jax.Array, attention: jax.Array):
    # One compiled program per model shape (op-by-op execution compiles every op on its own).
    hidden = model.deberta(ids, attention)
    return hidden, model(ids, attention) if isinstance(model, DebertaV2ForMaskedLM) else None


def _jax_outputs(model: nnx.Module, ids: np.ndarray, attention: np.ndarray):
    """(hidden states, logits or None) of one of our models, in float32."""
    hidden, logits = _forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(attention, jnp.int32))
    return np.asarray(hidden, np.float32), None if logits is None else np.asarray(logits)


def verify(
    directory: Path, which: str, source: ExportSource, original: dict[str, np.ndarray], dtype: str
) -> list[Check]:
    """Compares the written `directory` with the checkpoint's model:

    - tensors: our reader gets back exactly the checkpoint's tensors rounded to `dtype`;
    - tokenizer: transformers' AutoTokenizer gives the pretraining pipeline's ids (1 if not);
    - hidden states (and generator logits): transformers on the written file against our model
      on the same (rounded) weights, within SAME_WEIGHTS_TOLERANCE, and against our model on
      the checkpoint's float32 weights, within TOLERANCES[dtype] (both relative, see above).
    Only non-padding positions are compared (HF leaves padded query rows unmasked).
    """
    reimported = from_hf(directory, OUR_ARCHITECTURES[which])
    back = model_to_state_dict(reimported)
    written = read_hf_weights(directory)
    if EMD_POSITIONS_KEY in original:
        back[EMD_POSITIONS_KEY] = np.asarray(written[EMD_POSITIONS_KEY], np.float32)
    rounded = {k: v.astype(EXPORT_DTYPES[dtype]).astype(np.float32) for k, v in original.items()}
    if sorted(back) != sorted(rounded):
        raise ExportError(
            f"{directory}: reads back tensors {sorted(set(back) ^ set(rounded))} differently"
        )
    tensor_diff = max(_max_diff(back[k], rounded[k]) for k in rounded)
    checks = [Check(which, "tensors", f"checkpoint in {dtype}", tensor_diff, 0.0)]

    inputs, mask_id, token_mismatch = _tokenize(directory, source.tokenizer_dir)
    checks.append(Check(which, "tokenizer", "pretraining tokenizer", token_mismatch, 0.0))
    attention = inputs["attention_mask"]
    ids = inputs["input_ids"]
    if which == "generator":
        ids = _masked_ids(ids, attention, mask_id)
    checkpoint_model = source.discriminator if which == "discriminator" else source.generator
    hf_hidden, hf_logits = _hf_outputs(directory, which, ids, attention)
    for against, model, relative in (
        ("JAX on the same weights", reimported, SAME_WEIGHTS_TOLERANCE),
        ("JAX on the checkpoint (f32)", checkpoint_model, TOLERANCES[dtype]),
    ):
        hidden, logits = _jax_outputs(model, ids, attention)
        checks.append(
            _compare(which, "hidden states", against, hf_hidden, hidden, attention, relative)
        )
        if logits is not None:
            checks.append(
                _compare(which, "logits", against, hf_logits, logits, attention, relative)
            )
    return checks


# ---- the whole export ----------------------------------------------------------------------------
@dataclass
class ExportResult:
    output: Path
    step: int
    directories: dict[str, Path]
    checks: list[Check] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def export(
    workdir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    step: int | None = None,
    models: Sequence[str] = MODELS,
    dtype: str = "float32",
    verify_outputs: bool = True,
    overwrite: bool = False,
) -> ExportResult:
    """Exports checkpoint `step` (default: the latest) of the run in `workdir` to `output`.

    Raises CheckpointNotFoundError / CheckpointRestoreError for a missing or unreadable
    checkpoint, ExportError for bad arguments or unwritable weights, VerificationError when the
    written model does not match (nothing is written to `output` then).
    """
    check_dtype(dtype)
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise ExportError(f"models must be a non-empty subset of {MODELS}, got {list(models)}")
    output = Path(output)
    check_output(output, overwrite, Path(workdir))
    source = load_source(workdir, step)

    result = ExportResult(output, source.step, {m: output / m for m in models})
    if "generator" in models and source.emd_positions is not None:
        message = (
            "the generator uses the enhanced mask decoder (EMD), which transformers cannot run: "
            "HF will apply its last layer once, without the EMD, so its predictions differ "
            f"from pretraining; the EMD's position table is kept as {EMD_POSITIONS_KEY}"
        )
        log.warning(message)
        result.warnings.append(message)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    _umask_permissions(staging)
    try:
        for which in models:
            tensors = export_tensors(source, which)
            model = source.discriminator if which == "discriminator" else source.generator
            write_model_dir(
                staging / which, model.config, tensors, which=which, dtype=dtype, source=source
            )
            if verify_outputs:
                result.checks += verify(staging / which, which, source, tensors, dtype)
        for path in staging.rglob("*"):
            _umask_permissions(path)
        if not all(c.passed for c in result.checks):
            raise VerificationError(result.checks)
        publish(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return result
