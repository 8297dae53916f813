"""Peak dense bf16 FLOP/s per device of the accelerators MFU is reported for.

Vendor figures per chip (one JAX device on TPU v4 and later, one GPU): TPU v4 275 TFLOP/s,
v5e 197, v5p 459, v6e (Trillium) 918; NVIDIA A100 312, H100 and H200 989 (dense, without
sparsity). An unknown device (a CPU, an older chip) has no entry: MFU is then not reported
rather than reported against a guess.
"""

from __future__ import annotations

# (substring of jax's device_kind, lowercased; peak FLOP/s). The first match wins, so the
# more specific names come first ("tpu v5 lite" is a v5e, a plain "tpu v5" a v5p).
PEAKS: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
    ("a100", 312e12),
    ("h100", 989e12),
    ("h200", 989e12),
)


def peak_flops_per_second(device_kind: str) -> float | None:
    """The device's peak bf16 FLOP/s, or None when it is not in the table."""
    kind = device_kind.lower()
    return next((peak for name, peak in PEAKS if name in kind), None)
