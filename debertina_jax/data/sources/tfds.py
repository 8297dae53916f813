"""TensorFlow Datasets, e.g. mC4 Portuguese: `c4/multilingual:3.0.1`, split `pt`.

Needs tensorflow-datasets (imported only when the source is read). A dataset prepared as
ArrayRecord is read without TensorFlow (tfds.data_source); other formats, such as the TFRecord
files of the public gs://tfds-data mC4, go through tf.data and need TensorFlow too (the `tfds`
extra installs both). `data_dir` may be a local folder or a gs:// path holding the prepared
dataset; nothing is downloaded or generated here. A split of known size is cut into
`num_units` contiguous example ranges (`pt[a:b]`), so several processes read it at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from debertina_jax.data.sources import DocumentSource, SourceError, WorkUnit, missing_extra

DEFAULT_NAME = "c4/multilingual:3.0.1"
DEFAULT_SPLIT = "pt"


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise missing_extra("the TFDS source", "tfds", "tensorflow-datasets") from None
    return tfds


def _examples(tfds, name: str, split: str, data_dir: str | None) -> Iterator[dict]:
    """The examples of `split`, in the order they are stored."""
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.info.file_format == tfds.core.file_adapters.FileFormat.ARRAY_RECORD:
        # Random access by index, no TensorFlow: the test extra reads datasets this way.
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        for index in range(len(source)):
            yield source[index]
        return
    try:
        import tensorflow  # noqa: F401  (tf.data reads TFRecord datasets)
    except ImportError:
        stored = getattr(builder.info.file_format, "value", builder.info.file_format)
        raise missing_extra(
            f"the TFDS source, for {name} stored as {stored},", "tfds", "tensorflow"
        ) from None
    ds = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False, download=False)
    yield from tfds.as_numpy(ds)


def _text(example: dict, key: str, where: str) -> str | None:
    if key not in example:
        features = sorted(example)
        raise SourceError(f"{where}: examples have no feature {key!r} (features: {features})")
    value = example[key]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if value is None or isinstance(value, str):
        return value
    raise SourceError(f"{where}: feature {key!r} is a {type(value).__name__}, not text")


@dataclass(frozen=True)
class TfdsSlice(WorkUnit):
    """The examples of one TFDS split or split slice, e.g. `pt[0:165000]`."""

    name: str
    split: str
    data_dir: str | None = None
    text_key: str = "text"

    @property
    def key(self) -> str:
        return f"tfds:{self.name}:{self.split}@{self.data_dir}:{self.text_key}"

    def documents(self) -> Iterator[str]:
        tfds = _import_tfds()
        where = f"TFDS {self.name} split {self.split}"
        for example in _examples(tfds, self.name, self.split, self.data_dir):
            text = _text(example, self.text_key, where)
            if text:
                yield text


@dataclass(frozen=True)
class TfdsSource(DocumentSource):
    """A TFDS text dataset split, cut into up to `num_units` example ranges."""

    name: str = DEFAULT_NAME
    split: str = DEFAULT_SPLIT
    data_dir: str | None = None
    text_key: str = "text"
    num_units: int = 1024

    def describe(self) -> str:
        where = f" in {self.data_dir}" if self.data_dir else ""
        return f"TFDS {self.name} split {self.split}{where}"

    def units(self) -> list[WorkUnit]:
        tfds = _import_tfds()
        try:
            builder = tfds.builder(self.name, data_dir=self.data_dir)
        except Exception as e:  # tfds raises its own error types for unknown names and versions
            raise SourceError(f"cannot open TFDS dataset {self.name!r}: {e}") from None
        splits = builder.info.splits
        if splits and self.split not in splits:
            raise SourceError(
                f"TFDS dataset {self.name!r} has no split {self.split!r} (splits: {sorted(splits)})"
            )
        total = splits[self.split].num_examples if splits else 0
        count = min(self.num_units, total)
        if count <= 1:  # size unknown (nothing prepared yet, or a mocked dataset): one unit
            return [TfdsSlice(self.name, self.split, self.data_dir, self.text_key)]
        bounds = [total * i // count for i in range(count + 1)]
        return [
            TfdsSlice(self.name, f"{self.split}[{a}:{b}]", self.data_dir, self.text_key)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
