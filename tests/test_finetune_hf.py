"""The exported tiny model in plain transformers + PyTorch, as a user would take it: fine-tune a
sequence classifier on a few labelled Portuguese sentences, and fill masks with the generator.

The model is the session's tiny run converted by convert_to_pt.py (conftest.tiny_export_dir)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from debertina_jax.hf.convert import from_hf

# (text, label): 1 = a positive review, 0 = a negative one.
REVIEWS = [
    ("Adorei o restaurante, a comida estava deliciosa e o serviço foi impecável.", 1),
    ("O hotel era limpo, confortável e os funcionários muito simpáticos.", 1),
    ("Excelente livro, li de uma vez só e recomendo a todos.", 1),
    ("A viagem correu muito bem e voltaremos com certeza.", 1),
    ("Péssimo atendimento, esperámos uma hora e a comida chegou fria.", 0),
    ("O quarto estava sujo e o ar condicionado não funcionava.", 0),
    ("Que desilusão, o filme é longo, aborrecido e mal representado.", 0),
    ("A encomenda chegou partida e ninguém respondeu às minhas mensagens.", 0),
]


@pytest.fixture
def one_torch_thread():
    """On a small shared CPU, torch's thread pool spins against the other processes: one
    thread trains this tiny model ~50x faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sequence_classification_fine_tunes_in_pytorch(one_torch_thread, tiny_export_dir):
    path = tiny_export_dir / "discriminator"
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # the new head's initial weights, whatever ran before in this process
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, output_loading_info=True
    )
    # Only the new classification head is missing; only the RTD head is left unused.
    assert sorted(info["missing_keys"]) == [
        "classifier.bias", "classifier.weight", "pooler.dense.bias", "pooler.dense.weight"
    ]  # fmt: skip
    assert info["unexpected_keys"] and all(
        k.startswith("mask_predictions.") for k in info["unexpected_keys"]
    )
    batch = tokenizer([t for t, _ in REVIEWS], padding=True, return_tensors="pt")
    labels = torch.tensor([label for _, label in REVIEWS])

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**batch, labels=labels).loss.item()

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = loss()
    model.train()
    # 24 steps: measured over 20 initial heads, the loss ends below 0.003 x the first one;
    # after 12 steps it was above half for 7 of them.
    for _ in range(24):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = loss()
    assert after < 0.5 * before, (before, after)


def test_generator_fills_masks(tiny_export_dir):
    path = tiny_export_dir / "generator"
    _, info = transformers.AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    fill = transformers.pipeline("fill-mask", model=str(path), top_k=5)
    text = "A capital de Portugal é [MASK]."
    predictions = fill(text)
    assert len(predictions) == 5
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
    assert all(isinstance(p["token_str"], str) and p["sequence"] for p in predictions)

    # The pipeline's numbers are our generator's: same top 5 and probabilities.
    tokenizer = fill.tokenizer
    ids = tokenizer(text, return_tensors="np")["input_ids"]
    position = int(np.flatnonzero(ids[0] == tokenizer.mask_token_id)[0])
    logits = np.asarray(from_hf(path)(jnp.asarray(ids)))[0, position]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:5]
    assert [p["token"] for p in predictions] == top.tolist()
    np.testing.assert_allclose(scores, probs[top], rtol=1e-4)
