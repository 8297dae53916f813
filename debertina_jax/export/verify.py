"""Verification of a written model directory against the checkpoint it came from.

What is compared, and why the tolerances are what they are: see `verify` and docs/export.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from debertina_jax.data.tokenizer import Tokenizer
from debertina_jax.export.cast import rounded
from debertina_jax.export.checkpoint import ExportSource
from debertina_jax.export.errors import ExportError
from debertina_jax.export.spec import ModelSpec
from debertina_jax.hf.convert import from_hf, model_to_state_dict
from debertina_jax.hf.files import read_hf_weights
from debertina_jax.hf.names import EMD_POSITIONS_KEY, RTD_HEAD

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


def check_requirements() -> None:
    """An ExportError saying what to install, before anything is read, unless torch and
    transformers import (verification loads the written files with them)."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ExportError(
            f"verifying the export needs torch and transformers ({e}): install them with "
            "pip install -e '.[export]' (the CPU torch first), or pass --no-verify"
        ) from None


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


def _hf_outputs(directory: Path, spec: ModelSpec, ids: np.ndarray, attention: np.ndarray):
    """(hidden states, logits or None) of transformers' model for `directory`, in float32."""
    import torch
    import transformers

    with _quiet_transformers():
        model, info = getattr(transformers, spec.auto_class).from_pretrained(
            str(directory), dtype=torch.float32, output_loading_info=True
        )
    # The RTD head is the only thing transformers may leave unused; nothing may be missing.
    unused = [k for k in info["unexpected_keys"] if not k.startswith(RTD_HEAD)]
    if info["missing_keys"] or unused or info["mismatched_keys"]:
        raise ExportError(
            f"transformers loads {directory} with missing {sorted(info['missing_keys'])}, "
            f"unexpected {sorted(unused)}, mismatched {info['mismatched_keys']}"
        )
    model.eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(attention),
            output_hidden_states=True,
        )
    logits = out.logits.numpy() if "logits" in spec.outputs else None
    return out.hidden_states[-1].numpy(), logits


@partial(nnx.jit, static_argnames="logits")
def _forward(model: nnx.Module, ids: jax.Array, attention: jax.Array, logits: bool):
    # One compiled program per model shape (op-by-op execution compiles every op on its own).
    return model.deberta(ids, attention), model(ids, attention) if logits else None


def _jax_outputs(model: nnx.Module, spec: ModelSpec, ids: np.ndarray, attention: np.ndarray):
    """(hidden states, logits or None) of one of our models, in float32."""
    ids, attention = jnp.asarray(ids, jnp.int32), jnp.asarray(attention, jnp.int32)
    hidden, logits = _forward(model, ids, attention, "logits" in spec.outputs)
    return np.asarray(hidden, np.float32), None if logits is None else np.asarray(logits)


def verify(
    directory: Path,
    spec: ModelSpec,
    source: ExportSource,
    original: dict[str, np.ndarray],
    dtype: str,
) -> list[Check]:
    """Compares the written `directory` with the checkpoint's model:

    - tensors: our reader gets back exactly the checkpoint's tensors rounded to `dtype`;
    - tokenizer: transformers' AutoTokenizer gives the pretraining pipeline's ids (1 if not);
    - hidden states (and generator logits): transformers on the written file against our model
      on the same (rounded) weights, within SAME_WEIGHTS_TOLERANCE, and against our model on
      the checkpoint's float32 weights, within TOLERANCES[dtype] (both relative, see above).
    Only non-padding positions are compared (HF leaves padded query rows unmasked).
    """
    which = spec.name
    reimported = from_hf(directory, spec.our_architecture)
    back = model_to_state_dict(reimported)
    if EMD_POSITIONS_KEY in original:
        written = read_hf_weights(directory)
        back[EMD_POSITIONS_KEY] = np.asarray(written[EMD_POSITIONS_KEY], np.float32)
    expected = rounded(original, dtype)
    if sorted(back) != sorted(expected):
        raise ExportError(
            f"{directory}: reads back tensors {sorted(set(back) ^ set(expected))} differently"
        )
    tensor_diff = max(_max_diff(back[k], expected[k]) for k in expected)
    checks = [Check(which, "tensors", f"checkpoint in {dtype}", tensor_diff, 0.0)]

    inputs, mask_id, token_mismatch = _tokenize(directory, source.tokenizer_dir)
    checks.append(Check(which, "tokenizer", "pretraining tokenizer", token_mismatch, 0.0))
    attention = inputs["attention_mask"]
    ids = inputs["input_ids"]
    if spec.masked_inputs:
        ids = _masked_ids(ids, attention, mask_id)
    hf_hidden, hf_logits = _hf_outputs(directory, spec, ids, attention)
    for against, model, relative in (
        ("JAX on the same weights", reimported, SAME_WEIGHTS_TOLERANCE),
        ("JAX on the checkpoint (f32)", source.model(which), TOLERANCES[dtype]),
    ):
        hidden, logits = _jax_outputs(model, spec, ids, attention)
        checks.append(
            _compare(which, "hidden states", against, hf_hidden, hidden, attention, relative)
        )
        if logits is not None:
            checks.append(
                _compare(which, "logits", against, hf_logits, logits, attention, relative)
            )
    return checks
