"""Casting exported tensors to the chosen dtype, refusing values it cannot hold."""

from __future__ import annotations

import numpy as np

from debertina_jax.export.errors import ExportError, Float16OverflowError
from debertina_jax.hf import files

FLOAT16_MAX = float(np.finfo(np.float16).max)


def check_dtype(dtype: str) -> None:
    """An ExportError naming the choices unless `dtype` is one hf.files.EXPORT_DTYPES holds."""
    try:
        files.check_dtype(dtype)
    except ValueError as e:
        raise ExportError(str(e)) from None


def cast_tensors(tensors: dict[str, np.ndarray], dtype: str, label: str) -> dict[str, np.ndarray]:
    """Casts to `dtype`; a non-finite value, or one float16 cannot hold, is an error naming the
    tensor (`label` says which model)."""
    check_dtype(dtype)
    out = {}
    for key, value in tensors.items():
        value = np.asarray(value, np.float32)
        if not np.isfinite(value).all():
            raise ExportError(f"{label} tensor {key} holds NaN or infinite values")
        if dtype == "float16":
            peak = float(np.abs(value).max(initial=0.0))
            if peak > FLOAT16_MAX:
                raise Float16OverflowError(
                    f"{label} tensor {key} does not fit float16: its largest magnitude is "
                    f"{peak:.6g} > {FLOAT16_MAX:g}; export as bfloat16 or float32 instead"
                )
        out[key] = np.ascontiguousarray(value.astype(files.EXPORT_DTYPES[dtype]))
    return out


def rounded(tensors: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """The float32 values the tensors have once written in `dtype`."""
    return {k: v.astype(files.EXPORT_DTYPES[dtype]).astype(np.float32) for k, v in tensors.items()}
