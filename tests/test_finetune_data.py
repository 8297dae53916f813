"""Fine-tuning inputs without JAX: task files in every format, examples and their checks, the
named tasks read offline (local files in the hub's columns, and a stand-in for HF datasets),
and the metrics against hand-computed values."""

from __future__ import annotations

import csv
import json
import sys
import types

import numpy as np
import pytest

from debertina_jax.finetune import metrics
from debertina_jax.finetune.examples import check_labels, examples_from_rows, label_names
from debertina_jax.finetune.tables import TaskFileError, read_rows
from debertina_jax.finetune.tasks import LENER_TAGS, PARQUET_REVISION, load_split, named_task

ROWS = [
    {"frase": "O gato dorme.", "outra": "Um animal descansa.", "rotulo": "sim", "nota": 4.5},
    {"frase": "Chove muito hoje.", "outra": "Está sol.", "rotulo": "não", "nota": 1.0},
]


def _write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_every_format_gives_the_same_examples(tmp_path, fmt):
    path = _write(tmp_path / f"train.{fmt}", ROWS, fmt)
    pair = examples_from_rows(
        read_rows(path), str(path), text_fields=("frase", "outra"), label_field="rotulo",
        task_type="classification",
    )  # fmt: skip
    assert pair.texts == [
        ("O gato dorme.", "Um animal descansa."),
        ("Chove muito hoje.", "Está sol."),
    ]
    assert pair.labels == ["sim", "não"]
    score = examples_from_rows(
        read_rows(path), str(path), text_fields=("frase",), label_field="nota",
        task_type="regression",
    )  # fmt: skip
    assert score.texts == [("O gato dorme.",), ("Chove muito hoje.",)]
    assert score.labels == [4.5, 1.0]


def test_integer_labels_agree_across_formats_and_sort_numerically(tmp_path):
    rows = [{"t": f"frase {i}", "y": y} for i, y in enumerate([10, 2, 2, 1])]
    from_json = read_rows(_write(tmp_path / "a.jsonl", rows, "jsonl"))
    from_csv = read_rows(_write(tmp_path / "a.csv", rows, "csv"))
    a, b = (
        examples_from_rows(r, "f", text_fields=("t",), label_field="y", task_type="classification")
        for r in (from_json, from_csv)
    )
    assert a.labels == b.labels == ["10", "2", "2", "1"]
    assert label_names(a, "classification", None) == ["1", "2", "10"]


def test_token_lists_from_lists_or_space_separated_text(tmp_path):
    rows = [
        {
            "palavras": ["A", "Maria", "foi", "a", "Lisboa"],
            "tags": ["O", "B-PER", "O", "O", "B-LOC"],
        }
    ]
    as_json = read_rows(_write(tmp_path / "ner.jsonl", rows, "jsonl"))
    as_tsv = read_rows(
        _write(tmp_path / "ner.tsv", [{k: " ".join(v) for k, v in rows[0].items()}], "tsv")
    )
    for r in (as_json, as_tsv):
        ex = examples_from_rows(
            r, "f", text_fields=("palavras",), label_field="tags", task_type="token-classification"
        )
        assert ex.words == [rows[0]["palavras"]] and ex.labels == [rows[0]["tags"]]
        assert label_names(ex, "token-classification", None) == ["B-LOC", "B-PER", "O"]


# ---- bad input: clear messages naming the file, row, field or value ------------------------
def test_unknown_field_names_the_fields(tmp_path):
    path = _write(tmp_path / "t.csv", ROWS, "csv")
    with pytest.raises(
        TaskFileError, match=r"t\.csv: no field 'texto'; the fields are frase, outra"
    ):
        examples_from_rows(
            read_rows(path), str(path), text_fields=("texto",), label_field="rotulo",
            task_type="classification",
        )  # fmt: skip


