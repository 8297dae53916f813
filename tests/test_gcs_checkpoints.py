"""Checkpoints and prepared data in a bucket (the GCS emulator): a storage error while saving is
retried, then stops with the last good checkpoint named; a damaged checkpoint is set aside
(copy, then delete: GCS has no rename); each host's local copy of the shards follows the bucket.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from debertina_jax import storage
from debertina_jax.data import cache
from debertina_jax.data import format as fmt
from debertina_jax.runtime.checkpointing import Checkpointer, CheckpointSaveError


def _state(scale: float = 1.0) -> dict:
    return {f"w{i}": jnp.arange(1000, dtype=jnp.float32) * (i + scale) for i in range(3)}


def _abstract(state: dict) -> dict:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        state)  # fmt: skip


def _save(checkpointer: Checkpointer, step: int) -> None:
    """What the loop does: save; on failure, save the same state again (retry_save)."""
    state = _state(step)
    try:
        checkpointer.save(step, state, {"step": step}, {}, force=True)
        checkpointer.wait()
    except CheckpointSaveError as failure:
        checkpointer.retry_save(step, state, {"step": step}, {}, failure)


def test_a_storage_error_is_retried_then_stops_naming_the_last_good_checkpoint(
    gcs_emulator, gcs_bucket, caplog
):
    workdir = f"{gcs_bucket}/run"
    prefix = "run/checkpoints/"
    with Checkpointer(workdir, every_steps=1, keep=5, save_retries=2, retry_delay=0.01) as ckpt:
        _save(ckpt, 1)
        gcs_emulator.fault(prefix + "2/", status=403, count=1)  # the first write is refused
        _save(ckpt, 2)
        assert ckpt.all_steps() == [1, 2]
        assert "written on retry 1" in caplog.text

        gcs_emulator.fault(prefix + "3/", status=403, count=-1)  # lost permission for good
        with pytest.raises(CheckpointSaveError) as info:
            _save(ckpt, 3)
        gcs_emulator.fault(prefix + "3/", count=0)
    message = str(info.value)
    assert f"could not write the checkpoint of step 3 to {workdir}/checkpoints/3" in message
    assert f"The last good checkpoint is step 2 ({workdir}/checkpoints/2)" in message
    with Checkpointer(workdir, every_steps=1, keep=5, read_only=True) as reader:
        assert reader.all_steps() == [1, 2]
        restored = reader.restore(2, _abstract(_state()))
    np.testing.assert_array_equal(restored.state["w1"], _state(2)["w1"])


def test_a_damaged_checkpoint_in_a_bucket_is_set_aside(gcs_bucket):
    workdir = f"{gcs_bucket}/run"
    with Checkpointer(workdir, every_steps=1, keep=5) as ckpt:
        for step in (1, 2):
            _save(ckpt, step)
    arrays = [f for f in storage.walk_files(f"{workdir}/checkpoints/2/state") if "/d/" in f]
    for url in arrays:
        storage.write_bytes(url, b"damaged")
    with Checkpointer(workdir, every_steps=1, keep=5) as ckpt:
        restored, step = ckpt.restore_newest_readable(_abstract(_state()))
        assert step == 1 and restored.data_state == {"step": 1}
        assert ckpt.all_steps() == [1]
    names = storage.listdir(f"{workdir}/checkpoints")
    assert names == ["1", "2.unreadable"]
    assert storage.read_bytes(arrays[0].replace("/2/", "/2.unreadable/")) == b"damaged"


def _prepared(directory, files: dict[str, bytes]) -> None:
    """A minimal prepared directory: its metadata lists `files` as train shards."""
    for name, data in files.items():
        storage.write_bytes(storage.join(directory, name), data)
    metadata = {
        "format_version": fmt.FORMAT_VERSION, "tokenizer_fingerprint": "x", "max_seq_length": 8,
        "pad_id": 0, "cls_id": 1, "sep_id": 2, "mask_id": 9, "num_documents": 1,
        "splits": {"train": {"files": sorted(files), "num_lines": 1}},
    }  # fmt: skip
    storage.write_text(storage.join(directory, fmt.METADATA_FILE), json.dumps(metadata))


def test_each_host_copies_the_shards_once_and_again_when_they_change(gcs_bucket, tmp_path):
    url = f"{gcs_bucket}/data"
    _prepared(url, {"train-00000.array_record": b"a" * 10, "train-00001.array_record": b"b" * 5})
    local = cache.local_copy(url, root=tmp_path, splits=["train"])
    assert (local / "train-00001.array_record").read_bytes() == b"b" * 5
    assert fmt.read_metadata(local)["splits"]["train"]["num_lines"] == 1

    (local / "train-00000.array_record").write_bytes(b"mine")  # a local copy gone wrong
    storage.write_bytes(f"{url}/train-00001.array_record", b"c" * 5)  # re-prepared upstream
    before = (local / "train-00001.array_record").stat().st_mtime_ns
    again = cache.local_copy(url, root=tmp_path, splits=["train"])
    assert again == local
    assert (local / "train-00000.array_record").read_bytes() == b"a" * 10
    assert (local / "train-00001.array_record").read_bytes() == b"c" * 5
    assert (local / "train-00001.array_record").stat().st_mtime_ns != before

    storage.remove(f"{url}/train-00000.array_record")
    with pytest.raises(FileNotFoundError, match="train-00000.array_record listed in"):
        cache.local_copy(url, root=tmp_path, splits=["train"])
