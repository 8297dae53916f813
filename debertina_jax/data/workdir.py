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

from debertina_jax.config import Config, DataConfig
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
    tokenizer_dir: Path
    data_dir: Path
    tokenizer: Tokenizer
    metadata: dict[str, Any]


def data_paths(config: Config, workdir: str | Path) -> tuple[Path, Path]:
    """(tokenizer_dir, prepared_dir) of a run: the config's, or inside the workdir."""
    workdir = Path(workdir)
    tokenizer_dir = Path(config.data.tokenizer_dir or workdir / "tokenizer")
    data_dir = Path(config.data.prepared_dir or workdir / "data")
    return tokenizer_dir, data_dir


def ensure_data(
    config: Config, workdir: str | Path, *, prepare_missing: bool = True
) -> PreparedData:
    """Trains the tokenizer and prepares the shards when missing; checks them against the config.

    With `prepare_missing=False` (the non-main hosts of a pod) nothing is written: the data
    must already be there.
    """
    data = config.data
    tokenizer_dir, data_dir = data_paths(config, workdir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        if not prepare_missing:
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
    tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} ids (with [MASK]) but "
            f"model.vocab_size is {config.model.vocab_size}: raise model.vocab_size or use a "
            "smaller tokenizer"
        )
    if not (data_dir / fmt.METADATA_FILE).is_file():
        if not prepare_missing:
            raise FileNotFoundError(f"no prepared data in {data_dir}")
        prepare(
            source_from_config(data),
            tokenizer_dir,
            data_dir,
            max_seq_length=data.max_seq_length,
            eval_lines=data.eval_lines,
            num_workers=data.prepare_workers or None,
            seed=config.train.seed,
        )
    metadata = fmt.check_compatible(data_dir, tokenizer, max_seq_length=data.max_seq_length)
    return PreparedData(tokenizer_dir, data_dir, tokenizer, metadata)
