"""Loader: order, resumption, per-process slices, shapes and bad inputs, on tiny shards."""

import json
import shutil

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from debertina_jax.data.format import (
    FORMAT_VERSION,
    IncompatibleDataError,
    PreparedDataError,
    ShardWriter,
    write_metadata,
)
from debertina_jax.data.loader import LoaderError, make_eval_loader, make_loader

PAD, CLS, SEP = 0, 1, 2
SEQ = 16
NUM_TRAIN, NUM_EVAL = 97, 11  # odd on purpose: 2 processes leave one line out per epoch


def _write_prepared(directory, lines_by_split, seq_len=SEQ, shards=3):
    directory.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, lines in lines_by_split.items():
        writer = ShardWriter(directory, split, lines_per_shard=-(-len(lines) // shards))
        for line in lines:
            writer.write(np.asarray(line))
        splits[split] = writer.close()
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer_fingerprint": "test-fingerprint",
        "max_seq_length": seq_len,
        "pad_id": PAD,
        "cls_id": CLS,
        "sep_id": SEP,
        "mask_id": 100,
        "splits": splits,
        "num_documents": 7,
    }
    write_metadata(directory, meta)
    return directory


def _make_lines(count, first_id, rng):
    """[CLS] id ... [SEP] lines of varied length; token 1 is a unique line id."""
    lines = []
    for i in range(count):
        body = rng.integers(5, 99, size=rng.integers(1, SEQ - 2))
        lines.append([CLS, first_id + i, *body.tolist(), SEP])
    return lines


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    rng = np.random.default_rng(0)
    lines = {"train": _make_lines(NUM_TRAIN, 1000, rng), "eval": _make_lines(NUM_EVAL, 5000, rng)}
    return _write_prepared(tmp_path_factory.mktemp("prepared"), lines), lines


def _line_ids(batches):
    return [int(i) for b in batches for i in b["input_ids"][:, 1]]


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_are_padded_lines_of_fixed_shape(prepared):
    data_dir, lines = prepared
    by_id = {line[1]: line for line in lines["train"]}
    loader = make_loader(data_dir, "train", 8, seed=0, shard_index=0, shard_count=1)
    for batch in _take(loader, 3):
        assert set(batch) == {"input_ids"}
        ids = batch["input_ids"]
        assert ids.shape == (8, SEQ) and ids.dtype == np.int32
        for row in ids:
            line = by_id[int(row[1])]
            np.testing.assert_array_equal(row[: len(line)], line)
            assert (row[len(line) :] == PAD).all()


def test_defaults_to_the_jax_process_layout(prepared):
    loader = make_loader(prepared[0], "train", 8, seed=0, max_seq_length=SEQ)
    assert loader.identity["shard_index"] == 0 and loader.identity["shard_count"] == 1
    assert next(loader)["input_ids"].shape == (8, SEQ)


def test_seed_fixes_the_order(prepared):
    order = lambda seed: _line_ids(_take(make_loader(prepared[0], "train", 8, seed=seed), 5))
    assert order(3) == order(3)
    assert order(3) != order(4)
    unshuffled = _line_ids(_take(make_loader(prepared[0], "train", 8, seed=3, shuffle=False), 2))
    assert unshuffled == list(range(1000, 1016))


def test_processes_read_disjoint_blocks_of_the_same_global_batches(prepared):
    # 2 processes x 2 rows = a global batch of 4. Each process reads its own rows of every
    # global batch, so the global batches are those of a single process reading all of them.
    single = make_loader(
        prepared[0], "train", 4, seed=7, num_epochs=2, shard_index=0, shard_count=1
    )
    parts = [
        make_loader(prepared[0], "train", 4, seed=7, num_epochs=2, shard_index=i, shard_count=2)
        for i in range(2)
    ]
    assert single.num_batches == parts[0].num_batches == parts[1].num_batches == 2 * 97 // 4
    stream = []
    for whole, first, second in zip(single, *parts, strict=True):
        np.testing.assert_array_equal(
            whole["input_ids"], np.concatenate([first["input_ids"], second["input_ids"]])
        )
        halves = [_line_ids([first]), _line_ids([second])]
        assert not set(halves[0]) & set(halves[1])  # no line read by both processes
        stream += halves[0] + halves[1]
    # The stream is epoch after epoch of permutations: nothing lost or read twice per epoch.
    assert sorted(stream[:NUM_TRAIN]) == list(range(1000, 1000 + NUM_TRAIN))
    assert stream[:NUM_TRAIN] != sorted(stream[:NUM_TRAIN])


def test_one_process_epoch_covers_every_line(prepared):
    loader = make_loader(prepared[0], "train", 1, seed=1, num_epochs=2)
    assert loader.num_batches == 2 * NUM_TRAIN
    ids = _line_ids(list(loader))
    assert len(ids) == 2 * NUM_TRAIN
    assert sorted(ids[:NUM_TRAIN]) == sorted(ids[NUM_TRAIN:]) == list(range(1000, 1097))
    assert ids[:NUM_TRAIN] != ids[NUM_TRAIN:]


def test_restore_mid_epoch_gives_the_same_next_batches(prepared):
    make = lambda: make_loader(prepared[0], "train", 16, seed=5, shard_index=1, shard_count=2)
    loader = make()
    _take(loader, 4)
    state = json.loads(json.dumps(loader.get_state()))  # must survive a JSON checkpoint
    expected = _line_ids(_take(loader, 5))  # runs into the second epoch (6 batches per epoch)
    restored = make()
    next(restored)  # a position that the restore must overwrite
    restored.set_state(state)
    assert _line_ids(_take(restored, 5)) == expected


def test_state_from_another_loader_is_refused(prepared):
    state = make_loader(prepared[0], "train", 8, seed=5).get_state()
    other = make_loader(prepared[0], "train", 8, seed=6)
    with pytest.raises(LoaderError, match="seed: saved 5, now 6"):
        other.set_state(state)
    with pytest.raises(LoaderError, match="not a loader state"):
        other.set_state({"next_index": 3})


def test_worker_processes_give_the_same_batches(prepared):
    make = lambda workers: make_loader(prepared[0], "train", 8, seed=2, worker_count=workers)
    with make(0) as plain, make(1) as workers:
        assert _line_ids(_take(workers, 3)) == _line_ids(_take(plain, 3))
        json.dumps(workers.get_state())


def test_eval_pass_uses_every_line_once(prepared):
    data_dir, lines = prepared
    rows, counts = [], []
    for index in range(2):
        loader = make_eval_loader(data_dir, "eval", 4, shard_index=index, shard_count=2)
        batches = list(loader)
        counts.append(len(batches))
        assert len(batches) == loader.num_batches
        for b in batches:
            assert b["input_ids"].shape == (2, SEQ) and b["weights"].dtype == np.float32
            assert (b["input_ids"][b["weights"] == 0] == PAD).all()
            rows += [int(i) for i in b["input_ids"][b["weights"] == 1, 1]]
    assert counts == [3, 3]  # 6 and 5 lines, batches of 2: both processes run 3 steps
    assert sorted(rows) == [line[1] for line in lines["eval"]]
    # More processes than lines: the last ones run one step on pad rows only.
    (batch,) = list(make_eval_loader(data_dir, "eval", 16, shard_index=15, shard_count=16))
    assert batch["weights"].tolist() == [0.0] and (batch["input_ids"] == PAD).all()


def test_missing_inputs(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_loader(tmp_path / "nowhere", "train", 8, seed=0)
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        make_loader(tmp_path, "train", 8, seed=0)
    with pytest.raises(PreparedDataError, match="no split 'test'"):
        make_loader(prepared[0], "test", 8, seed=0)
    copy = tmp_path / "copy"
    shutil.copytree(prepared[0], copy)
    (copy / "train-00001.array_record").unlink()
    with pytest.raises(FileNotFoundError, match="train-00001.array_record"):
        make_loader(copy, "train", 8, seed=0)


def test_bad_settings(prepared):
    data_dir = prepared[0]
    with pytest.raises(
        IncompatibleDataError, match="max_seq_length 32 asked for.*max_seq_length 16"
    ):
        make_loader(data_dir, "train", 8, seed=0, max_seq_length=32)
    with pytest.raises(LoaderError, match="global batch size 9 .* 2 processes"):
        make_loader(data_dir, "train", 9, seed=0, shard_index=0, shard_count=2)
    with pytest.raises(LoaderError, match="shard_index 2"):
        make_loader(data_dir, "train", 8, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(LoaderError, match="no full batch"):
        make_loader(data_dir, "eval", 16, seed=0, num_epochs=1)


def _rewrite_metadata(src, dst, **changes):
    shutil.copytree(src, dst)
    meta = json.loads((dst / "metadata.json").read_text())
    for key, value in changes.items():
        if key == "num_lines":
            meta["splits"]["train"]["num_lines"] = value
        else:
            meta[key] = value
    (dst / "metadata.json").write_text(json.dumps(meta))
    return dst


def test_metadata_that_does_not_match_the_shards(prepared, tmp_path):
    data_dir = prepared[0]
    wrong_count = _rewrite_metadata(data_dir, tmp_path / "count", num_lines=98)
    with pytest.raises(PreparedDataError, match="says 98 lines, the shards hold 97"):
        make_loader(wrong_count, "train", 8, seed=0)
    too_short = _rewrite_metadata(data_dir, tmp_path / "short", max_seq_length=4)
    with pytest.raises(PreparedDataError, match="longer than max_seq_length 4"):
        next(make_loader(too_short, "train", 8, seed=0, read_threads=0))
    version = _rewrite_metadata(data_dir, tmp_path / "version", format_version=2)
    with pytest.raises(PreparedDataError, match="format_version 2"):
        make_loader(version, "train", 8, seed=0)
    odd = _rewrite_metadata(data_dir, tmp_path / "odd", num_lines=1)
    writer = ArrayRecordWriter(str(odd / "train-00000.array_record"), "group_size:1")
    writer.write(b"abc")
    writer.close()
    meta = json.loads((odd / "metadata.json").read_text())
    meta["splits"]["train"]["files"] = ["train-00000.array_record"]
    (odd / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(PreparedDataError, match="split 'train' of .*odd: a record of 3 bytes"):
        next(make_loader(odd, "train", 1, seed=0))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "metadata.json").write_text("{not json")
    with pytest.raises(PreparedDataError, match="not valid JSON"):
        make_loader(tmp_path / "junk", "train", 8, seed=0)
