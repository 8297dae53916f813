"""`python -m debertina_jax.finetune` end to end on the session's tiny model (conftest:
tiny_export_dir = an HF directory, tiny_run_dir = a pretraining workdir): classification, pairs,
regression, NER, seeds, SiFT, layer-wise decay, bad inputs; the exported model in transformers
reproduces the JAX predictions. Plus the pieces with a rule of their own (SiFT, layer decay,
copying a backbone between layer layouts).

Runs are kept tiny: a few examples, a few steps, dropout off where it is not under test (a step
with dropout compiles several times slower on CPU)."""

from __future__ import annotations

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from deberta_testing import tiny_config
from flax import nnx

from debertina_jax.finetune.cli import main
from debertina_jax.finetune.optimizer import scale_by_layer
from debertina_jax.finetune.pretrained import copy_backbone
from debertina_jax.finetune.sift import divergence
from debertina_jax.hf.convert import from_hf, model_to_state_dict
from debertina_jax.model.compute import Compute
from debertina_jax.model.models import DebertaV2ForSequenceClassification, DebertaV2Model

NO_DROPOUT = ["model.hidden_dropout_prob=0", "model.attention_probs_dropout_prob=0"]
REVIEWS = [
    ("Adorei o restaurante, a comida estava deliciosa.", "positivo"),
    ("O hotel era limpo e os funcionários simpáticos.", "positivo"),
    ("Excelente livro, recomendo a todos.", "positivo"),
    ("A viagem correu muito bem.", "positivo"),
    ("Péssimo atendimento, a comida chegou fria.", "negativo"),
    ("O quarto estava sujo e barulhento.", "negativo"),
    ("Que desilusão, o filme é aborrecido.", "negativo"),
    ("A encomenda chegou partida.", "negativo"),
]
PAIRS = [
    ("O gato dorme no sofá.", "Um animal descansa.", "sim", 4.5),
    ("A menina come uma maçã.", "Uma criança come fruta.", "sim", 4.2),
    ("O homem corre no parque.", "Está a chover muito.", "não", 1.2),
    ("Os alunos estudam para o exame.", "O carro é vermelho.", "não", 1.0),
]
NER = [
    (["A", "Maria", "Silva", "mora", "em", "Lisboa"], ["O", "B-PES", "I-PES", "O", "O", "B-LOC"]),
    (["O", "João", "visitou", "o", "Porto"], ["O", "B-PES", "O", "O", "B-LOC"]),
    (["Ontem", "choveu", "em", "Braga"], ["O", "O", "O", "B-LOC"]),
    (["A", "Ana", "trabalha", "no", "Rio", "de", "Janeiro"],
     ["O", "B-PES", "O", "O", "B-LOC", "I-LOC", "I-LOC"]),
]  # fmt: skip


def _csv(path, header, rows, delimiter=","):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def _finetune(capsys, *args) -> tuple[int, str, str]:
    code = main([*args, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _results(out) -> dict:
    return json.loads((out / "results.json").read_text())


# ---- the runs ----------------------------------------------------------------------------------
def test_classification_learns_and_transformers_reproduces_it(tmp_path, capsys, tiny_export_dir):
    """Sharded over the 8 test devices (mesh.data=-1, the default)."""
    train = _csv(tmp_path / "train.csv", ["texto", "sentimento"], REVIEWS)
    out = tmp_path / "out"
    code, stdout, stderr = _finetune(
        capsys, "--model", str(tiny_export_dir / "discriminator"), "--train", train,
        "--validation", train, "--test", train, "--text-fields", "texto",
        "--label-field", "sentimento", "--task-type", "classification", "--output", str(out),
        "train.batch_size=8", "train.epochs=25", "optimizer.learning_rate=3e-3",
        "optimizer.warmup_ratio=0", "train.patience=0", "train.log_every_steps=5", *NO_DROPOUT,
    )  # fmt: skip
    assert code == 0, stderr
    result = _results(out)
    # It learned: the eight training sentences are told apart.
    assert result["seeds"][0]["validation"]["accuracy"] == 1.0, result["seeds"]
    assert result["labels"] == ["negativo", "positivo"] and result["devices"] == 8
    assert result["model_kind"] == "hf" and result["steps"] == 25
    assert result["seeds"][0]["test"]["accuracy"] == 1.0
    assert result["hf_verification"]["verified"] and result["hf_verification"]["tokenizer_matches"]
    assert "validation: accuracy 1.0000, macro_f1 1.0000" in stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train", "validation", "test"}
    assert [r["step"] for r in rows if r["split"] == "train"] == [5, 10, 15, 20, 25]
    assert any((out / "tensorboard" / "seed-0").iterdir())

    # transformers, as a user would load OUT/hf: the same labels and logits as JAX.
    import torch
    import transformers

    texts = [t for t, _ in REVIEWS]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "hf")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "hf").eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hf_logits = model(**batch).logits.numpy()
    ours = from_hf(out / "hf")
    jax_logits = np.asarray(
        ours(jnp.asarray(batch["input_ids"].numpy()), jnp.asarray(batch["attention_mask"].numpy()))
    )
    np.testing.assert_allclose(hf_logits, jax_logits, rtol=1e-4, atol=1e-4)
    hf_labels = [model.config.id2label[i] for i in hf_logits.argmax(-1)]
    assert hf_labels == [label for _, label in REVIEWS]


