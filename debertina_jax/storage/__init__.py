"""Storage: every file the package reads or writes, local or in a Cloud Storage bucket.

Paths are strings: local paths (relative ones too) as always, or gs://BUCKET/KEY URLs. The
modules: paths (parsing and checking), files (open, read, write, list, copy, move), gcs (the
clients, the emulator set-up, error translation), objects (generation preconditions, for the
workdir lock), errors. Nothing here imports the rest of the package.
"""

from debertina_jax.storage.errors import (
    BucketNotFoundError,
    StorageError,
    StoragePermissionError,
)
from debertina_jax.storage.files import (
    copy,
    copy_tree,
    exists,
    glob,
    is_dir,
    is_file,
    listdir,
    makedirs,
    move_tree,
    open_file,
    read_bytes,
    read_text,
    remove,
    remove_tree,
    size,
    version,
    versions,
    walk_files,
    write_bytes,
    write_text,
)
from debertina_jax.storage.gcs import check_access, configure, emulator_url
from debertina_jax.storage.paths import (
    SCHEME,
    StoragePathError,
    absolute,
    check_path,
    is_remote,
    join,
    name,
    parent,
    split_bucket,
)

configure()  # before anything imports gcsfs: see gcs.py

__all__ = [
    "SCHEME",
    "BucketNotFoundError",
    "StorageError",
    "StoragePathError",
    "StoragePermissionError",
    "absolute",
    "check_access",
    "check_path",
    "configure",
    "copy",
    "copy_tree",
    "emulator_url",
    "exists",
    "glob",
    "is_dir",
    "is_file",
    "is_remote",
    "join",
    "listdir",
    "makedirs",
    "move_tree",
    "name",
    "open_file",
    "parent",
    "read_bytes",
    "read_text",
    "remove",
    "remove_tree",
    "size",
    "split_bucket",
    "version",
    "versions",
    "walk_files",
    "write_bytes",
    "write_text",
]
