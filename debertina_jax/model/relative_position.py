"""Relative positions i - j and DeBERTa's log buckets, computed exactly as HF does.

Positions depend only on the (static) sequence lengths, so they are computed with NumPy at trace
time and enter a jitted function as constants. HF computes the log buckets in float32, so we do the
same float32 arithmetic: float64 would land on the other side of a `ceil` for some distances.
The logs themselves are correctly rounded (float64 log, then float32) so the result is the same on
every machine; torch's float32 log is vectorised per CPU and can differ in the last bit, which
moves a few far distances to a neighbouring bucket for unusual (bucket_size, max_position) pairs
(e.g. 1000, 512). For DeBERTa-v3's (256, 512) and the other pairs in the tests, the buckets equal
HF's exactly.
"""

import numpy as np


def _log_f32(x: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 natural log."""
    return np.log(np.asarray(x, dtype=np.float64)).astype(np.float32)


def log_bucket_positions(relative: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
    """Map relative distances to buckets: identity for |rel| <= bucket_size // 2, log-spaced beyond.

    For |rel| > mid (mid = bucket_size // 2) the bucket is
    sign(rel) * (ceil(log(|rel| / mid) / log((max_position - 1) / mid) * (mid - 1)) + mid).
    """
    rel = np.asarray(relative, dtype=np.int64)
    mid = bucket_size // 2
    # Distances inside (-mid, mid) keep their value; give them a harmless log argument.
    abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel)).astype(np.float32)
    log_ratio = _log_f32(abs_pos / np.float32(mid)) / _log_f32(np.float32((max_position - 1) / mid))
    log_pos = np.ceil(log_ratio * np.float32(mid - 1)) + np.float32(mid)
    buckets = np.where(abs_pos <= mid, rel.astype(np.float32), log_pos * np.sign(rel))
    return buckets.astype(np.int64)


def build_relative_positions(
    query_len: int, key_len: int, bucket_size: int = -1, max_position: int = -1
) -> np.ndarray:
    """int32 [query_len, key_len] with entry (i, j) = bucket(i - j).

    Buckets apply only when both bucket_size > 0 and max_position > 0 (as in HF); otherwise the
    raw distances are returned.
    """
    rel = np.arange(query_len)[:, None] - np.arange(key_len)[None, :]
    if bucket_size > 0 and max_position > 0:
        # Bucketing is elementwise, so bucket each distinct distance once and index.
        distances = np.arange(-(key_len - 1), query_len)
        table = log_bucket_positions(distances, bucket_size, max_position)
        rel = table[rel + key_len - 1]
    return rel.astype(np.int32)