def test_label_not_in_the_training_set(tmp_path):
    train = examples_from_rows(
        ROWS, "train.csv", text_fields=("frase",), label_field="rotulo", task_type="classification"
    )
    other = [dict(ROWS[0]), dict(ROWS[1], rotulo="talvez")]
    validation = examples_from_rows(
        other, "dev.csv", text_fields=("frase",), label_field="rotulo", task_type="classification"
    )
    with pytest.raises(
        TaskFileError,
        match=r"dev\.csv, row 2: label 'talvez' is not among the training labels \(não, sim\)",
    ):  # noqa: E501
        check_labels(validation, label_names(train, "classification", None))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_empty_file(tmp_path, fmt):
    path = tmp_path / f"empty.{fmt}"
    path.write_text("frase,rotulo\n" if fmt == "csv" else "\n")
    with pytest.raises(TaskFileError, match="empty.* holds no examples"):
        read_rows(path)


def test_other_bad_files(tmp_path):
    with pytest.raises(TaskFileError, match="no such file"):
        read_rows(tmp_path / "missing.csv")
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(TaskFileError, match="unknown file type .xlsx"):
        read_rows(tmp_path / "x.xlsx")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(TaskFileError, match=r"bad\.jsonl, line 2: not valid JSON"):
        read_rows(tmp_path / "bad.jsonl")
    rows = [{"t": "x", "y": "muito"}]
    with pytest.raises(
        TaskFileError, match=r"row 1: regression label 'muito' in 'y' is not a number"
    ):
        examples_from_rows(rows, "f", text_fields=("t",), label_field="y", task_type="regression")
    rows = [{"t": ["a", "b"], "y": ["O"]}]
    with pytest.raises(TaskFileError, match="2 words in 't' but 1 tags"):
        examples_from_rows(
            rows, "f", text_fields=("t",), label_field="y", task_type="token-classification"
        )
    with pytest.raises(TaskFileError, match="field 'y' is empty"):
        examples_from_rows([{"t": "a", "y": None}], "f", text_fields=("t",), label_field="y",
                           task_type="classification")  # fmt: skip


# ---- named tasks, offline ----------------------------------------------------------------------
ASSIN2 = [
    {"sentence_pair_id": 1, "premise": "Um homem toca guitarra.", "hypothesis": "Alguém toca.",
     "relatedness_score": 4.2, "entailment_judgment": 1},
    {"sentence_pair_id": 2, "premise": "Uma mulher corta cebolas.", "hypothesis": "O cão ladra.",
     "relatedness_score": 1.1, "entailment_judgment": 0},
]  # fmt: skip
HATEBR = [
    {"instagram_comments": "Parabéns pelo trabalho!", "offensive_language": False},
    {"instagram_comments": "Que vergonha, seu incompetente", "offensive_language": True},
]
LENER = [{"id": "0", "tokens": ["O", "STF", "decidiu", "em", "2019"], "ner_tags": [0, 1, 0, 0, 5]}]


def test_named_tasks_read_local_copies_in_the_hub_columns(tmp_path):
    assin = _write(tmp_path / "assin2.jsonl", ASSIN2, "jsonl")
    rte = load_split(named_task("assin2-rte"), "train", assin)
    assert rte.texts[0] == ("Um homem toca guitarra.", "Alguém toca.")
    assert rte.labels == ["ENTAILMENT", "NONE"]
    assert label_names(rte, "classification", named_task("assin2-rte").class_names) == [
        "NONE", "ENTAILMENT"
    ]  # fmt: skip
    sts = load_split(named_task("assin2-sts"), "validation", assin)
    assert sts.labels == pytest.approx([4.2, 1.1])
    hate = load_split(
        named_task("hatebr"), "test", _write(tmp_path / "h.parquet", HATEBR, "parquet")
    )
    assert hate.labels == ["non-offensive", "offensive"]
    lener = load_split(
        named_task("lener-br"), "train", _write(tmp_path / "l.jsonl", LENER, "jsonl")
    )
    assert lener.words == [LENER[0]["tokens"]]
    assert lener.labels == [["O", "B-ORGANIZACAO", "O", "O", "B-TEMPO"]]
    assert len(LENER_TAGS) == 13 and LENER_TAGS[11:] == ("B-JURISPRUDENCIA", "I-JURISPRUDENCIA")


