"""The one text normaliser of the project: exactly what HF's DebertaV2Tokenizer applies.

transformers 5.x rebuilds the DeBERTa-v2/v3 normaliser in code and ignores the normalisation rules
stored in spm.model: whitespace runs and single \\n, \\r, \\t become one space, then NFC, then the
right end is stripped. The tokenizer is trained on text normalised this way and the data pipeline
tokenizes with the same object, so pretraining sees the token distribution fine-tuning will see.
"""

from __future__ import annotations

import functools
import unicodedata

from tokenizers import Regex, normalizers, pre_tokenizers

# The pattern HF's DebertaV2Tokenizer replaces with a single space (Oniguruma \s is Unicode-aware).
WHITESPACE_PATTERN = r"\s{2,}|[\n\r\t]"
# SentencePiece's word-boundary marker; HF's Metaspace pre-tokenizer uses the same one.
SPACE_MARKER = "\u2581"


def build_normalizer() -> normalizers.Normalizer:
    """The normaliser HF's DebertaV2Tokenizer builds (do_lower_case=False)."""
    return normalizers.Sequence(
        [
            normalizers.Replace(Regex(WHITESPACE_PATTERN), " "),
            normalizers.NFC(),
            normalizers.Strip(left=False, right=True),
        ]
    )


def build_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """HF's pre-tokenizer for split_by_punct=False, add_prefix_space=True: split on spaces."""
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement=SPACE_MARKER, prepend_scheme="always")]
    )


@functools.cache
def _normalizer() -> normalizers.Normalizer:
    return build_normalizer()


def normalize(text: str) -> str:
    """Normalise `text` exactly as the exported tokenizer will."""
    return _normalizer().normalize_str(text)


def _is_safe_cut(text: str, i: int) -> bool:
    # A lone space between two ordinary characters is a word boundary for the Metaspace
    # pre-tokenizer whatever surrounds it: no whitespace run crosses it and NFC cannot compose
    # across it, so tokenizing both halves separately gives the ids of the whole text.
    return (
        text[i] == " "
        and 0 < i < len(text) - 1
        and not text[i - 1].isspace()
        and not text[i + 1].isspace()
        and unicodedata.combining(text[i + 1]) == 0
    )


def _safe_cut_before(text: str, start: int, end: int) -> int | None:
    i = text.rfind(" ", start + 1, end + 1)
    while i > start and not _is_safe_cut(text, i):
        i = text.rfind(" ", start + 1, i)
    return i if i > start else None


def _safe_cut_after(text: str, start: int) -> int | None:
    i = text.find(" ", start)
    while i != -1 and not _is_safe_cut(text, i):
        i = text.find(" ", i + 1)
    return None if i == -1 else i


def split_long_text(text: str, max_chars: int, *, exact: bool = True) -> list[str]:
    """Cut `text` into pieces of about `max_chars` characters at spaces.

    exact=True cuts only at spaces where the tokenizer's output is unchanged (the concatenated ids
    of the pieces equal the ids of `text`); a stretch without such a space stays whole, however
    long, so a piece may exceed `max_chars`. exact=False (for tokenizer training only) cuts hard
    when no space is found, so no piece exceeds `max_chars`.
    """
    if max_chars < 2:
        raise ValueError(f"max_chars must be >= 2, got {max_chars}")
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        cut = _safe_cut_before(text, start, start + max_chars)
        if cut is None and exact:
            cut = _safe_cut_after(text, start + max_chars)
            if cut is None:
                break
        if cut is None:
            pieces.append(text[start : start + max_chars])
            start += max_chars
        else:
            pieces.append(text[start:cut])
            start = cut + 1
    pieces.append(text[start:])
    return pieces