def test_pairs_with_seeds_sift_and_layer_decay(tmp_path, capsys, tiny_export_dir):
    rows = [(a, b, y) for a, b, y, _ in PAIRS]
    train = _csv(tmp_path / "train.tsv", ["premissa", "hipotese", "rotulo"], rows, "\t")
    out = tmp_path / "out"
    code, stdout, stderr = _finetune(
        capsys, "--model", str(tiny_export_dir / "discriminator"), "--train", train,
        "--validation", train, "--text-fields", "premissa,hipotese", "--label-field", "rotulo",
        "--task-type", "classification", "--output", str(out), "--seeds", "2", "--sift",
        "--no-export", "optimizer.layer_decay=0.8", "train.batch_size=2", "train.max_steps=3",
        "train.log_every_steps=1", "mesh.data=1", *NO_DROPOUT,
    )  # fmt: skip
    assert code == 0, stderr
    result = _results(out)
    assert [s["seed"] for s in result["seeds"]] == [0, 1] and result["steps"] == 3
    accuracies = [s["validation"]["accuracy"] for s in result["seeds"]]
    assert result["mean"]["validation"]["accuracy"] == pytest.approx(np.mean(accuracies))
    assert result["std"]["validation"]["accuracy"] == pytest.approx(np.std(accuracies, ddof=1))
    assert result["hf"] is None and not (out / "hf").exists()
    assert " +- " in stdout
    train_rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in train_rows if r["split"] == "train"]
    assert len(train_rows) == 6 and all(r["sift_loss"] >= 0 for r in train_rows)
    assert any(r["sift_loss"] > 0 for r in train_rows)
    # The adversarial term is part of the loss that is optimised (sift.weight 1).
    for r in train_rows:
        assert r["loss"] == pytest.approx(r["task_loss"] + r["sift_loss"], rel=1e-5)


def test_regression(tmp_path, capsys, tiny_export_dir):
    rows = [{"a": a, "b": b, "nota": s} for a, b, _, s in PAIRS]
    train = _jsonl(tmp_path / "sts.jsonl", rows)
    out = tmp_path / "out"
    code, _, stderr = _finetune(
        capsys, "--model", str(tiny_export_dir / "discriminator"), "--train", train,
        "--validation", train, "--text-fields", "a,b", "--label-field", "nota",
        "--task-type", "regression", "--output", str(out), "train.batch_size=4",
        "train.max_steps=3", "optimizer.learning_rate=1e-3", "mesh.data=1", *NO_DROPOUT,
    )  # fmt: skip
    assert code == 0, stderr
    result = _results(out)
    assert result["metric"] == "pearson" and result["labels"] == []
    assert set(result["seeds"][0]["validation"]) == {"pearson", "mse"}
    assert result["hf_verification"]["verified"]
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["problem_type"] == "regression" and config["id2label"] == {"0": "nota"}


