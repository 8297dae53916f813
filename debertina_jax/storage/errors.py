"""Storage errors: each names the path and says what to do."""

from __future__ import annotations


class StorageError(OSError):
    """A storage operation failed; the message names the path."""


class BucketNotFoundError(StorageError, FileNotFoundError):
    """The gs:// bucket does not exist."""


class StoragePermissionError(StorageError, PermissionError):
    """No credentials, or credentials without access to the bucket."""
