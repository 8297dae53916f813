"""Writing OUT atomically: everything goes into a hidden staging directory next to OUT, which is
renamed into place only when complete, so an interrupted export never leaves a half-written
model under OUT."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from debertina_jax.export.errors import OutputPathError


def check_output(output: Path, overwrite: bool, workdir: Path) -> None:
    """A file, a non-empty directory without `overwrite`, or a directory holding the run itself
    (which `overwrite` would delete) is refused before any work."""
    if output.resolve() in (workdir.resolve(), *workdir.resolve().parents):
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
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
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
        old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(output, old)
    try:
        os.rename(staging, output)
    except OSError:
        if old is not None:
            os.rename(old, output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask_permissions(path: Path) -> None:
    """The permissions a plain mkdir/open would give: mkdtemp and safetensors use 0o700/0o600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