def test_named_tasks_through_hf_datasets(monkeypatch):
    """A stand-in `datasets` module: the hub call, its split names, and the fallback to the
    Parquet conversion when the script dataset cannot be loaded."""
    calls = []

    def load_dataset(path, name=None, *, split, revision=None):
        calls.append((path, name, split, revision))
        if revision is None:
            raise RuntimeError("Dataset scripts are no longer supported")
        return [dict(r) for r in ASSIN2]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rte = load_split(named_task("assin2-rte"), "validation", None)
    assert rte.source == "nilc-nlp/assin2:validation" and rte.labels == ["ENTAILMENT", "NONE"]
    assert calls == [
        ("nilc-nlp/assin2", None, "validation", None),
        ("nilc-nlp/assin2", None, "validation", PARQUET_REVISION),
    ]


def test_named_task_without_datasets_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(TaskFileError, match=r"pip install 'debertina-jax\[hf\]'.*--train"):
        load_split(named_task("hatebr"), "train", None)


def test_the_shipped_demo_task():
    spec = named_task("temas")
    train, validation = (load_split(spec, s, None) for s in ("train", "validation"))
    assert load_split(spec, "test", None) is None
    assert (len(train), len(validation)) == (120, 80)
    names = label_names(train, "classification", None)
    assert names == ["ciência", "culinária", "desporto", "tecnologia"]
    check_labels(validation, names)
    assert not {t for (t,) in train.texts} & {t for (t,) in validation.texts}
    frases = {s: load_split(named_task("frases"), s, None) for s in ("train", "validation")}
    assert (len(frases["train"]), len(frases["validation"])) == (240, 160)
    for split, examples in frases.items():
        # Each sentence of the split once as written, once corrupted.
        natural = {
            t for (t,), y in zip(examples.texts, examples.labels, strict=True) if y == "natural"
        }
        source = train if split == "train" else validation
        assert natural == {t for (t,) in source.texts}
        assert examples.labels.count("corrompida") == len(natural)
    with pytest.raises(TaskFileError, match="unknown task 'assin3'; named tasks: assin2-rte"):
        named_task("assin3")


# ---- metrics ------------------------------------------------------------------------------------
def test_classification_and_regression_metrics():
    gold = np.array(["a", "a", "b", "c"])
    pred = np.array(["a", "b", "b", "b"])
    assert metrics.accuracy(pred, gold) == 0.5
    # F1: a 2/3, b 2/(2+2+0)=0.5 (tp 1, fp 2, fn 0 -> 2/4), c 0
    assert metrics.macro_f1(pred, gold) == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 5.0])
    assert metrics.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert metrics.mse(x, y) == pytest.approx(np.mean((x - y) ** 2))
    assert np.isnan(metrics.pearson(np.ones(3), y[:3]))
    assert metrics.is_better("mse", 0.1, 0.2) and not metrics.is_better("accuracy", 0.1, 0.2)
    assert not metrics.is_better("pearson", float("nan"), None)


def test_entity_level_scores():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-PER"], ["B-ORG", "I-ORG", "O"]]
    # gold: PER(0,2) LOC(3,4) | ORG(0,3); predicted: PER(0,2) PER(3,4) | ORG(0,2): 1 right of 3.
    s = metrics.entity_scores(pred, gold)
    assert (s["precision"], s["recall"], s["f1"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert s["accuracy"] == pytest.approx(5 / 7)
    # I- after O, or after another type, opens an entity (the CoNLL script's reading).
    assert metrics.entities(["O", "I-LOC", "I-LOC", "I-PER", "B-PER", "B-PER"]) == {
        ("LOC", 1, 3), ("PER", 3, 4), ("PER", 4, 5), ("PER", 5, 6)
    }  # fmt: skip
    assert metrics.entity_scores([["O"]], [["O"]])["f1"] == 0.0
