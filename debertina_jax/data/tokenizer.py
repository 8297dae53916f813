"""Train a SentencePiece unigram tokenizer and export it in the Hugging Face DeBERTa-v3 layout.

Ids as in DeBERTa-v3: [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3 are SentencePiece pieces, [MASK] is
appended after the last piece (id = number of pieces). The text is normalised with the exact
normaliser HF's DebertaV2Tokenizer uses (debertina_jax.data.text) before training, and the exported
tokenizer.json is the tokenizer HF rebuilds, so `Tokenizer.load(dir).encode_batch` and
`AutoTokenizer.from_pretrained(dir)` give the same ids. See docs/tokenizer.md for the choices.

Every character of REQUIRED_CHARS (printable ASCII, Latin-1, the typographic marks of
Windows-1252) gets a piece however rare it is in the corpus: HF's Unigram model has no byte
fallback, so a character without a piece is [UNK]. A slice of the documents is held out of
training to measure the [UNK] rate on text the tokenizer has not seen (`TrainingReport`).

    python -m debertina_jax.cli.tokenizer --input FILE [FILE ...] --vocab-size N --output DIR
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from tokenizers import AddedToken, decoders, processors
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import Unigram

from debertina_jax import storage
from debertina_jax.data import text as text_lib
from debertina_jax.data.sources import DocumentSource, EmptyCorpusError
from debertina_jax.data.sources.local import LocalFiles

PAD, CLS, SEP, UNK, MASK = "[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"
MODEL_MAX_LENGTH = 512
# SentencePiece skips training sentences longer than max_sentence_length bytes, so documents are
# cut below it (at most 4 UTF-8 bytes per character). Short pieces also bound the memory of the
# sentence sample: about max_sentences * 1 KB.
_SENTENCE_CHARS = 1024
_SENTENCE_BYTES = 4 * _SENTENCE_CHARS
# Held-out text is kept in memory until training ends; beyond this it goes to training instead.
_HELDOUT_MAX_CHARS = 2_000_000


def _required_chars() -> str:
    """The characters that always get a piece of their own (see the module docstring)."""
    ascii_printable = "".join(chr(c) for c in range(0x21, 0x7F))  # the space is spm's "▁"
    # All of Latin-1: the letters of Portuguese, French, Spanish... in both cases, ª º °,
    # « », ¿ ¡, § © ® ± ² ½ × ÷, and the no-break space and soft hyphen of web text.
    latin1 = "".join(chr(c) for c in range(0xA0, 0x100))
    # Windows-1252's extras: € ‚ ƒ „ … † ‡ ˆ ‰ Š ‹ Œ Ž ‘ ’ “ ” • – — ˜ ™ š › œ ž Ÿ (Ÿ is ÿ's
    # capital); word processors put them into ordinary text.
    cp1252 = bytes(range(0x80, 0xA0)).decode("cp1252", errors="ignore")
    # The other dashes and quotes, primes (23°32′) and the minus sign.
    more = "\u2010\u2011\u2012\u2015\u201b\u201f\u2032\u2033\u2212"
    return ascii_printable + latin1 + cp1252 + more


REQUIRED_CHARS = _required_chars()


class VocabSizeError(ValueError):
    """The corpus cannot support the requested vocabulary size."""


def _documents(inputs, encoding: str, errors: str, seed: int) -> tuple[Iterator[str], str]:
    """The documents to read, and a description of where they come from (for errors)."""
    if isinstance(inputs, str | os.PathLike):
        raise TypeError(
            "inputs must be a sequence of paths or an iterable of texts, not a single "
            f"{type(inputs).__name__}: wrap it in a list"
        )
    if not isinstance(inputs, DocumentSource):
        items = iter(inputs)
        first = next(items, None)
        if not isinstance(first, os.PathLike):
            texts = itertools.chain([first] if first is not None else [], items)
            return texts, "the given texts"
        inputs = LocalFiles([first, *items], encoding=encoding, errors=errors)
    # Units in a seeded random order: when the sentence budget stops reading early (a corpus
    # of hundreds of GB), the text read still comes from all over the corpus.
    units = inputs.units()
    random.Random(seed).shuffle(units)
    return (document for unit in units for document in unit.documents()), inputs.describe()


class _HeldOut:
    """Keeps evenly spaced documents out of training: document i when i * fraction crosses
    n + 1/2 (with fraction 0.01: documents 50, 150, 250...), until _HELDOUT_MAX_CHARS."""

    def __init__(self, fraction: float):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
        self.fraction = fraction
        self.texts: list[str] = []
        self.chars = 0

    def take(self, index: int, document: str) -> bool:
        slot = math.floor(index * self.fraction + 0.5)
        previous = math.floor((index - 1) * self.fraction + 0.5)
        if slot == previous or self.chars >= _HELDOUT_MAX_CHARS:
            return False
        self.texts.append(document)
        self.chars += len(document)
        return True


def _training_sentences(
    documents: Iterable[str], budget: int, stats: dict, heldout: _HeldOut
) -> Iterator[str]:
    for document in documents:
        if not isinstance(document, str):
            raise TypeError(
                f"texts must be str, got {type(document).__name__} (pass file paths as "
                "pathlib.Path objects)"
            )
        if not document.strip():
            continue
        stats["documents"] += 1
        # Held-out text counts against the budget too: the budget bounds the text in memory.
        if heldout.take(stats["documents"] - 1, document):
            stats["sentences"] += math.ceil(len(document) / _SENTENCE_CHARS)
            if stats["sentences"] >= budget:
                return
            continue
        normalized = text_lib.normalize(document)
        for sentence in text_lib.split_long_text(normalized, _SENTENCE_CHARS, exact=False):
            sentence = sentence.strip()
            if sentence:
                yield sentence
                stats["sentences"] += 1
                if stats["sentences"] >= budget:
                    return


def _train_spm(sentences: Iterator[str], vocab_size: int, options: dict) -> bytes:
    failure: list[BaseException] = []

    def guarded() -> Iterator[str]:
        # SentencePiece turns an exception raised by the iterator into a RuntimeError with the
        # message only; keep the original (a SourceError naming the file) to re-raise it.
        try:
            yield from sentences
        except BaseException as e:
            failure.append(e)
            raise

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=guarded(),
            model_writer=model,
            model_type="unigram",
            vocab_size=vocab_size,
            # HF ignores the model's normalisation rules; the text is already normalised the HF
            # way, and "identity" keeps spm.model from applying other rules (e.g. NFKC) itself.
            normalization_rule_name="identity",
            # HF builds the Unigram model with byte_fallback=False, so byte pieces would be
            # unreachable vocabulary there.
            byte_fallback=False,
            pad_id=0,
            bos_id=1,
            eos_id=2,
            unk_id=3,
            pad_piece=PAD,
            bos_piece=CLS,
            eos_piece=SEP,
            unk_piece=UNK,
            max_sentence_length=_SENTENCE_BYTES,
            **options,
        )
    except RuntimeError as e:
        if failure:
            raise failure[0] from None
        limit = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", str(e))
        if limit:
            raise VocabSizeError(
                f"vocab size {limit[1]} is larger than this corpus supports: SentencePiece found "
                f"at most {limit[2]} pieces. Use --vocab-size <= {limit[2]} or train on more text"
            ) from None
        small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if small:
            raise VocabSizeError(
                f"vocab size {small[1]} is too small: the 4 special pieces and a piece for each "
                f"character (the corpus's, and the {len(options.get('required_chars', ''))} "
                f"that always get one) need {small[2]}. Use --vocab-size >= {small[2]}"
            ) from None
        raise
    return model.getvalue()


@dataclass(frozen=True)
class UnknownRate:
    """How often a tokenizer says [UNK] on some text, and for which characters."""

    tokens: int
    unknown: int
    # The characters inside [UNK] tokens, most frequent first (whitespace left out).
    characters: tuple[tuple[str, int], ...] = ()

    @property
    def rate(self) -> float:
        return self.unknown / self.tokens if self.tokens else 0.0

    def describe(self, shown: int = 10) -> str:
        text = f"{100 * self.rate:.3f}% ({self.unknown:,} of {self.tokens:,} tokens)"
        if self.characters:
            chars = ", ".join(f"{c!r} x{n}" for c, n in self.characters[:shown])
            hidden = len(self.characters) - shown
            more = f" and {hidden} more" if hidden > 0 else ""
            text += f"; characters without a piece: {chars}{more}"
        return text


def measure_unknown(tokenizer: Tokenizer, texts: Iterable[str]) -> UnknownRate:
    """The share of [UNK] among the ids of `texts`, and the characters that became [UNK]."""
    tokens = unknown = 0
    characters: Counter[str] = Counter()
    batch: list[str] = []

    def count(batch: list[str]) -> None:
        nonlocal tokens, unknown
        # Offsets (in characters of the raw text) say what each [UNK] stands for.
        for text, encoding in zip(
            batch, tokenizer.backend.encode_batch(batch, add_special_tokens=False), strict=True
        ):
            tokens += len(encoding.ids)
            for token_id, (start, end) in zip(encoding.ids, encoding.offsets, strict=True):
                if token_id == tokenizer.unk_id:
                    unknown += 1
                    characters.update(c for c in text[start:end] if not c.isspace())

    for text in texts:
        batch.append(text)
        if len(batch) == 1024:
            count(batch)
            batch = []
    if batch:
        count(batch)
    return UnknownRate(tokens, unknown, tuple(characters.most_common()))


@dataclass(frozen=True)
class TrainingReport:
    output_dir: Path
    documents: int  # non-blank documents read, held-out ones included
    heldout_fraction: float
    heldout_documents: int
    heldout: UnknownRate | None  # None when no document was held out

    def describe(self) -> str:
        """One line on the held-out [UNK] rate, for the CLI and the logs."""
        if self.heldout is None:
            if not self.heldout_fraction:
                return "[UNK] rate not measured: no held-out fraction"
            first = math.ceil(0.5 / self.heldout_fraction)
            return (
                f"[UNK] rate not measured: a held-out fraction of {self.heldout_fraction:g} "
                f"starts at document {first}, and the corpus has {self.documents}"
            )
        return (
            f"[UNK] on {self.heldout_documents} held-out documents "
            f"({self.heldout_fraction:g} of the corpus): {self.heldout.describe()}"
        )


def train_tokenizer(
    inputs: Iterable[str] | Sequence[os.PathLike] | DocumentSource,
    vocab_size: int,
    output_dir: str | os.PathLike,
    **options: Any,
) -> Path:
    """`train_tokenizer_with_report` without the report: returns the output directory."""
    return train_tokenizer_with_report(inputs, vocab_size, output_dir, **options).output_dir


def train_tokenizer_with_report(
    inputs: Iterable[str] | Sequence[os.PathLike] | DocumentSource,
    vocab_size: int,
    output_dir: str | os.PathLike,
    *,
    encoding: str = "utf-8",
    errors: str = "strict",
    character_coverage: float = 0.9995,
    required_chars: str = REQUIRED_CHARS,
    heldout_fraction: float = 0.01,
    max_sentences: int = 5_000_000,
    num_threads: int | None = None,
    seed: int = 0,
    verbose: bool = False,
) -> TrainingReport:
    """Trains a unigram SentencePiece model of `vocab_size` pieces and exports it to `output_dir`.

    `inputs` is a list of `pathlib.Path` files (or folders, see data.sources.local), a
    DocumentSource, or an iterable of texts (one document each; plain `str` items are text,
    never file names). [MASK] gets id `vocab_size`. Training reads at most `max_sentences`
    pieces of text (of at most 1024 characters), from the source's work units in a seeded
    random order. Every character of `required_chars` gets a piece; the others need
    `character_coverage`. `heldout_fraction` of the documents are left out of training and
    tokenized afterwards to measure the [UNK] rate (0: none).
    """
    if vocab_size < 8:
        raise VocabSizeError(f"vocab size must be at least 8, got {vocab_size}")
    stats = {"documents": 0, "sentences": 0}
    heldout = _HeldOut(heldout_fraction)
    documents, described = _documents(inputs, encoding, errors, seed)
    sentences = _training_sentences(documents, max_sentences, stats, heldout)
    first = next(sentences, None)
    if first is None:
        raise EmptyCorpusError(
            f"no text to train a tokenizer on in {described}: "
            f"{stats['documents']} non-blank documents"
        )
    options = dict(
        character_coverage=character_coverage,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=0 if verbose else 2,
    )
    if required_chars:
        options["required_chars"] = required_chars
    spm.set_random_generator_seed(seed)
    model = _train_spm(itertools.chain([first], sentences), vocab_size, options)
    output_dir = export_tokenizer(model, output_dir)
    rate = None
    if heldout.texts:
        rate = measure_unknown(Tokenizer.load(output_dir), heldout.texts)
    return TrainingReport(
        output_dir, stats["documents"], heldout_fraction, len(heldout.texts), rate
    )


def _pieces(model: bytes) -> list[tuple[str, float]]:
    processor = spm.SentencePieceProcessor(model_proto=model)
    expected = {0: PAD, 1: CLS, 2: SEP, 3: UNK}
    # Scores are float32 in spm; writing each as its shortest float32 decimal makes Rust's JSON
    # parser (tokenizers) and Python's (transformers) read exactly the same float64 values.
    pieces = [
        (processor.id_to_piece(i), float(str(np.float32(processor.get_score(i)))))
        for i in range(len(processor))
    ]
    for i, piece in expected.items():
        if pieces[i][0] != piece:
            raise ValueError(f"spm model has {pieces[i][0]!r} at id {i}, expected {piece!r}")
    if any(piece == MASK for piece, _ in pieces):
        raise ValueError(f"spm model already holds {MASK}; it must be appended after the pieces")
    return pieces


def build_hf_tokenizer(model: bytes) -> RustTokenizer:
    """The `tokenizers` object HF's DebertaV2Tokenizer builds from this SentencePiece model."""
    pieces = _pieces(model)
    tokenizer = RustTokenizer(Unigram(pieces, unk_id=3, byte_fallback=False))
    tokenizer.normalizer = text_lib.build_normalizer()
    tokenizer.pre_tokenizer = text_lib.build_pre_tokenizer()
    tokenizer.decoder = decoders.Metaspace(
        replacement=text_lib.SPACE_MARKER, prepend_scheme="always"
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0",
        pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, 1), (SEP, 2)],
    )
    # Existing pieces keep their ids; [MASK] is new and lands at len(pieces).
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (PAD, CLS, SEP, UNK, MASK)]
    )
    return tokenizer


