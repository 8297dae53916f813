"""Prepare step: packing, shards, eval split, parallel and resumed runs, bad input."""

import json
import os
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest
from dataset_testing import SPLIT, build_tfds_corpus, write_hf_corpus

import debertina_jax
from debertina_jax.cli import prepare as prepare_cli
from debertina_jax.data import format as fmt
from debertina_jax.data import prepare as prep
from debertina_jax.data.sources import DocumentSource, EmptyCorpusError, SourceError, WorkUnit
from debertina_jax.data.sources.hf_datasets import HfDataset, HfDatasetSource
from debertina_jax.data.sources.local import LocalFiles
from debertina_jax.data.sources.tfds import TfdsSource
from debertina_jax.data.tokenizer import Tokenizer, train_tokenizer

SAMPLE_DIR = Path(debertina_jax.__file__).parent / "sample_data" / "pt"
SEQ = 64
FALLBACK = "Texto de teste com ação, coração e informação; números 123 e 4,5.\n" * 400


def _corpus_texts() -> list[str]:
    texts = [p.read_text(encoding="utf-8") for p in sorted(SAMPLE_DIR.glob("*.txt"))]
    return texts or [FALLBACK]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few .txt files (the sample corpus) plus a .jsonl, so units span several formats."""
    root = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(_corpus_texts()):
        (root / f"part{i}.txt").write_text(text, encoding="utf-8")
    docs = [{"text": f"Documento JSON {i}: ação número {i * 7}."} for i in range(40)]
    (root / "extra.jsonl").write_text("\n".join(json.dumps(d) for d in docs), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer([corpus], 500, out, num_threads=1)


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return Tokenizer.load(tok_dir)


def _source(corpus, chunk_bytes=4096):
    return LocalFiles([corpus], chunk_bytes=chunk_bytes)


def _expected_ids(tokenizer, corpus) -> np.ndarray:
    """The whole corpus tokenized document by document, the plain way."""
    docs = [d for d in LocalFiles([corpus], chunk_bytes=1 << 30).documents() if d.strip()]
    return np.concatenate([np.asarray(ids, np.int32) for ids in tokenizer.encode_batch(docs)])


def _lines(directory, split):
    return list(fmt.iter_lines(directory, split))


def _run(corpus, tok_dir, out, **kwargs):
    kwargs.setdefault("max_seq_length", SEQ)
    kwargs.setdefault("num_workers", 1)
    kwargs.setdefault("show_progress", False)
    return prep.prepare(_source(corpus, kwargs.pop("chunk_bytes", 4096)), tok_dir, out, **kwargs)


@pytest.fixture(scope="module")
def no_eval(tmp_path_factory, corpus, tok_dir):
    out = tmp_path_factory.mktemp("no_eval")
    return out, _run(corpus, tok_dir, out, eval_lines=0, lines_per_shard=7)


def test_lines_hold_the_corpus_exactly_once(no_eval, tokenizer, corpus):
    out, metadata = no_eval
    lines = _lines(out, "train")
    for line in lines:
        assert line[0] == tokenizer.cls_id and line[-1] == tokenizer.sep_id
        assert not np.isin(line[1:-1], [tokenizer.cls_id, tokenizer.sep_id]).any()
    assert all(len(line) == SEQ for line in lines[:-1]) and 3 <= len(lines[-1]) <= SEQ
    stored = np.concatenate([line[1:-1] for line in lines])
    np.testing.assert_array_equal(stored, _expected_ids(tokenizer, corpus))
    assert metadata["splits"]["train"]["num_lines"] == len(lines)
    assert metadata["splits"]["train"]["num_tokens"] == sum(map(len, lines))
    assert metadata["splits"]["eval"] == {"files": [], "num_lines": 0, "num_tokens": 0}


def test_metadata_and_shard_layout(no_eval, tokenizer):
    out, metadata = no_eval
    assert fmt.read_metadata(out) == metadata
    expected = {
        "format_version": 1,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "max_seq_length": SEQ,
        "pad_id": 0,
        "cls_id": 1,
        "sep_id": 2,
        "mask_id": tokenizer.mask_id,
    }
    assert {k: metadata[k] for k in expected} == expected
    files = metadata["splits"]["train"]["files"]
    assert files == [fmt.shard_name("train", i) for i in range(len(files))]
    assert files[0] == "train-00000.array_record" and len(files) > 1
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, "metadata.json"])
    assert metadata["num_documents"] > 40


def test_grain_reads_the_shards(no_eval):
    grain = pytest.importorskip("grain")
    out, metadata = no_eval
    source = grain.sources.ArrayRecordDataSource([str(p) for p in fmt.split_files(out, "train")])
    assert len(source) == metadata["splits"]["train"]["num_lines"]
    lines = _lines(out, "train")
    for index in (0, len(source) // 2, len(source) - 1):
        np.testing.assert_array_equal(fmt.decode_line(source[index]), lines[index])


def test_two_worker_processes_write_the_same_shards(no_eval, corpus, tok_dir, tmp_path):
    out, _ = no_eval
    _run(corpus, tok_dir, tmp_path, eval_lines=0, lines_per_shard=7, num_workers=2)
    ours, theirs = _lines(out, "train"), _lines(tmp_path, "train")
    assert len(ours) == len(theirs)
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_eval_split_is_a_seeded_sample_of_the_lines(no_eval, corpus, tok_dir, tmp_path):
    all_lines = _lines(no_eval[0], "train")
    metadata = _run(corpus, tok_dir, tmp_path, eval_lines=5, seed=3)
    train, evals = _lines(tmp_path, "train"), _lines(tmp_path, "eval")
    assert len(evals) == 5 == metadata["splits"]["eval"]["num_lines"]
    assert len(train) + len(evals) == len(all_lines)
    # Interleaving the splits back at the drawn positions gives the unsplit lines exactly.
    held_out = set(prep.eval_line_indices(len(all_lines), 5, seed=3).tolist())
    train_it, eval_it = iter(train), iter(evals)
    merged = [next(eval_it if i in held_out else train_it) for i in range(len(all_lines))]
    assert all(np.array_equal(a, b) for a, b in zip(merged, all_lines, strict=True))
    assert held_out != set(prep.eval_line_indices(len(all_lines), 5, seed=4).tolist())


def test_eval_fraction_and_default(corpus, tok_dir, tmp_path):
    metadata = _run(corpus, tok_dir, tmp_path / "f", eval_fraction=0.1)
    total = sum(s["num_lines"] for s in metadata["splits"].values())
    assert metadata["splits"]["eval"]["num_lines"] == round(0.1 * total)
    metadata = _run(corpus, tok_dir, tmp_path / "d")
    assert metadata["splits"]["eval"]["num_lines"] == max(1, round(0.01 * total))


def test_eval_split_larger_than_the_data(corpus, tok_dir, tmp_path, monkeypatch):
    with pytest.raises(prep.EvalSplitError, match=r"10000000 eval lines .* makes \d+ line"):
        _run(corpus, tok_dir, tmp_path, eval_lines=10_000_000)
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        _run(corpus, tok_dir, tmp_path, eval_fraction=1.0)
    # The tokenized units were kept: a smaller split now only packs again.
    monkeypatch.setattr(prep, "tokenize_unit", _fail("tokenized again"))
    assert _run(corpus, tok_dir, tmp_path, eval_lines=2)["splits"]["eval"]["num_lines"] == 2


def _fail(message):
    def fail(*args, **kwargs):
        raise AssertionError(message)

    return fail


def test_killed_run_resumes_where_it_stopped(no_eval, corpus, tok_dir, tmp_path, monkeypatch):
    real = prep.tokenize_unit
    calls = []

    def dies_on_third_unit(tokenizer, unit, index, work_dir, *args):
        calls.append(index)
        if len(calls) == 3:
            # Simulate a kill in the middle of writing: a partial temp file, no marker.
            (work_dir / f"unit-{index:06d}.tokens.tmp").write_bytes(b"\x01\x02")
            raise KeyboardInterrupt
        return real(tokenizer, unit, index, work_dir, *args)

    monkeypatch.setattr(prep, "tokenize_unit", dies_on_third_unit)
    with pytest.raises(KeyboardInterrupt):
        _run(corpus, tok_dir, tmp_path, eval_lines=0, lines_per_shard=7)
    assert not (tmp_path / "metadata.json").exists()
    assert len(list((tmp_path / prep.WORK_DIR).glob("*.done.json"))) == 2

    resumed = []
    monkeypatch.setattr(prep, "tokenize_unit", lambda *a: resumed.append(a[2]) or real(*a))
    metadata = _run(corpus, tok_dir, tmp_path, eval_lines=0, lines_per_shard=7)
    assert resumed and not set(resumed) & set(calls[:2]) and calls[2] in resumed
    assert metadata == no_eval[1]
    ours, fresh = _lines(tmp_path, "train"), _lines(no_eval[0], "train")
    assert all(np.array_equal(a, b) for a, b in zip(ours, fresh, strict=True))
    assert not (tmp_path / prep.WORK_DIR).exists()


def test_rerun_after_success(corpus, tok_dir, tmp_path, monkeypatch):
    first = _run(corpus, tok_dir, tmp_path, eval_lines=1)
    monkeypatch.setattr(prep, "tokenize_unit", _fail("tokenized again"))
    assert _run(corpus, tok_dir, tmp_path, eval_lines=1) == first  # done: nothing to do
    with pytest.raises(fmt.PreparedDataError, match="other settings.*--overwrite"):
        _run(corpus, tok_dir, tmp_path, eval_lines=2)
    monkeypatch.undo()
    again = _run(corpus, tok_dir, tmp_path, eval_lines=2, max_seq_length=32, overwrite=True)
    assert again["max_seq_length"] == 32 and again["splits"]["eval"]["num_lines"] == 2


def test_partial_run_with_other_settings_is_refused(corpus, tok_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "tokenize_unit", _fail("stop"))
    with pytest.raises(AssertionError):
        _run(corpus, tok_dir, tmp_path)
    monkeypatch.undo()
    with pytest.raises(fmt.PreparedDataError, match="partial prepare run with other settings"):
        _run(corpus, tok_dir, tmp_path, chunk_bytes=999)


def test_check_compatible(no_eval, tokenizer, corpus, tmp_path):
    out, metadata = no_eval
    assert fmt.check_compatible(out, tokenizer, max_seq_length=SEQ) == metadata
    with pytest.raises(fmt.IncompatibleDataError, match="max_seq_length 64, not 128"):
        fmt.check_compatible(out, tokenizer, max_seq_length=128)
    other = Tokenizer.load(train_tokenizer([corpus], 300, tmp_path / "other", num_threads=1))
    with pytest.raises(fmt.IncompatibleDataError, match="prepared with tokenizer"):
        fmt.check_compatible(out, other)
    with pytest.raises(FileNotFoundError, match="metadata.json not found"):
        fmt.check_compatible(tmp_path, tokenizer)


def test_empty_corpus(tok_dir, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "blank.txt").write_text("\n \n\t\n")
    (tmp_path / "in" / "empty.jsonl").write_text('{"text": ""}\n{"text": null}\n')
    with pytest.raises(EmptyCorpusError, match="no text"):
        prep.prepare(LocalFiles([tmp_path / "in"]), tok_dir, tmp_path / "out", show_progress=False)


def test_bad_file_in_a_worker_names_file_and_offset(corpus, tok_dir, tmp_path):
    bad = tmp_path / "in" / "z.txt"
    bad.parent.mkdir()
    bad.write_bytes(b"ok\n\n" + "não".encode("latin-1"))
    source = LocalFiles([corpus, bad.parent], chunk_bytes=1 << 16)
    with pytest.raises(SourceError, match=r"z\.txt: not valid utf-8 at byte offset 5"):
        prep.prepare(source, tok_dir, tmp_path / "out", num_workers=2, show_progress=False)


def test_long_document_is_tokenized_in_exact_pieces(tokenizer):
    words = " ".join(_corpus_texts()).split()[:20_000]
    document = " ".join(words) + "  duplo  espaço\tfim " + "x" * 3000
    batches = list(prep.tokenize_documents(tokenizer, [document, "   ", "curto"], 500))
    assert sum(docs for docs, _ in batches) == 2
    ids = np.concatenate([ids for _, ids in batches])
    expected = tokenizer.encode_batch([document])[0] + tokenizer.encode_batch(["curto"])[0]
    np.testing.assert_array_equal(ids, expected)


def test_bad_settings(corpus, tok_dir, tmp_path):
    with pytest.raises(ValueError, match="max_seq_length must be >= 3"):
        _run(corpus, tok_dir, tmp_path, max_seq_length=2)
    with pytest.raises(ValueError, match="not both"):
        _run(corpus, tok_dir, tmp_path, eval_lines=1, eval_fraction=0.1)
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        prep.prepare(_source(corpus), tmp_path, tmp_path / "out")


def test_cli(corpus, tok_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--tokenizer", str(tok_dir), "--output", str(out), "--input", str(corpus)]
    args += ["--max-seq-length", "128", "--eval-lines", "2", "--no-progress", "--num-workers", "1"]
    assert prepare_cli.main(args) == 0
    assert "2 eval lines" in capsys.readouterr().out
    metadata = fmt.read_metadata(out)
    assert metadata["max_seq_length"] == 128
    assert all(line[0] == 1 and line[-1] == 2 and len(line) <= 128 for line in _lines(out, "eval"))
    bad = ["--tokenizer", str(tok_dir), "--output", str(out), "--input", str(tmp_path / "no.txt")]
    assert prepare_cli.main(bad) == 2
    assert "no.txt" in capsys.readouterr().err


class _DyingUnit(WorkUnit):
    """A unit whose worker process dies, as when the OS kills it for memory."""

    key = "dying"

    def documents(self):
        os._exit(3)


class _Units(DocumentSource):
    def __init__(self, units):
        self._units = units

    def units(self):
        return self._units

    def describe(self):
        return "test units"


def test_a_dead_worker_fails_the_run_instead_of_hanging(corpus, tok_dir, tmp_path):
    source = _Units([*LocalFiles([corpus], chunk_bytes=1 << 14).units(), _DyingUnit()])
    with pytest.raises(BrokenProcessPool):
        prep.prepare(source, tok_dir, tmp_path, num_workers=2, show_progress=False)


# ---- the dataset sources: `--tfds` and `--hf-dataset`, on corpora built here from local files --
def _stored_ids(out: Path) -> np.ndarray:
    return np.concatenate([line[1:-1] for line in _lines(out, "train")])


def test_cli_prepares_a_tfds_dataset_and_an_hf_dataset(tokenizer, tok_dir, tmp_path, capsys):
    docs = [f"Documento {i}: a ação número {i * 7} e a informação {i}." for i in range(30)]
    name = build_tfds_corpus(tmp_path / "tfds", docs)
    hf_path = write_hf_corpus(tmp_path / "hf", docs)
    common = ["--tokenizer", str(tok_dir), "--eval-lines", "0", "--max-seq-length", str(SEQ),
              "--no-progress", "--num-workers", "1"]  # fmt: skip
    tfds_args = ["--tfds", name, "--split", SPLIT, "--data-dir", str(tmp_path / "tfds")]
    hf_args = ["--hf-dataset", hf_path, "--hf-config", SPLIT]
    for out, source in ((tmp_path / "from-tfds", tfds_args), (tmp_path / "from-hf", hf_args)):
        assert prepare_cli.main([*common, "--output", str(out), *source]) == 0, capsys.readouterr()
        assert "30 documents" in capsys.readouterr().out
    # Each holds every document once, in its source's order (TFDS stores them shuffled by key).
    for out, source in (
        (tmp_path / "from-tfds", TfdsSource(name, SPLIT, str(tmp_path / "tfds"))),
        (tmp_path / "from-hf", HfDatasetSource(HfDataset(hf_path, SPLIT, "train"))),
    ):
        in_order = list(source.documents())
        assert sorted(in_order) == sorted(docs)
        expected = np.concatenate([np.asarray(ids, np.int32)
                                   for ids in tokenizer.encode_batch(in_order)])  # fmt: skip
        np.testing.assert_array_equal(_stored_ids(out), expected)
    missing = [*common, "--output", str(tmp_path / "x"), "--tfds", "no_such_corpus",
               "--data-dir", str(tmp_path / "tfds")]  # fmt: skip
    assert prepare_cli.main(missing) == 2
    err = capsys.readouterr().err
    assert "cannot open TFDS dataset 'no_such_corpus'" in err and "Traceback" not in err
