"""Hugging Face `datasets`, e.g. `allenai/c4` config `pt`, streamed or from the local cache.

Needs the `hf` extra (the `datasets` package, imported only when the source is read). The
dataset is cut along its own shards (its data files when streaming, contiguous rows otherwise)
into up to `num_units` units, so several processes read it at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from debertina_jax.data.sources import DocumentSource, SourceError, WorkUnit, missing_extra


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise missing_extra("the Hugging Face datasets source", "hf", "datasets") from None
    return datasets


@dataclass(frozen=True)
class HfDataset:
    """What `datasets.load_dataset` needs to open the dataset."""

    path: str = "allenai/c4"
    name: str | None = "pt"
    split: str = "train"
    data_files: tuple[str, ...] | None = None
    streaming: bool = True
    text_key: str = "text"

    def load(self):
        datasets = _import_datasets()
        try:
            return datasets.load_dataset(
                self.path,
                self.name,
                split=self.split,
                data_files=list(self.data_files) if self.data_files else None,
                streaming=self.streaming,
            )
        except Exception as e:  # datasets raises many types (missing files, no network, ...)
            raise SourceError(f"cannot open HF dataset {self.describe()}: {e}") from None

    def describe(self) -> str:
        name = f" config {self.name}" if self.name else ""
        return f"{self.path}{name} split {self.split}"


def _num_shards(dataset) -> int:
    if hasattr(dataset, "num_shards"):  # IterableDataset: its data files
        return dataset.num_shards
    if hasattr(dataset, "n_shards"):  # older datasets releases
        return dataset.n_shards
    return len(dataset)  # a map-style Dataset can be cut anywhere


@dataclass(frozen=True)
class HfShard(WorkUnit):
    """Shard `index` of `count` of an HF dataset."""

    dataset: HfDataset
    index: int = 0
    count: int = 1

    @property
    def key(self) -> str:
        d = self.dataset
        where = f"{d.path}:{d.name}:{d.split}:{d.data_files}:{d.text_key}"
        return f"hf:{where}@{self.index}/{self.count}"

    def documents(self) -> Iterator[str]:
        ds = self.dataset.load()
        if self.count > 1:
            ds = ds.shard(num_shards=self.count, index=self.index)
        key = self.dataset.text_key
        for example in ds:
            if key not in example:
                raise SourceError(
                    f"HF dataset {self.dataset.describe()}: no column {key!r} "
                    f"(columns: {sorted(example)})"
                )
            text = example[key]
            if text is not None and not isinstance(text, str):
                raise SourceError(
                    f"HF dataset {self.dataset.describe()}: column {key!r} holds "
                    f"{type(text).__name__} values, not strings"
                )
            if text:
                yield text


@dataclass(frozen=True)
class HfDatasetSource(DocumentSource):
    """An HF dataset split, cut into up to `num_units` shards."""

    dataset: HfDataset = HfDataset()
    num_units: int = 1024

    def describe(self) -> str:
        return f"HF dataset {self.dataset.describe()}"

    def units(self) -> list[WorkUnit]:
        count = max(1, min(self.num_units, _num_shards(self.dataset.load())))
        return [HfShard(self.dataset, i, count) for i in range(count)]