def _hf_config(mask_id: int) -> dict:
    specials = {0: PAD, 1: CLS, 2: SEP, 3: UNK, mask_id: MASK}
    return {
        "tokenizer_class": "DebertaV2Tokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": False,
        "split_by_punct": False,
        "add_prefix_space": True,
        "bos_token": CLS,
        "eos_token": SEP,
        "unk_token": UNK,
        "sep_token": SEP,
        "pad_token": PAD,
        "cls_token": CLS,
        "mask_token": MASK,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in specials.items()
        },
    }


def export_tokenizer(model: bytes, output_dir: str | os.PathLike) -> Path | str:
    """Writes spm.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json
    (into a local directory or under a gs:// URL), each file atomically."""
    output_dir = storage.check_path(output_dir, "tokenizer directory")
    storage.makedirs(output_dir)
    tokenizer = build_hf_tokenizer(model)
    mask_id = tokenizer.token_to_id(MASK)
    config = _hf_config(mask_id)
    special_map = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "sep_token")}
    special_map.update({k: config[k] for k in ("pad_token", "cls_token", "mask_token")})
    files = {
        "spm.model": model,
        "tokenizer_config.json": json.dumps(config, indent=2).encode(),
        "special_tokens_map.json": json.dumps(special_map, indent=2).encode(),
        "tokenizer.json": tokenizer.to_str(pretty=True).encode(),  # last: it marks completion
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(output_dir, name), data)
    return output_dir if storage.is_remote(output_dir) else Path(output_dir)


