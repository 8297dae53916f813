"""Examples -> token ids, the way HF's fast DeBERTa tokenizer prepares them for fine-tuning:
[CLS] A [SEP] (B [SEP]) through the tokenizer's own post-processor, pairs truncated longest
first, and for token classification the label on the first piece of each word (-100 elsewhere,
HF's ignore index) with the word -> first-piece position kept for the evaluation.

The tokenizer is the model's `tokenizer.json` (what this project writes), or for a directory
with only `spm.model` (microsoft/deberta-v3-*) the Rust tokenizer transformers converts from it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as RustTokenizer

from debertina_jax.finetune.examples import Examples
from debertina_jax.finetune.tables import TaskFileError

log = logging.getLogger(__name__)
IGNORE = -100  # label of positions that carry no token label (HF's CrossEntropyLoss ignore_index)
TRUNCATION_CHOICES = ("truncate", "error")


@dataclass
class Encoded:
    """One split, tokenized. `labels`: class indices [N] int32, targets [N] float32, or per-token
    label ids (IGNORE off the first pieces). `word_positions[i][w]`: the position of word w's
    first piece in example i, -1 when truncation cut the word off."""

    input_ids: list[np.ndarray]
    type_ids: list[np.ndarray]
    labels: np.ndarray | list[np.ndarray]
    word_positions: list[np.ndarray] | None
    truncated: int

    def __len__(self) -> int:
        return len(self.input_ids)


class TaskTokenizer:
    """A Rust `tokenizers` tokenizer with DeBERTa's special tokens, for task examples."""

    def __init__(self, backend: RustTokenizer, source: str):
        self.backend = backend
        self.source = source
        self.pad_id = backend.token_to_id("[PAD]")
        if self.pad_id is None or backend.token_to_id("[CLS]") is None:
            raise TaskFileError(f"the tokenizer of {source} lacks [PAD] or [CLS]")

    @classmethod
    def load(cls, directory: str | Path) -> TaskTokenizer:
        directory = Path(directory)
        if (directory / "tokenizer.json").is_file():
            return cls(RustTokenizer.from_file(str(directory / "tokenizer.json")), str(directory))
        if (directory / "spm.model").is_file():
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise TaskFileError(
                    f"{directory} has spm.model but no tokenizer.json; converting it needs "
                    "transformers (pip install 'debertina-jax[export]')"
                ) from None
            converted = AutoTokenizer.from_pretrained(str(directory)).backend_tokenizer
            return cls(converted, str(directory))
        raise TaskFileError(f"{directory}: no tokenizer.json or spm.model")

    def encode(
        self,
        examples: Examples,
        label_names: Sequence[str],
        *,
        max_length: int,
        truncation: str = "truncate",
    ) -> Encoded:
        """Tokenizes `examples`; sequences over `max_length` tokens are cut (truncation
        "truncate", counted and logged) or refused ("error", naming the file and row)."""
        if truncation not in TRUNCATION_CHOICES:
            raise ValueError(f"truncation must be one of {TRUNCATION_CHOICES}, got {truncation!r}")
        pretokenized = examples.words is not None
        if pretokenized:
            inputs = examples.words
        else:  # a single text goes in as a string, a pair as a tuple
            inputs = [t[0] if len(t) == 1 else t for t in examples.texts]
        encodings = self.backend.encode_batch(list(inputs), is_pretokenized=pretokenized)
        too_long = [i for i, e in enumerate(encodings) if len(e.ids) > max_length]
        if too_long and truncation == "error":
            i = too_long[0]
            raise TaskFileError(
                f"{examples.source}, row {i + 1}: {len(encodings[i].ids)} tokens, more than "
                f"max_length {max_length} ({len(too_long)} rows are); raise train.max_length "
                "(up to the model's max_position_embeddings) or set train.truncation=truncate"
            )
        if too_long:
            cutter = RustTokenizer.from_str(self.backend.to_str())
            cutter.enable_truncation(max_length, strategy="longest_first")
            cut = cutter.encode_batch([inputs[i] for i in too_long], is_pretokenized=pretokenized)
            for i, e in zip(too_long, cut, strict=True):
                encodings[i] = e
            log.warning(
                "%s: %d of %d examples are longer than %d tokens and were truncated",
                examples.source, len(too_long), len(encodings), max_length,
            )  # fmt: skip
        ids = [np.asarray(e.ids, np.int32) for e in encodings]
        types = [np.asarray(e.type_ids, np.int32) for e in encodings]
        if pretokenized:
            labels, positions = _token_labels(encodings, examples, label_names)
            return Encoded(ids, types, labels, positions, len(too_long))
        if not label_names:  # regression
            labels = np.asarray(examples.labels, np.float32)
        else:
            index = {name: i for i, name in enumerate(label_names)}
            labels = np.asarray([index[label] for label in examples.labels], np.int32)
        return Encoded(ids, types, labels, None, len(too_long))


def _token_labels(encodings, examples: Examples, label_names: Sequence[str]):
    index = {name: i for i, name in enumerate(label_names)}
    labels, positions = [], []
    for encoding, tags in zip(encodings, examples.labels, strict=True):
        row = np.full(len(encoding.ids), IGNORE, np.int32)
        first = np.full(len(tags), -1, np.int32)
        for position, word in enumerate(encoding.word_ids):
            if word is not None and first[word] < 0:
                first[word] = position
                row[position] = index[tags[word]]
        labels.append(row)
        positions.append(first)
    return labels, positions
