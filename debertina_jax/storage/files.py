"""File operations on local paths and gs:// URLs alike: the one place that knows both.

Local paths go to the OS as before. URLs go to gcsfs; a GCS object is replaced atomically by a
single upload, so `write_bytes` is atomic on both (locally: a temporary file renamed into place).
Directories do not exist on GCS: a "directory" is a key prefix, `makedirs` does nothing there,
and moving one is a copy of every object followed by the deletion of the originals.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import IO, Any

from debertina_jax.storage import gcs
from debertina_jax.storage.paths import SCHEME, check_path, is_remote, join


def _key(url: str) -> str:
    return url[len(SCHEME) :].rstrip("/")


@contextlib.contextmanager
def _translated(url: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as e:
        raise gcs.translate(e, url) from None


def exists(path: str | os.PathLike) -> bool:
    path = check_path(path)
    if not is_remote(path):
        return os.path.exists(path)
    with _translated(path):
        return gcs.filesystem().exists(_key(path))


def is_file(path: str | os.PathLike) -> bool:
    path = check_path(path)
    if not is_remote(path):
        return os.path.isfile(path)
    with _translated(path):
        return gcs.filesystem().isfile(_key(path))


def is_dir(path: str | os.PathLike) -> bool:
    """A local directory, or a URL prefix that holds at least one object."""
    path = check_path(path)
    if not is_remote(path):
        return os.path.isdir(path)
    with _translated(path):
        fs = gcs.filesystem()
        fs.invalidate_cache(_key(path))
        return fs.isdir(_key(path))


def read_bytes(path: str | os.PathLike) -> bytes:
    path = check_path(path)
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    with _translated(path):
        return gcs.filesystem().cat_file(_key(path))


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    return read_bytes(path).decode(encoding)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` atomically: readers see the old content or all of the new."""
    path = check_path(path)
    if is_remote(path):
        with _translated(path):
            gcs.filesystem().pipe_file(_key(path), data)
        return
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes(path, text.encode(encoding))


def open_file(path: str | os.PathLike, mode: str = "rb", **kwargs: Any) -> IO:
    """A file object; for URLs a gcsfs file (reads fetch blocks on demand, seek works)."""
    path = check_path(path)
    if not is_remote(path):
        return open(path, mode, **kwargs)
    with _translated(path):
        return gcs.filesystem().open(_key(path), mode, **kwargs)


def size(path: str | os.PathLike) -> int:
    path = check_path(path)
    if not is_remote(path):
        return os.path.getsize(path)
    with _translated(path):
        return int(gcs.filesystem().size(_key(path)))


def version(path: str | os.PathLike) -> str:
    """Changes whenever the file does: the GCS generation, locally size and mtime."""
    path = check_path(path)
    if not is_remote(path):
        stat = os.stat(path)
        return f"{stat.st_size}-{stat.st_mtime_ns}"
    with _translated(path):
        info = gcs.filesystem().info(_key(path))
    return f"{info['size']}-{info['generation']}"


def versions(path: str | os.PathLike) -> dict[str, str]:
    """{name: version (as `version` gives it)} of the files directly under `path`, from one
    listing (one request on GCS, however many files)."""
    path = check_path(path)
    if not is_remote(path):
        return {e.name: version(e.path) for e in os.scandir(path) if e.is_file()}
    with _translated(path):
        fs = gcs.filesystem()
        fs.invalidate_cache(_key(path))
        entries = fs.ls(_key(path), detail=True)
    return {
        e["name"].rsplit("/", 1)[-1]: f"{e['size']}-{e['generation']}"
        for e in entries
        if e.get("type") == "file"
    }


def listdir(path: str | os.PathLike) -> list[str]:
    """The names directly under `path` (files and sub-directories), sorted."""
    path = check_path(path)
    if not is_remote(path):
        return sorted(os.listdir(path))
    with _translated(path):
        fs = gcs.filesystem()
        fs.invalidate_cache(_key(path))
        entries = fs.ls(_key(path), detail=False)
    return sorted({entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries})


def glob(pattern: str) -> list[str]:
    """The files and directories matching `pattern` (** recurses), sorted."""
    pattern = check_path(pattern)
    if not is_remote(pattern):
        return sorted(globlib.glob(pattern, recursive=True))
    with _translated(pattern):
        fs = gcs.filesystem()
        fs.invalidate_cache()
        return sorted(SCHEME + p for p in fs.glob(_key(pattern)))


def walk_files(path: str | os.PathLike) -> list[str]:
    """Every file under the directory `path`, recursively, sorted."""
    path = check_path(path)
    if not is_remote(path):
        return sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files)
    with _translated(path):
        fs = gcs.filesystem()
        fs.invalidate_cache(_key(path))
        return sorted(SCHEME + p for p in fs.find(_key(path)))


def makedirs(path: str | os.PathLike) -> None:
    """Creates a local directory and its parents; nothing to do for a URL."""
    path = check_path(path)
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def remove(path: str | os.PathLike) -> None:
    """Deletes one file (missing is fine)."""
    path = check_path(path)
    if not is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    with _translated(path), contextlib.suppress(FileNotFoundError):
        gcs.filesystem().rm_file(_key(path))


def remove_tree(path: str | os.PathLike) -> None:
    """Deletes a directory and everything in it (missing is fine)."""
    path = check_path(path)
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    for url in walk_files(path):
        remove(url)
    _forget_listings()


def copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copies one file between any two places (local or gs://); the target appears whole."""
    source, target = check_path(source), check_path(target)
    if is_remote(source) and is_remote(target):
        with _translated(source):
            gcs.filesystem().copy(_key(source), _key(target))
    elif is_remote(source):
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        tmp = f"{target}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with _translated(source):
                gcs.filesystem().get_file(_key(source), tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    elif is_remote(target):
        with _translated(target):
            gcs.filesystem().put_file(source, _key(target))
    else:
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        shutil.copyfile(source, target)


def copy_tree(source: str | os.PathLike, target: str | os.PathLike) -> list[str]:
    """Copies every file under `source` to the same relative path under `target`; returns
    the relative paths copied."""
    source, target = check_path(source), check_path(target)
    relative = [_relative(f, source) for f in walk_files(source)]
    for rel in relative:
        copy(join(source, *rel.split("/")), join(target, *rel.split("/")))
    return relative


def move_tree(source: str | os.PathLike, target: str | os.PathLike, *, last: str = "") -> None:
    """Moves a directory. Locally one rename. On GCS, which has no rename, every object is
    copied first and the originals deleted after, starting with the file `last` names
    (relative), so that a reader keyed on it (orbax's commit_success.txt) stops seeing the
    source before the rest goes: an interruption leaves both copies, never neither."""
    source, target = check_path(source), check_path(target)
    if not is_remote(source) and not is_remote(target):
        os.rename(source, target)
        return
    relative = copy_tree(source, target)
    first = [r for r in relative if r == last]
    for rel in first + [r for r in relative if r != last]:
        remove(join(source, *rel.split("/")))
    _forget_listings()


def _forget_listings() -> None:
    """gcsfs caches directory listings, and orbax (through etils.epath) lists with the same
    filesystem object: after a change of many files, every cached listing goes."""
    gcs.filesystem().invalidate_cache()


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/") + "/"
    if is_remote(path):
        return path[len(root) :]
    return os.path.relpath(path, root).replace(os.sep, "/")