def test_token_classification_from_a_pretraining_workdir(tmp_path, capsys, tiny_run_dir):
    """Checkpoint 10 of the tiny run; dropout on."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "ner.parquet"
    pq.write_table(pa.Table.from_pylist([{"words": w, "tags": t} for w, t in NER]), path)
    out = tmp_path / "out"
    code, stdout, stderr = _finetune(
        capsys, "--model", str(tiny_run_dir), "--step", "10", "--train", str(path),
        "--validation", str(path), "--text-fields", "words", "--label-field", "tags",
        "--task-type", "token-classification", "--output", str(out), "train.batch_size=4",
        "train.max_steps=3", "optimizer.learning_rate=1e-3", "mesh.data=1",
    )  # fmt: skip
    assert code == 0, stderr
    result = _results(out)
    assert (result["model_kind"], result["model_step"]) == ("workdir", 10)
    assert f"model {tiny_run_dir} step 10" in stdout
    assert result["metric"] == "f1"
    assert result["labels"] == ["B-LOC", "B-PES", "I-LOC", "I-PES", "O"]
    assert set(result["seeds"][0]["validation"]) == {"f1", "precision", "recall", "accuracy"}
    assert result["hf_verification"]["verified"]
    assert result["hf_verification"]["tokenizer_matches"]
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["architectures"] == ["DebertaV2ForTokenClassification"]
    assert config["id2label"]["4"] == "O"


# ---- bad input ---------------------------------------------------------------------------------
def _bad_case(tmp_path, case: str) -> tuple[list[str], str]:
    train = _csv(tmp_path / "train.csv", ["texto", "sentimento"], REVIEWS)
    args = ["--train", train, "--validation", train, "--text-fields", "texto",
            "--label-field", "sentimento", "--task-type", "classification"]  # fmt: skip
    if case == "unknown field":
        args[args.index("texto")] = "frase"
        return args, "train.csv: no field 'frase'; the fields are texto, sentimento"
    if case == "label not in train":
        dev = _csv(tmp_path / "dev.csv", ["texto", "sentimento"], [("Nada a dizer.", "neutro")])
        args[args.index("--validation") + 1] = dev
        return args, "dev.csv, row 1: label 'neutro' is not among the training labels"
    if case == "empty file":
        (tmp_path / "empty.csv").write_text("texto,sentimento\n")
        args[args.index("--validation") + 1] = str(tmp_path / "empty.csv")
        return args, "empty.csv: the file holds no examples"
    if case == "max_length over positions":
        return args + ["train.max_length=100000"], "train.max_length=100000 exceeds the model's"
    if case == "text too long":
        long = " ".join(["palavra"] * 200)
        dev = _csv(tmp_path / "long.csv", ["texto", "sentimento"], [(long, "positivo")])
        args[args.index("--validation") + 1] = dev
        return args + ["train.truncation=error"], "long.csv, row 1: 802 tokens, more than max_"
    assert case == "unknown setting"
    return args + ["train.epoch=3"], "unknown key train.epoch (known keys in 'train': epochs"


@pytest.mark.parametrize(
    "case",
    ["unknown field", "label not in train", "empty file", "max_length over positions",
     "text too long", "unknown setting"],
)  # fmt: skip
def test_bad_input_gets_a_clear_message(tmp_path, capsys, tiny_export_dir, case):
    args, message = _bad_case(tmp_path, case)
    model = ["--model", str(tiny_export_dir / "discriminator"), "--output", str(tmp_path / "o")]
    code, _, stderr = _finetune(capsys, *model, *args)
    assert code == 2
    assert message in stderr and "Traceback" not in stderr, stderr


# ---- pieces ------------------------------------------------------------------------------------
def test_layer_decay_scales_each_depth():
    config = tiny_config(num_hidden_layers=3)
    model = nnx.eval_shape(lambda: DebertaV2ForSequenceClassification(config, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)  # shapes only
    transform = scale_by_layer(params, 3, 0.5)
    ones = jax.tree.map(lambda x: np.ones(x.shape, np.float32), params)
    scaled, _ = jax.jit(lambda u: transform.update(u, None))(ones)
    flat = {"/".join(map(str, p)): float(v[...].ravel()[0]) for p, v in nnx.to_flat_state(scaled)}
    assert flat["classifier/kernel"] == flat["pooler/dense/bias"] == 1.0
    assert flat["deberta/encoder/layers/2/output/kernel"] == 0.5
    assert flat["deberta/encoder/layers/0/attention/query_proj/kernel"] == 0.125
    assert flat["deberta/embeddings/word_embeddings/embedding"] == 0.0625
    assert flat["deberta/encoder/rel_embeddings"] == 0.0625


def test_copy_backbone_between_layer_layouts():
    config = tiny_config()
    plain = DebertaV2Model(config, rngs=nnx.Rngs(params=1))
    scanned = DebertaV2Model(config, rngs=nnx.Rngs(params=2), compute=Compute(scan_layers=True))
    back = DebertaV2Model(config, rngs=nnx.Rngs(params=3))
    copy_backbone(plain, scanned)
    copy_backbone(scanned, back)
    # The HF-named tensors do not depend on the layer layout: all three hold the same weights.
    want = model_to_state_dict(plain)
    for model in (scanned, back):
        got = model_to_state_dict(model)
        assert sorted(got) == sorted(want)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    narrow = nnx.eval_shape(lambda: DebertaV2Model(tiny_config(hidden_size=16), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="does not fit the task model"):
        copy_backbone(narrow, back)


def test_sift_divergence():
    rng = np.random.default_rng(0)
    clean, perturbed = (jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for _ in range(2))
    p, q = jax.nn.softmax(perturbed), jax.nn.softmax(clean)
    kl = lambda a, b: jnp.sum(a * (jnp.log(a) - jnp.log(b)), -1)  # noqa: E731
    np.testing.assert_allclose(divergence(perturbed, clean, both=False), kl(q, p), rtol=1e-5)
    np.testing.assert_allclose(
        divergence(perturbed, clean, both=True), kl(q, p) + kl(p, q), rtol=1e-5
    )
    np.testing.assert_allclose(divergence(clean, clean, both=True), 0.0, atol=1e-6)
    # Each direction's probabilities are constants: the gradient of the symmetric loss with
    # respect to the clean logits is that of KL(p || q) alone (the official symmetric_kl).
    g_both = jax.grad(lambda c: divergence(perturbed, c, both=True).sum())(clean)
    g_back = jax.grad(lambda c: kl(jax.lax.stop_gradient(p), jax.nn.softmax(c)).sum())(clean)
    np.testing.assert_allclose(g_both, g_back, rtol=1e-5, atol=1e-7)
    # One output (regression): the squared difference.
    np.testing.assert_allclose(divergence(perturbed[:, :1], clean[:, :1], both=True),
                               (perturbed[:, 0] - clean[:, 0]) ** 2, rtol=1e-6)  # fmt: skip
