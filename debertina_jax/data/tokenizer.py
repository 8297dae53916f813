"""Train a SentencePiece unigram tokenizer and export it in the Hugging Face DeBERTa-v3 layout.

Ids as in DeBERTa-v3: [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3 are SentencePiece pieces, [MASK] is
appended after the last piece (id = number of pieces). The text is normalised with the exact
normaliser HF's DebertaV2Tokenizer uses (debertina_jax.data.text) before training, and the exported
tokenizer.json is the tokenizer HF rebuilds, so `Tokenizer.load(dir).encode_batch` and
`AutoTokenizer.from_pretrained(dir)` give the same ids. See docs/tokenizer.md for the choices.

    python -m debertina_jax.data.tokenizer --input FILE [FILE ...] --vocab-size N --output DIR
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tokenizers import AddedToken, decoders, processors
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import Unigram

from debertina_jax.data import text as text_lib
from debertina_jax.data.format import atomic_write
from debertina_jax.data.sources import DocumentSource, EmptyCorpusError
from debertina_jax.data.sources.local import LocalFiles

PAD, CLS, SEP, UNK, MASK = "[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"
MODEL_MAX_LENGTH = 512
# SentencePiece skips training sentences longer than max_sentence_length bytes, so documents are
# cut below it (at most 4 UTF-8 bytes per character). Short pieces also bound the memory of the
# sentence sample: about max_sentences * 1 KB.
_SENTENCE_CHARS = 1024
_SENTENCE_BYTES = 4 * _SENTENCE_CHARS


class VocabSizeError(ValueError):
    """The corpus cannot support the requested vocabulary size."""


def _documents(inputs, encoding: str, errors: str, seed: int) -> Iterator[str]:
    if isinstance(inputs, str | os.PathLike):
        raise TypeError(
            "inputs must be a sequence of paths or an iterable of texts, not a single "
            f"{type(inputs).__name__}: wrap it in a list"
        )
    if not isinstance(inputs, DocumentSource):
        items = iter(inputs)
        first = next(items, None)
        if not isinstance(first, os.PathLike):
            return itertools.chain([first] if first is not None else [], items)
        inputs = LocalFiles([first, *items], encoding=encoding, errors=errors)
    # Units in a seeded random order: when the sentence budget stops reading early (a corpus
    # of hundreds of GB), the text read still comes from all over the corpus.
    units = inputs.units()
    random.Random(seed).shuffle(units)
    return (document for unit in units for document in unit.documents())


def _training_sentences(documents: Iterable[str], budget: int, stats: dict) -> Iterator[str]:
    for document in documents:
        if not isinstance(document, str):
            raise TypeError(
                f"texts must be str, got {type(document).__name__} (pass file paths as "
                "pathlib.Path objects)"
            )
        stats["documents"] += 1
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
                f"vocab size {small[1]} is too small: the corpus's characters and the 4 special "
                f"pieces need {small[2]}. Use --vocab-size >= {small[2]} or a lower "
                "character coverage"
            ) from None
        raise
    return model.getvalue()


def train_tokenizer(
    inputs: Iterable[str] | Sequence[os.PathLike] | DocumentSource,
    vocab_size: int,
    output_dir: str | os.PathLike,
    *,
    encoding: str = "utf-8",
    errors: str = "strict",
    character_coverage: float = 0.9995,
    max_sentences: int = 5_000_000,
    num_threads: int | None = None,
    seed: int = 0,
    verbose: bool = False,
) -> Path:
    """Trains a unigram SentencePiece model of `vocab_size` pieces and exports it to `output_dir`.

    `inputs` is a list of `pathlib.Path` files (or folders, see data.sources.local), a
    DocumentSource, or an iterable of texts (one document each; plain `str` items are text,
    never file names). [MASK] gets id `vocab_size`. Training reads at most `max_sentences`
    pieces of text (of at most 1024 characters), from the source's work units in a seeded
    random order. Returns the output directory.
    """
    if vocab_size < 8:
        raise VocabSizeError(f"vocab size must be at least 8, got {vocab_size}")
    stats = {"documents": 0, "sentences": 0}
    documents = _documents(inputs, encoding, errors, seed)
    sentences = _training_sentences(documents, max_sentences, stats)
    first = next(sentences, None)
    if first is None:
        raise EmptyCorpusError(f"no text to train a tokenizer on ({stats['documents']} documents)")
    options = dict(
        character_coverage=character_coverage,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=0 if verbose else 2,
    )
    spm.set_random_generator_seed(seed)
    model = _train_spm(itertools.chain([first], sentences), vocab_size, options)
    return export_tokenizer(model, output_dir)


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


def export_tokenizer(model: bytes, output_dir: str | os.PathLike) -> Path:
    """Writes spm.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_hf_tokenizer(model)
    mask_id = tokenizer.token_to_id(MASK)
    config = _hf_config(mask_id)
    special_map = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "sep_token")}
    special_map.update({k: config[k] for k in ("pad_token", "cls_token", "mask_token")})
    atomic_write(output_dir / "spm.model", model)
    atomic_write(output_dir / "tokenizer.json", tokenizer.to_str(pretty=True).encode())
    atomic_write(output_dir / "tokenizer_config.json", json.dumps(config, indent=2).encode())
    atomic_write(output_dir / "special_tokens_map.json", json.dumps(special_map, indent=2).encode())
    return output_dir


class Tokenizer:
    """The exported tokenizer as the data pipeline uses it (tokenizer.json, no transformers)."""

    def __init__(self, backend: RustTokenizer, path: Path | None = None):
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
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: train a tokenizer with python -m debertina_jax.data.tokenizer"
            )
        return cls(RustTokenizer.from_file(str(path)), Path(directory))

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
