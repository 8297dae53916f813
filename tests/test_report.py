"""`python -m debertina_jax.cli.report`, the end of the demo: fill-mask guesses from the exported
generator, replaced-token detection from the run's last evaluation, and a short fine-tune from
the run and from random weights (conftest: tiny_run_dir, tiny_export_dir)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers

from debertina_jax.cli.report import main
from debertina_jax.runtime.metrics_log import read_metrics

SENTENCE = "O [MASK] é muito bom."
SHORT_FINETUNE = ["train.max_steps=2", "train.batch_size=8", "model.hidden_dropout_prob=0",
                  "model.attention_probs_dropout_prob=0"]  # fmt: skip


def _top(export_dir, k: int) -> list[str]:
    """The generator's k best tokens for SENTENCE's mask, straight from transformers."""
    directory = str(export_dir / "generator")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForMaskedLM.from_pretrained(directory).eval()
    encoded = tokenizer(SENTENCE.replace("[MASK]", tokenizer.mask_token), return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded).logits[0]
    position = encoded["input_ids"][0].tolist().index(tokenizer.mask_token_id)
    ids = logits[position].topk(k).indices.tolist()
    return [tokenizer.decode([i]).strip() for i in ids]


def test_report_shows_what_the_run_learned(tmp_path, capsys, tiny_run_dir, tiny_export_dir):
    code = main(["--workdir", str(tiny_run_dir), "--export", str(tiny_export_dir),
                 "--output", str(tmp_path), "--sentence", SENTENCE, "--top-k", "2",
                 *SHORT_FINETUNE])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out

    guesses = next(line for line in out.splitlines() if line.strip().startswith(SENTENCE))
    shown = re.findall(r"(\S+) \((\d\.\d\d)\)", guesses.split("->")[1])
    assert [token for token, _ in shown] == _top(tiny_export_dir, 2)

    last = read_metrics(tiny_run_dir, split="eval")[-1]
    assert f"step {last['step']}" in out
    assert f"precision {last['rtd_precision']:.3f}, recall {last['rtd_recall']:.3f}" in out
    assert f"accuracy {1 - last['replaced_fraction']:.4f}" in out  # the prior's

    results = {side: json.loads((tmp_path / side / "results.json").read_text())
               for side in ("pretrained", "random-init")}  # fmt: skip
    assert results["pretrained"]["random_init"] is False
    assert results["random-init"]["random_init"] is True
    assert results["pretrained"]["task"] == "frases"
    for side, label in (("pretrained", "pretrained"), ("random-init", "random init")):
        accuracy = results[side]["mean"]["validation"]["accuracy"]
        assert re.search(rf"{label}: {accuracy:.4f}\n", out), out


def test_report_errors_name_what_is_wrong(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path), "--no-finetune"]) == 1
    assert f"no metrics file: {tmp_path}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        main(["--workdir", str(tmp_path), "--sentence", "no mask here"])
    assert stopped.value.code == 2
    assert "'no mask here' has no [MASK]" in capsys.readouterr().err
