"""Paths that may be local (absolute or relative) or in a Cloud Storage bucket (gs://...).

Everything is a plain string: a local path keeps working exactly as it always did, relative
ones included; a bucket path is `gs://BUCKET/KEY`. A string that looks like a mistyped bucket
URL ("gs:/bucket", "gcs://bucket", "GS://bucket") is refused here, before it can become a local
directory named "gs:" in the working directory.
"""

from __future__ import annotations

import os
import posixpath
import re

SCHEME = "gs://"
# GCS bucket names: 3-63 characters, lowercase letters, digits, "-", "_" and ".", starting
# and ending with a letter or digit (dotted names may be longer; they are rare on pods).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
# Another URL scheme, or gs/gcs followed by anything but "//": a URL, not a local name.
_LOOKS_REMOTE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://|(gs|gcs):)", re.IGNORECASE)


class StoragePathError(ValueError):
    """A path that is neither a local path nor a well-formed gs:// URL."""


def is_remote(path: str | os.PathLike) -> bool:
    """True for a gs:// URL (checked with `check_path`)."""
    return os.fspath(path).startswith(SCHEME)


def check_path(path: str | os.PathLike, what: str = "path") -> str:
    """`path` as a string; a StoragePathError naming `what` when it is a malformed URL."""
    text = os.fspath(path)
    if text.startswith(SCHEME):
        bucket = text[len(SCHEME) :].split("/", 1)[0]
        if not _BUCKET.match(bucket):
            raise StoragePathError(
                f"{what} {text!r}: {bucket!r} is not a valid bucket name (3-63 lowercase "
                "letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"
            )
        if "//" in text[len(SCHEME) :]:
            raise StoragePathError(f"{what} {text!r}: empty path component ('//')")
        return text
    if _LOOKS_REMOTE.match(text):
        scheme = text.split(":", 1)[0]
        hint = (
            f"did you mean {SCHEME}{text.split(':', 1)[1].lstrip('/')}?"
            if scheme.lower() in ("gs", "gcs")
            else f"only local paths and {SCHEME} URLs are supported"
        )
        raise StoragePathError(f"{what} {text!r} is not a local path nor a {SCHEME} URL: {hint}")
    return text


def split_bucket(url: str) -> tuple[str, str]:
    """gs://bucket/a/b -> ("bucket", "a/b")."""
    rest = check_path(url)[len(SCHEME) :]
    bucket, _, key = rest.partition("/")
    return bucket, key.rstrip("/")


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base`/`parts`, with "/" in URLs and os.path.join locally."""
    base = os.fspath(base)
    if is_remote(base):
        return posixpath.join(base.rstrip("/") if base != SCHEME else base, *parts)
    return os.path.join(base, *parts)


def parent(path: str | os.PathLike) -> str:
    text = os.fspath(path).rstrip("/")
    return posixpath.dirname(text) if is_remote(text) else os.path.dirname(text)


def name(path: str | os.PathLike) -> str:
    return posixpath.basename(os.fspath(path).rstrip("/"))


def absolute(path: str | os.PathLike) -> str:
    """URLs as they are; local paths made absolute (orbax refuses relative ones)."""
    text = check_path(path)
    return text.rstrip("/") if is_remote(text) else os.path.abspath(text)
