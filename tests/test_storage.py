"""debertina_jax.storage against local paths and the GCS emulator (tests/gcs_emulator.py)."""

from __future__ import annotations

import gzip

import pytest

from debertina_jax import storage
from debertina_jax.storage import objects


@pytest.mark.parametrize(
    "path, hint",
    [
        ("gs:/bucket/run", "did you mean gs://bucket/run"),
        ("gs:bucket/run", "did you mean gs://bucket/run"),
        ("gcs://bucket/run", "did you mean gs://bucket/run"),
        ("s3://bucket/run", "only local paths and gs:// URLs"),
        ("gs://Bucket/run", "not a valid bucket name"),
        ("gs://b/run", "not a valid bucket name"),
        ("gs://bucket//run", "empty path component"),
    ],
)
def test_malformed_urls_are_refused(path, hint):
    with pytest.raises(storage.StoragePathError, match=hint) as info:
        storage.check_path(path, "--workdir")
    assert "--workdir" in str(info.value)


@pytest.mark.parametrize("path", ["runs/tiny", "/tmp/x", "run:1", "./gs", "gs"])
def test_local_paths_pass(path):
    assert storage.check_path(path) == path
    assert not storage.is_remote(path)


def test_join_parent_name_absolute(tmp_path, monkeypatch):
    assert storage.join("gs://b-1/run", "checkpoints", "10") == "gs://b-1/run/checkpoints/10"
    assert storage.join("gs://b-1/run/", "x") == "gs://b-1/run/x"
    assert storage.parent("gs://b-1/run/x") == "gs://b-1/run"
    assert storage.name("gs://b-1/run/x/") == "x"
    assert storage.absolute("gs://b-1/run/") == "gs://b-1/run"
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("runs/tiny") == str(tmp_path / "runs" / "tiny")


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("gcs_bucket") + "/root"


def test_files_round_trip(root, tmp_path):
    storage.makedirs(root)
    a = storage.join(root, "a.txt")
    storage.write_text(a, "hello")
    storage.write_bytes(storage.join(root, "sub", "b.bin") if storage.is_remote(root) else a, b"")
    assert storage.read_text(a) in ("hello", "")
    storage.write_text(a, "hello again")  # replaced whole
    assert storage.read_text(a) == "hello again"
    assert storage.exists(a) and storage.is_file(a) and not storage.is_dir(a)
    assert storage.size(a) == len("hello again")
    storage.makedirs(storage.join(root, "d"))
    storage.write_text(storage.join(root, "d", "x.jsonl"), "1\n")
    storage.write_text(storage.join(root, "d", "y.txt"), "2\n")
    assert "d" in storage.listdir(root) and storage.is_dir(storage.join(root, "d"))
    assert storage.glob(storage.join(root, "d", "*.jsonl")) == [storage.join(root, "d", "x.jsonl")]
    assert storage.glob(storage.join(root, "**", "*.txt"))[-1] == storage.join(root, "d", "y.txt")

    with storage.open_file(storage.join(root, "c.gz"), "wb") as f:
        f.write(gzip.compress(b"line1\nline2\n"))
    with storage.open_file(storage.join(root, "c.gz"), "rb") as f, gzip.open(f) as g:
        assert g.read().splitlines() == [b"line1", b"line2"]
    with storage.open_file(a, "rb") as f:
        f.seek(6)
        assert f.read() == b"again"

    version = storage.version(a)
    storage.write_text(a, "changed")
    assert storage.version(a) != version

    local = str(tmp_path / "copied" / "a.txt")
    storage.copy(a, local)
    storage.copy(local, storage.join(root, "back.txt"))
    assert storage.read_text(storage.join(root, "back.txt")) == "changed"

    storage.move_tree(storage.join(root, "d"), storage.join(root, "moved"), last="y.txt")
    assert not storage.exists(storage.join(root, "d", "x.jsonl"))
    assert storage.read_text(storage.join(root, "moved", "x.jsonl")) == "1\n"
    storage.remove_tree(storage.join(root, "moved"))
    assert not storage.exists(storage.join(root, "moved", "y.txt"))
    storage.remove(a)
    storage.remove(a)  # twice is fine
    assert not storage.exists(a)


def test_generation_preconditions(gcs_bucket):
    url = f"{gcs_bucket}/run/run.lock"
    assert objects.read(url) is None
    assert objects.write_if(url, b"one", 0)
    assert not objects.write_if(url, b"two", 0)  # exists already
    data, generation = objects.read(url)
    assert data == b"one"
    assert not objects.write_if(url, b"three", generation + 1)
    assert objects.write_if(url, b"three", generation)
    assert not objects.delete_if(url, generation)  # it moved on
    data, generation = objects.read(url)
    assert data == b"three" and objects.delete_if(url, generation)
    assert objects.read(url) is None


def test_missing_bucket_and_denied_bucket_are_clear(gcs_emulator):
    with pytest.raises(storage.BucketNotFoundError, match="bucket gs://no-such-bucket does not"):
        storage.check_access("gs://no-such-bucket/run")
    with pytest.raises(storage.StoragePermissionError, match="permission denied for gs://denied"):
        storage.check_access("gs://denied-bucket/run")
    with pytest.raises(storage.StoragePermissionError, match="permission denied"):
        storage.read_text("gs://denied-bucket/run/config.yaml")
    storage.check_access(gcs_emulator.create_bucket() + "/run")  # fine


def test_no_credentials_is_clear(monkeypatch, tmp_path):
    from debertina_jax.storage import gcs

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    gcs._client.cache_clear()
    try:
        with pytest.raises(storage.StoragePermissionError, match="no Google Cloud credentials"):
            storage.check_access("gs://some-bucket/run")
    finally:
        gcs._client.cache_clear()