class Tokenizer:
    """The exported tokenizer as the data pipeline uses it (tokenizer.json, no transformers)."""

    def __init__(self, backend: RustTokenizer, path: Path | str | None = None):
        self.backend = backend
        self.path = path
        ids = {t: backend.token_to_id(t) for t in (PAD, CLS, SEP, UNK, MASK)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer {path or ''} lacks the special tokens {missing}")
        self.pad_id, self.cls_id, self.sep_id = ids[PAD], ids[CLS], ids[SEP]
        self.unk_id, self.mask_id = ids[UNK], ids[MASK]
        self.num_pieces = backend.get_vocab_size(with_added_tokens=False)
        self._fingerprint = hashlib.sha256(
            json.dumps(json.loads(backend.to_str()), sort_keys=True).encode()
        ).hexdigest()

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """The tokenizer.json of a directory, local or gs://."""
        directory = storage.check_path(directory, "tokenizer directory")
        path = storage.join(directory, "tokenizer.json")
        if not storage.is_file(path):
            raise FileNotFoundError(
                f"{path} not found: train a tokenizer with python -m debertina_jax.cli.tokenizer"
            )
        where = directory if storage.is_remote(directory) else Path(directory)
        return cls(RustTokenizer.from_str(storage.read_text(path)), where)

    @property
    def vocab_size(self) -> int:
        """Pieces + [MASK]: the smallest embedding table that holds every id."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset((self.pad_id, self.cls_id, self.sep_id, self.unk_id, self.mask_id))

    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer.json: equal iff the tokenizers tokenize alike."""
        return self._fingerprint

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, without [CLS]/[SEP] (as HF with add_special_tokens=False)."""
        encodings = self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]
