"""Document sources: local formats, chunking into work units, bad input, optional extras."""

import builtins
import gzip
import json
import pickle
import random
import sys

import pytest
from dataset_testing import SPLIT, build_tfds_corpus, write_hf_corpus
from deberta_testing import TINY_YAML

from debertina_jax.config import load_config
from debertina_jax.data.sources import MissingExtraError, SourceError, local
from debertina_jax.data.sources.hf_datasets import HfDataset, HfDatasetSource
from debertina_jax.data.sources.local import LocalFiles, find_files
from debertina_jax.data.sources.tfds import TfdsSource
from debertina_jax.data.workdir import source_from_config

DOCS = [
    "Primeiro documento.\nCom uma segunda linha.",
    "Segundo: ação, coração e informação.",
    "  Terceiro, com espaços no início.",
    "Quarto 😀 com emoji\ne três\nlinhas.",
    "Quinto.",
]


def _documents(source):
    return [d for unit in source.units() for d in unit.documents()]


def _write_txt(path, docs, separator="\n\n"):
    path.write_text(separator.join(docs) + "\n", encoding="utf-8")
    return path


def test_txt_blank_lines_separate_documents(tmp_path):
    messy = "\n\n \t \n\n\n".join(DOCS)  # several blank and whitespace-only lines between
    path = tmp_path / "a.txt"
    body = ("\n\n" + messy + "\n\n").encode().replace(b"\n", b"\r\n")
    path.write_bytes(b"\xef\xbb\xbf" + body)  # a UTF-8 byte-order mark, CRLF line ends
    assert _documents(LocalFiles([path])) == DOCS


def test_txt_chunks_cover_each_document_once(tmp_path):
    docs = [f"doc {i}: " + "palavra " * (i % 7) + "\n" + "linha dois " * (i % 3) for i in range(60)]
    path = _write_txt(tmp_path / "big.txt", docs, separator="\n\n\n")
    size = path.stat().st_size
    for chunk in (1, 2, 3, 17, 64, 500, size - 1, size, 10 * size):
        source = LocalFiles([path], chunk_bytes=chunk)
        assert [d.strip() for d in _documents(source)] == [d.strip() for d in docs], chunk


def test_txt_without_blank_lines_is_still_chunked(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "_SEARCH_BYTES", 64)  # stands for 1 MiB
    lines = [f"linha {i} de um documento enorme sem linhas em branco" for i in range(200)]
    path = tmp_path / "one-doc.txt"
    path.write_text("\n".join(lines[:150]) + "\n\n" + "\n".join(lines[150:]) + "\n")
    for chunk in (100, 1000, 3000):
        source = LocalFiles([path], chunk_bytes=chunk)
        docs = [d for unit in source.units() for d in unit.documents()]
        assert [line for d in docs for line in d.split("\n")] == lines, chunk
        assert len(docs) > 2 if chunk < 3000 else len(docs) >= 2


def test_jsonl_chunks_cover_each_line_once(tmp_path):
    docs = [f"texto {i} " + "ç" * (i % 5) for i in range(40)]
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": d, "id": i}, ensure_ascii=i % 2 == 0) for i, d in enumerate(docs)]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    for chunk in (1, 5, 33, 10_000):
        assert _documents(LocalFiles([path], chunk_bytes=chunk)) == docs, chunk


def test_json_gz_and_null_text(tmp_path):
    path = tmp_path / "c4-pt.json.gz"
    rows = [{"text": "um"}, {"text": None}, {"text": ""}, {"text": "dois", "url": "x"}]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    source = LocalFiles([path])
    assert len(source.units()) == 1
    assert _documents(source) == ["um", "dois"]


def test_jsonl_errors_name_file_and_offset(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"texto": "sem chave"}\n')
    with pytest.raises(SourceError, match=r"bad\.jsonl.*offset 15.*'text'"):
        _documents(LocalFiles([path]))
    path.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(SourceError, match="field 'text' .* is of type int, not str"):
        _documents(LocalFiles([path]))
    path.write_text('{"text": "ok"}\n{"text": "aberto\n')
    with pytest.raises(SourceError, match=r"bad\.jsonl: invalid JSON at byte offset 15"):
        _documents(LocalFiles([path]))
    # The position inside the line is a byte offset in the file too, not "line 1 column 23".
    path.write_text('{"text": "ação"}\n{"text": "é", "id" 7}\n', encoding="utf-8")
    with pytest.raises(SourceError) as error:
        _documents(LocalFiles([path]))
    message = str(error.value)
    assert "invalid JSON at byte offset 19 (the line starting there)" in message
    assert message.endswith("Expecting ':' delimiter at byte offset 39")  # 19 + 20 bytes
    assert "line 1" not in message and "column" not in message


