"""From a config to a trained tokenizer and prepared shards in the run's workdir.

`run_pretrain.py` calls `ensure_data` before training: it trains the tokenizer and prepares
the data when the workdir does not have them yet, and otherwise only checks that what is
there fits the config. Both steps are resumable on their own, so a run killed while
preparing picks up where it stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from debertina_jax import storage
from debertina_jax.config import Config, DataConfig
from debertina_jax.data import cache
from debertina_jax.data import format as fmt
from debertina_jax.data.prepare import prepare
from debertina_jax.data.sources import DocumentSource
from debertina_jax.data.tokenizer import Tokenizer, VocabSizeError, train_tokenizer_with_report

logger = logging.getLogger(__name__)


def sample_corpus_dir() -> Path:
    """The Portuguese sample corpus that ships with the package (tests and the demo)."""
    return Path(str(resources.files("debertina_jax") / "sample_data" / "pt"))


def source_from_config(data: DataConfig) -> DocumentSource:
    """The document source that `data.source` names (optional extras imported lazily)."""
    if data.source == "tfds":
        from debertina_jax.data.sources.tfds import TfdsSource

        return TfdsSource(data.tfds_name, data.tfds_split, data.tfds_data_dir)
    if data.source == "hf":
        from debertina_jax.data.sources.hf_datasets import HfDataset, HfDatasetSource

        return HfDatasetSource(HfDataset(data.hf_name, data.hf_config, data.hf_split))
    from debertina_jax.data.sources.local import LocalFiles

    files = list(data.train_files) or [sample_corpus_dir()]
    return LocalFiles(files, encoding=data.encoding, errors=data.errors)


@dataclass(frozen=True)
class PreparedData:
    tokenizer_dir: Path | str  # as configured: local, or a gs:// URL
    data_dir: Path  # local: the prepared directory itself, or this host's copy of a gs:// one
    tokenizer: Tokenizer
    metadata: dict[str, Any]
    source_dir: Path | str | None = None  # where the prepared data lives (gs:// or data_dir)


def data_paths(config: Config, workdir: str | Path) -> tuple[Path | str, Path | str]:
    """(tokenizer_dir, prepared_dir) of a run: the config's, or inside the workdir; Paths for
    local directories, strings for gs:// URLs."""
    workdir = storage.check_path(workdir, "workdir")
    tokenizer = storage.check_path(
        config.data.tokenizer_dir or storage.join(workdir, "tokenizer"), "data.tokenizer_dir"
    )
    prepared = storage.check_path(
        config.data.prepared_dir or storage.join(workdir, "data"), "data.prepared_dir"
    )
    return _typed(tokenizer), _typed(prepared)


def _typed(path: str) -> Path | str:
    return path if storage.is_remote(path) else Path(path)


def ensure_tokenizer(
    config: Config, workdir: str | Path, *, train_missing: bool = True
) -> Tokenizer:
    """The run's tokenizer, trained first when missing (`--stage tokenizer` stops here)."""
    data = config.data
    tokenizer_dir, _ = data_paths(config, workdir)
    if not storage.is_file(storage.join(tokenizer_dir, "tokenizer.json")):
        if not train_missing:
            raise FileNotFoundError(f"no tokenizer in {tokenizer_dir}")
        logger.info("training a %d-piece tokenizer into %s", data.vocab_size, tokenizer_dir)
        try:
            report = train_tokenizer_with_report(
                source_from_config(data), data.vocab_size, tokenizer_dir, seed=0
            )
        except VocabSizeError as e:  # the tokenizer CLI's flag is this run's config key
            raise VocabSizeError(
                f"data.vocab_size={data.vocab_size}: {e}".replace("--vocab-size", "data.vocab_size")
            ) from None
        logger.info("tokenizer: %s", report.describe())
    return Tokenizer.load(tokenizer_dir)


def ensure_data(
    config: Config, workdir: str | Path, *, prepare_missing: bool = True
) -> PreparedData:
    """Trains the tokenizer and prepares the shards when missing; checks them against the config.

    With `prepare_missing=False` (the non-main hosts of a pod) nothing is written: the data
    must already be there. Prepared data in a bucket is prepared in this host's cache and
    uploaded, and read through a local copy per host (data/cache.py).
    """
    data = config.data
    tokenizer_dir, data_dir = data_paths(config, workdir)
    tokenizer = ensure_tokenizer(config, workdir, train_missing=prepare_missing)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} ids (with [MASK]) but "
            f"model.vocab_size is {config.model.vocab_size}: raise model.vocab_size or use a "
            "smaller tokenizer"
        )
    remote = storage.is_remote(data_dir)
    if not storage.is_file(storage.join(data_dir, fmt.METADATA_FILE)):
        if not prepare_missing:
            raise FileNotFoundError(f"no prepared data in {data_dir}")
        prepare(  # to a bucket: prepared in this host's cache, then uploaded (prepare.py)
            source_from_config(data),
            tokenizer_dir,
            data_dir,
            max_seq_length=data.max_seq_length,
            eval_lines=data.eval_lines,
            num_workers=data.prepare_workers or None,
            seed=config.train.seed,
            cache_dir=data.cache_dir,
        )
    local = cache.local_copy(data_dir, root=data.cache_dir) if remote else data_dir
    metadata = fmt.check_compatible(local, tokenizer, max_seq_length=data.max_seq_length)
    return PreparedData(tokenizer_dir, Path(local), tokenizer, metadata, data_dir)
