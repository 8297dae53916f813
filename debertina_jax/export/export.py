"""A pretraining run -> Hugging Face PyTorch directories, written atomically and verified.

    export("runs/tiny", "hf/tiny")    # what `python convert_to_pt.py` runs

writes
    OUT/discriminator/  config.json (architectures DebertaV2Model), model.safetensors with the
                        GDES table merged (E_G + E_delta) and the RTD head as mask_predictions.*,
                        the run's tokenizer files, README.md (model card)
    OUT/generator/      the same for the DebertaV2ForMaskedLM generator

The steps, one file each: checkpoint.py reads the run's parameters back (no optimizer),
cast.py casts the tensors, card.py writes the model card, verify.py reads the written
directories back with `transformers` and with our own reader and compares them with the
checkpoint (docs/export.md has what is compared and the tolerances), publish.py renames the
finished directory into place. spec.py says what differs between the two models.

Enhanced mask decoder (EMD): HF has no EMD, so the generator is written as a plain MaskedLM whose
last layer is the EMD layer (see ElectraPair.export_generator); HF runs that layer once, on the
hidden states, instead of twice on position-enriched queries. The EMD's absolute position table
is kept as `deberta.embeddings.position_embeddings.weight`, a name every HF DeBERTa-v2 class
ignores on load, and the safetensors metadata says the file holds an EMD generator, so that
`hf.init` can read it back losslessly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from debertina_jax import storage
from debertina_jax.export.card import README_NAME, model_card, parameter_counts
from debertina_jax.export.cast import cast_tensors, check_dtype
from debertina_jax.export.checkpoint import TOKENIZER_FILES, ExportSource, load_source
from debertina_jax.export.errors import ExportError
from debertina_jax.export.publish import (
    check_output,
    check_remote_output,
    publish,
    staging_dir,
    upload,
)
from debertina_jax.export.spec import MODELS, SPECS, ModelSpec
from debertina_jax.export.verify import Check, VerificationError, check_requirements, verify
from debertina_jax.hf.convert import model_to_state_dict
from debertina_jax.hf.files import write_hf_dir
from debertina_jax.hf.names import EMD_METADATA_KEY, EMD_POSITIONS_KEY

log = logging.getLogger(__name__)

EMD_WARNING = (
    "the generator uses the enhanced mask decoder (EMD), which transformers cannot run: "
    "HF will apply its last layer once, without the EMD, so its predictions differ "
    f"from pretraining; the EMD's position table is kept as {EMD_POSITIONS_KEY}"
)


@dataclass
class ExportResult:
    output: Path | str  # a Path, or a gs:// URL
    step: int
    directories: dict[str, Path | str]
    checks: list[Check] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    weights: str = ""  # which weights were written, in words (export/weights.py)


def export(
    workdir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    step: int | None = None,
    weights: str = "raw",
    average_last: int | None = None,
    models: Sequence[str] = MODELS,
    dtype: str = "float32",
    verify_outputs: bool = True,
    overwrite: bool = False,
) -> ExportResult:
    """Exports checkpoint `step` (default: the latest) of the run in `workdir` to `output`:
    its raw weights, or with weights="ema" their moving average; with `average_last=K` the
    uniform average of the last K kept checkpoints up to `step` (export/weights.py). Either
    is written and verified like the weights of one checkpoint.

    Raises CheckpointNotFoundError / CheckpointRestoreError for a missing or unreadable
    checkpoint, ExportError for bad arguments or unwritable weights, VerificationError when the
    written model does not match (nothing is written to `output` then).
    """
    check_dtype(dtype)
    unknown = [m for m in models if m not in SPECS]
    if unknown or not models:
        raise ExportError(f"models must be a non-empty subset of {MODELS}, got {list(models)}")
    specs = [SPECS[m] for m in models]
    if verify_outputs:
        check_requirements()
    workdir = storage.check_path(workdir, "--workdir")
    if storage.is_remote(storage.check_path(output, "--output")):
        # A bucket: exported to a local directory, verified there, then uploaded.
        output = str(output).rstrip("/")
        check_remote_output(output, overwrite, workdir)
        with tempfile.TemporaryDirectory(prefix="debertina-export-") as local:
            result = export(workdir, Path(local) / "out", step=step, models=models,
                            dtype=dtype, verify_outputs=verify_outputs)  # fmt: skip
            upload(Path(local) / "out", output)
        return dataclasses.replace(
            result, output=output, directories={m: storage.join(output, m) for m in models}
        )
    output = Path(output)
    check_output(output, overwrite, None if storage.is_remote(workdir) else Path(workdir))
    source = load_source(workdir, step, weights=weights, average_last=average_last)

    result = ExportResult(output, source.step, {m: output / m for m in models})
    result.weights = source.weights
    if source.emd_positions is not None and any(spec.carries_emd for spec in specs):
        log.warning(EMD_WARNING)
        result.warnings.append(EMD_WARNING)

    with staging_dir(output) as staging:
        for spec in specs:
            tensors = export_tensors(source, spec)
            write_model_dir(staging / spec.name, spec, tensors, dtype=dtype, source=source)
            if verify_outputs:
                result.checks += verify(staging / spec.name, spec, source, tensors, dtype)
        if not all(c.passed for c in result.checks):
            raise VerificationError(result.checks)
        publish(staging, output)
    return result


def export_tensors(source: ExportSource, spec: ModelSpec) -> dict[str, np.ndarray]:
    """The float32 HF tensors of one model, as they are written."""
    tensors = model_to_state_dict(source.model(spec.name))
    if spec.carries_emd and source.emd_positions is not None:
        tensors[EMD_POSITIONS_KEY] = np.asarray(source.emd_positions, np.float32)
    return tensors


def write_model_dir(
    directory: Path,
    spec: ModelSpec,
    tensors: dict[str, np.ndarray],
    *,
    dtype: str,
    source: ExportSource,
) -> None:
    """config.json, model.safetensors, tokenizer files and README.md for one model."""
    emd = spec.carries_emd and source.emd_positions is not None
    config = source.model(spec.name).config
    write_hf_dir(
        directory,
        config,
        spec.hf_architecture,
        cast_tensors(tensors, dtype, spec.name),
        dtype=dtype,
        metadata={EMD_METADATA_KEY: str(emd).lower()} if spec.carries_emd else None,
    )
    for name in TOKENIZER_FILES:
        if storage.is_file(storage.join(source.tokenizer_dir, name)):  # local or gs://
            storage.copy(storage.join(source.tokenizer_dir, name), str(directory / name))
    (directory / README_NAME).write_text(
        model_card(source, spec, config, parameter_counts(tensors, emd=emd), dtype)
    )
