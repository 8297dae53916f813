"""The fine-tuned model -> OUT/hf, for transformers' AutoModelForSequenceClassification /
AutoModelForTokenClassification (label names in config.json's id2label), verified:

- our reader gets the written weights back, and transformers loads them with nothing missing,
  unexpected or mis-shaped, and with the same id2label;
- transformers' AutoTokenizer on the written tokenizer gives the ids we trained on;
- transformers' logits on a batch of validation examples match ours on the same weights
  within 1e-4 x max(1, max |logit|) (float32; only the order of operations differs, the rule
  of the pretraining export, docs/export.md), at the real rows and, for tokens, real tokens.

Everything is written to a hidden directory first and renamed to OUT/hf when it passed.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from debertina_jax.finetune.batching import make_batch
from debertina_jax.finetune.encoding import Encoded
from debertina_jax.finetune.examples import Examples

log = logging.getLogger(__name__)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spm.model",
)
TOLERANCE = 1e-4
VERIFY_EXAMPLES = 8


class ExportVerificationError(RuntimeError):
    """The written model does not reproduce the fine-tuned one in transformers."""


def export_task_model(
    model: nnx.Module,
    tokenizer_dir: Path,
    output: Path,
    examples: Examples,
    encoded: Encoded,
    *,
    max_length: int,
    pad_id: int,
    verify: bool = True,
) -> dict[str, Any]:
    """Writes `model` (float32) and its tokenizer to `output`; returns the verification report."""
    from debertina_jax.hf.convert import to_hf

    staging = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        to_hf(model, staging, "float32")
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, staging / name)
        report: dict[str, Any] = {"verified": False}
        if verify:
            report = verify_export(staging, model, examples, encoded, max_length, pad_id)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def verify_export(
    directory: Path,
    model: nnx.Module,
    examples: Examples,
    encoded: Encoded,
    max_length: int,
    pad_id: int,
) -> dict[str, Any]:
    try:
        import torch
        import transformers
    except ImportError:
        log.warning("transformers/torch not installed: %s written but not verified", directory)
        return {"verified": False, "reason": "transformers or torch is not installed"}
    from debertina_jax.hf.convert import from_hf, model_to_state_dict

    # Our reader on the written files: the same tensors, the same class.
    reread = from_hf(directory)
    written, original = model_to_state_dict(reread), model_to_state_dict(model)
    if sorted(written) != sorted(original) or any(
        not np.array_equal(written[k], original[k]) for k in original
    ):
        raise ExportVerificationError(f"{directory}: the written tensors read back differently")

    token_task = examples.words is not None
    auto = (
        transformers.AutoModelForTokenClassification
        if token_task
        else transformers.AutoModelForSequenceClassification
    )
    with _quiet_transformers():
        hf_model, info = auto.from_pretrained(
            str(directory), dtype=torch.float32, output_loading_info=True
        )
    if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
        raise ExportVerificationError(
            f"transformers loads {directory} with missing {sorted(info['missing_keys'])}, "
            f"unexpected {sorted(info['unexpected_keys'])}, mismatched {info['mismatched_keys']}"
        )
    want_labels = {i: name for i, name in enumerate(model.config.label_names)}
    if dict(hf_model.config.id2label) != want_labels:
        raise ExportVerificationError(
            f"{directory}: transformers reads id2label {hf_model.config.id2label}, "
            f"expected {want_labels}"
        )

    rows = np.arange(min(VERIFY_EXAMPLES, len(encoded)))
    tokenizer_ok = _tokenizer_matches(directory, examples, encoded, rows, max_length)
    batch = make_batch(encoded, rows, len(rows), max_length, pad_id)
    ours = np.asarray(
        _logits(
            reread,
            jnp.asarray(batch["input_ids"]),
            jnp.asarray(batch["attention_mask"]),
            jnp.asarray(batch["token_type_ids"]),
        )
    )
    hf_model.eval()
    with torch.no_grad():
        theirs = hf_model(
            input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
            attention_mask=torch.as_tensor(batch["attention_mask"], dtype=torch.long),
            token_type_ids=torch.as_tensor(batch["token_type_ids"], dtype=torch.long),
        ).logits.numpy()
    keep = batch["attention_mask"].astype(bool) if token_task else np.ones(len(rows), bool)
    diff = float(np.abs(ours[keep] - theirs[keep]).max(initial=0.0))
    tolerance = TOLERANCE * max(1.0, float(np.abs(ours[keep]).max(initial=0.0)))
    report = {
        "verified": bool(diff <= tolerance and tokenizer_ok is not False),
        "examples": int(len(rows)),
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "tokenizer_matches": tokenizer_ok,
    }
    if not report["verified"]:
        raise ExportVerificationError(
            f"{directory}: transformers does not reproduce the model: {report}"
        )
    return report


@nnx.jit
def _logits(model: nnx.Module, ids: jax.Array, mask: jax.Array, types: jax.Array) -> jax.Array:
    # One compiled program: op-by-op execution would compile every op on its own.
    return model(ids, mask, types)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No load report or progress bar: the loading info is checked here."""
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


def _tokenizer_matches(
    directory: Path, examples: Examples, encoded: Encoded, rows: np.ndarray, max_length: int
) -> bool | None:
    """Whether AutoTokenizer on the written files gives our ids (None: no tokenizer to load)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        log.warning("%s: transformers cannot load the tokenizer (%s)", directory, e)
        return None
    kwargs = dict(truncation=True, max_length=max_length)
    if examples.words is not None:
        got = tokenizer([examples.words[i] for i in rows], is_split_into_words=True, **kwargs)
    elif len(examples.texts[0]) == 2:
        got = tokenizer(
            [examples.texts[i][0] for i in rows], [examples.texts[i][1] for i in rows], **kwargs
        )
    else:
        got = tokenizer([examples.texts[i][0] for i in rows], **kwargs)
    return all(
        list(ids) == encoded.input_ids[i].tolist()
        for ids, i in zip(got["input_ids"], rows, strict=True)
    )
