"""Writing OUT atomically: everything goes into a hidden staging directory next to OUT, which is
renamed into place only when complete, so an interrupted export never leaves a half-written
model under OUT.

The hidden directories are named `.OUT.<host>-<pid>-<random>.tmp` (staging) and
`.OUT.<host>-<pid>-<random>.old` (a replaced OUT, deleted once the new one is in place). An
export killed with SIGKILL cannot clean up after itself, so the next export to the same OUT
removes the ones whose process is gone (same host, pid no longer running), and says so. Those of
a live process, or of another host, are left alone: another export may be writing them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from debertina_jax import storage
from debertina_jax.export.errors import OutputPathError

log = logging.getLogger(__name__)


def check_output(output: Path, overwrite: bool, workdir: Path | None) -> None:
    """A file, a non-empty directory without `overwrite`, or a directory holding the run itself
    (which `overwrite` would delete) is refused before any work. `workdir` None: the run is
    in a bucket, nothing local to protect."""
    if workdir is not None and output.resolve() in (workdir.resolve(), *workdir.resolve().parents):
        raise OutputPathError(
            f"output directory {output} holds the run {workdir}; choose another directory"
        )
    if output.exists() and not output.is_dir():
        raise OutputPathError(f"output path {output} is a file; give a directory path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputPathError(
            f"output directory {output} is not empty; pass --overwrite (overwrite=True) to "
            "replace it"
        )
    if output.parent.exists() and not output.parent.is_dir():
        raise OutputPathError(f"cannot create {output}: {output.parent} is a file")


@contextlib.contextmanager
def staging_dir(output: Path) -> Iterator[Path]:
    """A fresh hidden directory beside `output`, deleted on the way out unless `publish`ed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(output)
    prefix = _hidden_prefix(output)
    staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=output.parent))
    _umask_permissions(staging)
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, output: Path) -> None:
    """Renames the finished `staging` directory to `output`, replacing what was there.

    Both live in the same parent, so each rename is atomic; an old `output` is moved aside
    first and deleted last, so at no time does `output` hold a partial export.
    """
    for path in staging.rglob("*"):
        _umask_permissions(path)
    old = None
    if output.exists():
        old = output.with_name(f"{_hidden_prefix(output)}{uuid.uuid4().hex[:8]}.old")
        os.rename(output, old)
    try:
        os.rename(staging, output)
    except OSError:
        if old is not None:
            os.rename(old, output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale(output: Path) -> list[Path]:
    """Deletes the hidden directories of earlier exports to `output` whose process is gone."""
    pattern = re.compile(rf"^\.{re.escape(output.name)}\.(.+)-(\d+)-[^.]+\.(tmp|old)$")
    removed = []
    if not output.parent.is_dir():
        return removed
    for path in output.parent.iterdir():
        match = pattern.match(path.name)
        if match is None or match[1] != socket.gethostname() or _running(int(match[2])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s, left by an export that was killed (pid %s)", path, match[2])
        removed.append(path)
    return removed


def _hidden_prefix(output: Path) -> str:
    return f".{output.name}.{socket.gethostname()}-{os.getpid()}-"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _umask_permissions(path: Path) -> None:
    """The permissions a plain mkdir/open would give: mkdtemp and safetensors use 0o700/0o600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def check_remote_output(output: str, overwrite: bool, workdir: str) -> None:
    """`check_output` for a gs:// OUT: not the run's own prefix, empty unless `overwrite`."""
    if workdir.rstrip("/").startswith(output.rstrip("/") + "/") or workdir == output:
        raise OutputPathError(f"output {output} holds the run {workdir}; choose another place")
    if storage.walk_files(output) and not overwrite:
        raise OutputPathError(
            f"output {output} is not empty; pass --overwrite (overwrite=True) to replace it"
        )


def upload(staging: Path, output: str) -> None:
    """Copies a finished export to a gs:// OUT. GCS has no rename, so it cannot appear at once:
    each model's config.json goes last, so a model directory without one is an upload that did
    not finish (transformers refuses it) rather than a model with missing weights."""
    storage.remove_tree(output)  # an earlier export there (check_remote_output allowed it)
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == "config.json")
    for path in files:
        relative = path.relative_to(staging).as_posix()
        storage.copy(str(path), storage.join(output, *relative.split("/")))
