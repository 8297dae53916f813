"""Data: sources of raw text, the prepare step (text -> packed ArrayRecord shards), the shard
format shared with the loader, and the loader.

    sources/   where documents come from (local files, TFDS, HF datasets)
    prepare    tokenize, pack into [CLS] ... [SEP] lines, write train/eval shards
    format     shard names, line encoding, metadata.json, check_compatible
    loader     Grain batches over the shards, one slice per JAX process
"""

from debertina_jax.data.format import IncompatibleDataError, PreparedDataError, check_compatible

__all__ = ["IncompatibleDataError", "PreparedDataError", "check_compatible"]