def test_parquet_row_groups(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = [f"linha {i} com ação" for i in range(50)]
    path = tmp_path / "d.parquet"
    table = pa.table({"text": docs[:10] + [None] + docs[10:], "n": list(range(51))})
    pq.write_table(table, path, row_group_size=7)
    source = LocalFiles([path], chunk_bytes=1)
    assert len(source.units()) == 8  # one unit per row group at this chunk size
    assert _documents(source) == docs
    assert _documents(LocalFiles([path])) == docs
    with pytest.raises(SourceError, match=r"no column 'body'"):
        _documents(LocalFiles([path], text_key="body"))


def test_paths_globs_and_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    a = _write_txt(tmp_path / "b.txt", ["b"])
    b = _write_txt(tmp_path / "sub" / "a.txt", ["a"])
    (tmp_path / "notes.md").write_text("ignored")
    assert find_files([tmp_path]) == [a, b]
    assert find_files([str(tmp_path / "**" / "*.txt")]) == [a, b]
    assert find_files([b, a, b]) == [b, a]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        find_files([tmp_path / "missing.txt"])
    with pytest.raises(FileNotFoundError, match=r"no .* file matches"):
        find_files([str(tmp_path / "*.jsonl")])
    with pytest.raises(SourceError, match="unsupported file type"):
        find_files([tmp_path / "notes.md"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        find_files([tmp_path / "empty"])


def test_not_utf8_reports_file_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"linha boa\n\n" + "ação".encode("latin-1") + b"\n")
    with pytest.raises(SourceError, match=r"latin1\.txt: not valid utf-8 at byte offset 12"):
        _documents(LocalFiles([path]))
    assert _documents(LocalFiles([path], encoding="latin-1")) == ["linha boa", "ação"]
    assert _documents(LocalFiles([path], errors="replace"))[1] == "a\ufffd\ufffdo"
    assert _documents(LocalFiles([path], errors="ignore"))[1] == "ao"


def test_encoding_options_are_checked(tmp_path):
    path = _write_txt(tmp_path / "a.txt", DOCS)
    with pytest.raises(SourceError, match="unknown encoding 'klingon'"):
        LocalFiles([path], encoding="klingon")
    with pytest.raises(SourceError, match="not ASCII-compatible"):
        LocalFiles([path], encoding="utf-16")
    with pytest.raises(SourceError, match="unknown errors handler"):
        LocalFiles([path], errors="pardon")


def test_binary_junk(tmp_path):
    rng = random.Random(0)
    noise = bytes(rng.randrange(1, 256) for _ in range(4096))
    junk = tmp_path / "junk.txt"
    junk.write_bytes(b"texto normal\n" + noise)
    with pytest.raises(SourceError, match=r"junk\.txt: not valid utf-8 at byte offset \d+"):
        _documents(LocalFiles([junk]))
    junk.write_bytes(b"texto normal\n\x00" + noise)
    with pytest.raises(SourceError, match=r"junk\.txt: NUL byte at byte offset 13"):
        _documents(LocalFiles([junk], errors="replace"))
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("texto em UTF-16".encode("utf-16"))
    with pytest.raises(SourceError, match="convert UTF-16 to UTF-8"):
        _documents(LocalFiles([utf16], errors="replace"))


def test_ten_megabyte_line(tmp_path):
    line = ("palavra " * (10 * 2**20 // 8)).strip()
    path = _write_txt(tmp_path / "long.txt", ["curto", line, "fim"])
    docs = _documents(LocalFiles([path], chunk_bytes=2**20))  # the cut points land inside it
    assert [len(d) for d in docs] == [5, len(line), 3]


def test_units_are_picklable_with_stable_keys(tmp_path):
    path = _write_txt(tmp_path / "a.txt", DOCS)
    units = LocalFiles([path], chunk_bytes=20).units()
    again = LocalFiles([path], chunk_bytes=20).units()
    assert [u.key for u in units] == [u.key for u in again]
    assert len({u.key for u in units}) == len(units) > 1
    restored = pickle.loads(pickle.dumps(units))
    assert [d for u in restored for d in u.documents()] == DOCS


@pytest.fixture
def without(monkeypatch):
    """Makes `import name` fail as if the package were not installed."""

    def hide(*names):
        real_import = builtins.__import__

        def fake_import(name, *args, **kwargs):
            if name.split(".")[0] in names:
                raise ImportError(f"No module named {name!r}")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", fake_import)

    return hide


def test_missing_extras_say_what_to_install(without, tmp_path):
    without("tensorflow_datasets", "datasets", "pyarrow")
    with pytest.raises(MissingExtraError, match=r"pip install 'debertina-jax\[tfds\]'"):
        TfdsSource().units()
    with pytest.raises(MissingExtraError, match=r"pip install 'debertina-jax\[hf\]'"):
        HfDatasetSource().units()
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(MissingExtraError, match=r"pip install 'debertina-jax\[parquet\]'"):
        LocalFiles([path]).units()


def test_tfds_source_reads_a_dataset_built_from_local_files(tmp_path):
    """A TFDS dataset prepared here (ArrayRecord): read without TensorFlow, cut into example
    ranges, every document once, in the stored order."""
    docs = [f"documento {i}: ação número {i * 7}." for i in range(23)]
    name = build_tfds_corpus(tmp_path, docs)
    source = TfdsSource(name, SPLIT, str(tmp_path), num_units=4)
    units = source.units()
    assert [u.split for u in units] == ["pt[0:5]", "pt[5:11]", "pt[11:17]", "pt[17:23]"]
    read = _documents(source)
    assert sorted(read) == sorted(docs)
    assert read == _documents(TfdsSource(name, SPLIT, str(tmp_path), num_units=1))
    assert pickle.loads(pickle.dumps(units[1])).key == units[1].key
    assert "tensorflow" not in sys.modules  # the test extra has no TensorFlow

    with pytest.raises(SourceError, match=r"has no split 'en' \(splits: \['pt'\]\)"):
        TfdsSource(name, "en", str(tmp_path)).units()
    with pytest.raises(SourceError, match="examples have no feature 'body'"):
        _documents(TfdsSource(name, SPLIT, str(tmp_path), text_key="body"))
    with pytest.raises(SourceError, match="cannot open TFDS dataset 'no_such_corpus'"):
        TfdsSource("no_such_corpus", SPLIT, str(tmp_path)).units()


def test_data_source_settings_pick_tfds_and_hf(tmp_path):
    """data.source=tfds|hf: the config's settings reach the source that reads them."""
    docs = [f"texto {i} com ação" for i in range(12)]
    name = build_tfds_corpus(tmp_path / "tfds", docs)
    tfds_config = load_config(TINY_YAML, [
        "data.source=tfds", f"data.tfds_name={name}", f"data.tfds_split={SPLIT}",
        f"data.tfds_data_dir={tmp_path / 'tfds'}",
    ])  # fmt: skip
    assert sorted(source_from_config(tfds_config.data).documents()) == sorted(docs)
    hf_path = write_hf_corpus(tmp_path / "hf", docs)
    hf_config = load_config(TINY_YAML, [
        "data.source=hf", f"data.hf_name={hf_path}", f"data.hf_config={SPLIT}",
        "data.hf_split=train",
    ])  # fmt: skip
    source = source_from_config(hf_config.data)
    assert len(source.units()) == 3  # its three files
    assert sorted(source.documents()) == sorted(docs)


def test_hf_datasets_source_on_local_json(tmp_path):
    docs = [f"texto {i} com ação" for i in range(30)]
    files = []
    for k in range(3):
        path = tmp_path / f"part-{k}.jsonl"
        path.write_text("\n".join(json.dumps({"text": d}) for d in docs[k::3]))
        files.append(str(path))
    for streaming in (True, False):
        dataset = HfDataset("json", None, "train", tuple(files), streaming=streaming)
        source = HfDatasetSource(dataset, num_units=3)
        assert len(source.units()) == 3
        assert sorted(_documents(source)) == sorted(docs)
