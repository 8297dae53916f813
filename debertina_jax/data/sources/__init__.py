"""Where documents come from: one small interface, one module per kind of source.

A source is cut into work units (file chunks, Parquet row groups, dataset shards). Units are
small picklable descriptions, so a worker process can read one on its own, and their keys are
stable, so a resumed prepare run knows which units it has already done. Reading all units in
order gives every document of the source exactly once, in a fixed order.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator


class SourceError(ValueError):
    """Input data that cannot be read as documents (the message names the file and position)."""


class EmptyCorpusError(SourceError):
    """The inputs hold no text at all."""


class MissingExtraError(ImportError):
    """An optional dependency of a source is not installed."""


def missing_extra(feature: str, extra: str, module: str) -> MissingExtraError:
    return MissingExtraError(
        f"{feature} needs the optional package {module!r}, which is not installed: "
        f"pip install 'debertina-jax[{extra}]'"
    )


class WorkUnit(abc.ABC):
    """A piece of a source that one worker reads on its own."""

    @property
    @abc.abstractmethod
    def key(self) -> str:
        """Stable identifier: the same source settings always give the same keys."""

    @property
    def size_hint(self) -> int | None:
        """Approximate input bytes, for progress bars; None when unknown."""
        return None

    @abc.abstractmethod
    def documents(self) -> Iterator[str]:
        """The documents of this unit, in order, as raw (not normalised) text."""


class DocumentSource(abc.ABC):
    """An ordered collection of documents, cut into work units."""

    @abc.abstractmethod
    def units(self) -> list[WorkUnit]:
        """The work units, in document order."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line naming the source, for logs and metadata."""

    def documents(self) -> Iterator[str]:
        for unit in self.units():
            yield from unit.documents()
