"""Prepared data in a bucket, read on every host of a pod: a local copy per host.

ArrayRecord readers need local files, and the loader reads every shard (the global shuffle
spreads each batch over the whole split), so each host copies the shards of the splits it reads
to its own disk once: CACHE/prepared/<bucket>-<hash of the URL>/. The copy is checked at every
start against the bucket: metadata.json must be the same bytes, and every shard must have the
size and GCS generation it had when it was copied (one listing of the directory, however many
shards); a shard that differs or is missing is copied again, each one atomically (a temporary
file renamed into place), so a host killed while copying resumes where it stopped and two
processes on one host never see a half-written shard.

Why a copy rather than reading the bucket directly or through a gcsfuse mount: random access
to 4-byte-aligned records of a few hundred bytes each would cost one request per record, and
a mount needs root and a daemon on every host; a pod's data is read for every epoch, and a
local disk holds it easily (benchmarks/data_cache.py measures the copy).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from debertina_jax import storage
from debertina_jax.data import format as fmt

logger = logging.getLogger(__name__)

MANIFEST = "cache.json"
CACHE_VARIABLE = "DEBERTINA_CACHE"


def cache_root(configured: str | None = None) -> Path:
    """data.cache_dir, else $DEBERTINA_CACHE, else ~/.cache/debertina_jax."""
    root = configured or os.environ.get(CACHE_VARIABLE)
    return Path(root or Path.home() / ".cache" / "debertina_jax")


def cache_dir_for(url: str, root: str | os.PathLike | None = None) -> Path:
    """The local directory that holds the copy of the prepared data at `url`."""
    bucket, _ = storage.split_bucket(url)
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return cache_root(None if root is None else str(root)) / "prepared" / f"{bucket}-{digest}"


def _shards(metadata: dict, splits: Iterable[str]) -> list[str]:
    return [name for split in splits for name in metadata["splits"][split]["files"]]


def local_copy(
    url: str,
    *,
    root: str | os.PathLike | None = None,
    splits: Iterable[str] = fmt.SPLITS,
    threads: int = 8,
) -> Path:
    """A local directory with the prepared data of `url` (metadata.json and the shards of
    `splits`), copied or brought up to date as the module docstring says."""
    local = cache_dir_for(url, root)
    metadata = fmt.read_metadata(url)  # checked: a clear error when it is not prepared data
    text = storage.read_text(storage.join(url, fmt.METADATA_FILE))
    names = _shards(metadata, splits)
    remote = storage.versions(url)
    missing = [n for n in names if n not in remote]
    if missing:
        raise FileNotFoundError(
            f"shard {storage.join(url, missing[0])} listed in {url}/{fmt.METADATA_FILE} is "
            f"missing ({len(missing)} of {len(names)} missing)"
        )
    manifest_path = local / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest.get("metadata") != text:
        manifest = {"url": url, "metadata": text, "files": {}}
    have = manifest["files"]
    todo = [
        n
        for n in names
        if have.get(n) != remote[n]
        or not (local / n).is_file()
        or (local / n).stat().st_size != int(remote[n].split("-")[0])
    ]
    local.mkdir(parents=True, exist_ok=True)
    if todo:
        start = time.monotonic()
        size = sum(int(remote[n].split("-")[0]) for n in todo)
        logger.info("copying %d shard(s), %.1f MB, of %s to %s", len(todo), size / 1e6, url, local)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda n: storage.copy(storage.join(url, n), str(local / n)), todo))
        logger.info("copied in %.1f s", time.monotonic() - start)
    # Only now the metadata: the copy reads as prepared data once every shard is in place.
    storage.write_text(str(local / fmt.METADATA_FILE), text)
    manifest["files"] = {**have, **{n: remote[n] for n in names}}
    storage.write_text(str(manifest_path), json.dumps(manifest, indent=1))
    return local


def upload(local: str | os.PathLike, url: str, *, threads: int = 8) -> None:
    """Copies prepared data from a local directory to `url`: the shards first, metadata.json
    last (its presence says the data is complete), then records the local directory as the
    cache of `url`, so the host that prepared the data does not copy it back."""
    local = Path(local)
    metadata = fmt.read_metadata(local)
    names = _shards(metadata, metadata["splits"])
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda n: storage.copy(str(local / n), storage.join(url, n)), names))
    text = (local / fmt.METADATA_FILE).read_text()
    storage.write_text(storage.join(url, fmt.METADATA_FILE), text)
    remote = storage.versions(url)
    manifest = {"url": url, "metadata": text, "files": {n: remote[n] for n in names}}
    storage.write_text(str(local / MANIFEST), json.dumps(manifest, indent=1))
