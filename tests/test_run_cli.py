"""run_pretrain.py from the command line: its stages, what it learns, how it stops, its exit status.

- `--stage tokenizer` and `--stage prepare` stop after their step, and a later command goes on
  from there; the run that follows learns what the context decides, on a synthetic corpus this
  file writes (so that what the models can learn, and the context-free baselines they must
  beat, are known).
- `train.max_consecutive_nonfinite` stops a diverging run with one error line, exit status 1.
- Bad usage and config errors: exit status 2, one error line, nothing written.

(Stopping by signals and resuming: tests/test_pretrain.py.)
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from deberta_testing import REPO, SHORT_RUN, TINY_YAML
from process_testing import process_env

from debertina_jax.data.tokenizer import REQUIRED_CHARS
from debertina_jax.runtime.metrics_log import read_metrics

# Symbols outside the tokenizer's always-kept characters, so that with data.vocab_size just
# large enough for the characters there is no room for merged pieces: one token per symbol.
_GREEK = "αβγδεζηθικλμνξοπρστυφχψω"
SYMBOLS = _GREEK + _GREEK.upper()


def _env(cache: dict[str, str]) -> dict[str, str]:
    return process_env(1, **cache)


def _pretrain(*arguments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "run_pretrain.py"), *arguments], env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done


def _error_line(done: subprocess.CompletedProcess, status: int) -> str:
    """The command ended with `status` and one "error:" line, without a traceback."""
    assert done.returncode == status, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


# ---- stages, then a run that must use the context -------------------------------------------


def write_runs_corpus(path: Path, documents: int = 600, length: int = 64, seed: int = 0) -> str:
    """Documents of runs of one symbol (2 to 6 long), the symbols uniform: a masked symbol is
    (nearly always) its neighbours', so a model that reads the context predicts it, while the
    best context-free guess is right 1 time in len(SYMBOLS). Returns the text."""
    rng = random.Random(seed)
    documents_text = []
    for _ in range(documents):
        text = ""
        while len(text) < length:
            text += rng.choice(SYMBOLS) * rng.randint(2, 6)
        documents_text.append(text[:length])
    text = "\n\n".join(documents_text) + "\n"  # .txt: blank lines separate documents
    path.write_text(text, encoding="utf-8")
    return text


# Pieces: [PAD] [CLS] [SEP] [UNK], one per character (kept ones and the corpus's), and "▁".
VOCAB = 4 + len(set(REQUIRED_CHARS) | set(SYMBOLS)) + 1
LEARNING_STEPS = 400
LEARNING_RUN = [
    f"data.vocab_size={VOCAB}",
    "data.max_seq_length=64",
    "data.eval_lines=64",
    "data.prepare_workers=1",
    "model.num_hidden_layers=1",
    "generator.num_hidden_layers=1",
    "model.hidden_dropout_prob=0",
    "model.attention_probs_dropout_prob=0",
    f"train.steps={LEARNING_STEPS}",
    "train.batch_size=16",
    "train.log_every_steps=50",
    f"train.eval_every_steps={LEARNING_STEPS}",
    "train.eval_batches=4",
    "checkpoint.every_steps=1000",
    "optimizer.learning_rate=1e-2",
    "optimizer.warmup_steps=20",
]


def _files(workdir: Path) -> set[str]:
    return {str(p.relative_to(workdir)) for p in workdir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory, compile_cache_env) -> dict:
    """`--stage tokenizer`, then `--stage prepare`, then the plain command, in one workdir;
    what each left there."""
    root = tmp_path_factory.mktemp("learning")
    corpus, workdir = root / "runs.txt", root / "run"
    text = write_runs_corpus(corpus)
    command = ["--config", str(TINY_YAML), "--workdir", str(workdir),
               f"data.train_files={corpus}", *LEARNING_RUN]  # fmt: skip
    env = _env(compile_cache_env)
    seen: dict = {"text": text, "workdir": workdir}
    for stage in ("tokenizer", "prepare"):
        done = _ok(_pretrain(*command, "--stage", stage, env=env))
        seen[stage] = {"stdout": done.stdout, "stderr": done.stderr, "files": _files(workdir),
                       "tokenizer": (workdir / "tokenizer" / "tokenizer.json").stat()}  # fmt: skip
    # 400 steps: running, not compiling, is what takes the time here (61 s -> 44 s optimised).
    trained = _pretrain(*command, env=process_env(1, optimized=True, **compile_cache_env))
    seen["train"] = {"stderr": _ok(trained).stderr}
    return seen


def test_stage_tokenizer_and_stage_prepare_stop_after_their_step(staged_run):
    workdir = staged_run["workdir"]
    tokenizer, prepare = staged_run["tokenizer"], staged_run["prepare"]
    assert tokenizer["stdout"].strip() == f"tokenizer ready in {workdir}"
    assert "training a" in tokenizer["stderr"]
    made = tokenizer["files"]
    assert "tokenizer/tokenizer.json" in made and "config.yaml" in made
    assert not [f for f in made if f.split("/")[0] not in ("tokenizer", "config.yaml")], made

    assert prepare["stdout"].strip() == f"prepare ready in {workdir}"
    assert "training a" not in prepare["stderr"]  # the tokenizer of the first command
    assert prepare["tokenizer"].st_mtime_ns == tokenizer["tokenizer"].st_mtime_ns
    made = prepare["files"] - tokenizer["files"]
    assert "data/metadata.json" in made
    assert {f.split("/")[0] for f in made} == {"data"}, made  # nothing trained, no metrics

    # The plain command trains on what the stages made, making neither again.
    assert "training a" not in staged_run["train"]["stderr"]
    assert "packing" not in staged_run["train"]["stderr"]
    assert (workdir / "tokenizer" / "tokenizer.json").stat() == prepare["tokenizer"]
    assert (workdir / "checkpoints" / str(LEARNING_STEPS)).is_dir()


def _replacement_auc(workdir: Path, seed: int = 0) -> float:
    """The trained discriminator on the held-out lines with 15% of the symbols replaced by
    another symbol drawn uniformly: the probability that it scores a replaced symbol above an
    original one (ROC AUC). Replacements and originals are drawn from the same distribution,
    so any context-free discriminator (one that sees a symbol alone) scores 0.5."""
    from debertina_jax.data.loader import make_eval_loader
    from debertina_jax.data.workdir import data_paths
    from debertina_jax.export.checkpoint import load_checkpoint

    trained = load_checkpoint(workdir)
    tokenizer_dir, data_dir = data_paths(trained.config, workdir)
    pieces = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids_of = {piece: i for i, (piece, _) in enumerate(pieces["model"]["vocab"])}
    symbols = np.array([ids_of[s] for s in SYMBOLS])
    loader = make_eval_loader(data_dir, "eval", 64)
    try:
        ids = np.concatenate([batch["input_ids"] for batch in loader])
    finally:
        loader.close()
    ids = ids[(ids != 0).any(axis=1)]  # the loader pads the last batch with empty rows
    rng = np.random.default_rng(seed)
    replaced = np.isin(ids, symbols) & (rng.random(ids.shape) < 0.15)
    corrupted = ids.copy()
    for row, column in zip(*np.nonzero(replaced), strict=True):
        corrupted[row, column] = rng.choice(symbols[symbols != ids[row, column]])
    mask = (corrupted != 0).astype(np.int32)
    logits = np.asarray(trained.discriminator(corrupted, attention_mask=mask))
    scores, labels = logits[np.isin(corrupted, symbols)], replaced[np.isin(corrupted, symbols)]
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores)] = np.arange(1, len(scores) + 1)
    positives, negatives = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def test_learning_what_the_context_decides(staged_run):
    """On the runs corpus the generator predicts masked symbols far better than the best
    context-free guess, and the discriminator tells replaced symbols from original ones,
    which a context-free one cannot (a discriminator that says "original" everywhere scores
    the prior's loss and an AUC of 0.5)."""
    workdir = staged_run["workdir"]
    (last,) = read_metrics(workdir, split="eval")
    assert last["step"] == LEARNING_STEPS
    counts = Counter(c for c in staged_run["text"] if not c.isspace())
    unigram_accuracy = max(counts.values()) / sum(counts.values())
    assert unigram_accuracy < 0.03
    assert last["mlm_accuracy"] > unigram_accuracy + 0.3, last
    assert last["mlm_loss"] < math.log(len(SYMBOLS)) - 1.0, last

    # On the generator's own replacements (eval rows): a cross-entropy below the prior's, the
    # best a discriminator can do without context (the generator now draws symbols as often
    # as the corpus has them).
    p = last["replaced_fraction"]
    assert p > 0.02, last  # enough replacements to judge the discriminator by
    prior = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert last["rtd_loss"] < prior - 0.01, last  # measured: 0.309 against 0.325
    # On replacements this test draws: measured 0.60; 0.5 without context. (A model this
    # small learns to detect replacements slowly: 0.51 to 0.78 in variants of this run.)
    auc = _replacement_auc(workdir)
    assert auc > 0.55, auc


# ---- a diverging run ---------------------------------------------------------------------------


def test_nonfinite_losses_in_a_row_stop_the_run(small_run_overrides, compile_cache_env, tmp_path):
    """A learning rate of 1e30: the update of step 2 (the first after the warmup's 0) sends the
    weights to ~1e29, every later loss is NaN and its update skipped; the second in a row stops
    the run with one error line naming the last checkpoint, exit status 1."""
    workdir = tmp_path / "run"
    overrides = small_run_overrides + SHORT_RUN + [
        "optimizer.learning_rate=1e30", "train.max_consecutive_nonfinite=2"]  # fmt: skip
    done = _pretrain("--config", str(TINY_YAML), "--workdir", str(workdir), *overrides,
                     env=_env(compile_cache_env))  # fmt: skip
    line = _error_line(done, 1)
    checkpoints = re.escape(str(workdir / "checkpoints"))
    # The last checkpoint that has finished saving: step 4's may still be in flight.
    named = re.fullmatch(
        r"error: 2 non-finite losses or gradients in a row before step 5; the last good "
        rf"checkpoint \(step ([24]), {checkpoints}/\1\) is intact\. Lower "
        r"optimizer\.learning_rate or check the data\.",
        line,
    )
    assert named, line
    assert (workdir / "checkpoints" / named[1]).is_dir()
    rows = read_metrics(workdir, split="train")
    assert [(r["step"], r["nonfinite"]) for r in rows] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert rows[2]["loss"] is None and rows[3]["loss"] is None  # NaN, written as null
    assert not (workdir / "run.lock").exists()


# ---- exit status 2 ------------------------------------------------------------------------------


def _bad_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("train: [1, 2\n", encoding="utf-8")
    return path


def _list_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- train\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "arguments, message",
    [
        # argparse's own usage errors
        (lambda t: ["--config", str(TINY_YAML)], "the following arguments are required: --workdir"),
        (lambda t: ["--workdir", str(t / "run"), "--stage", "train"],
         "argument --stage: invalid choice: 'train'"),
        # a resume without --config needs the workdir's config.yaml
        (lambda t: ["--workdir", str(t / "run")],
         lambda t: f"error: no --config given and no {t / 'run' / 'config.yaml'} to resume from"),
        (lambda t: ["--workdir", str(t / "run"), "--config", str(t / "nope.yaml")],
         lambda t: f"error: config file not found: {t / 'nope.yaml'}"),
        (lambda t: ["--workdir", str(t / "run"), "--config", str(_bad_yaml(t))],
         lambda t: f"error: {t / 'bad.yaml'}: not valid YAML: "),
        (lambda t: ["--workdir", str(t / "run"), "--config", str(_list_yaml(t))],
         lambda t: f"error: {t / 'list.yaml'}: expected sections (model:, data:, train:, ...), "
                   "not a list"),
        (lambda t: ["--workdir", "gs://", "--config", str(TINY_YAML)],
         "error: --workdir 'gs://': '' is not a valid bucket name"),
        (lambda t: ["--workdir", str(t / "run"), "--config", str(TINY_YAML),
                    "model.hidden_size=-3"],
         lambda t: f"error: {TINY_YAML}: model: hidden_size: must be > 0, got -3"),
    ],
    ids=["no-workdir", "bad-stage", "no-config-to-resume", "missing-config", "bad-yaml",
         "yaml-not-sections", "bad-bucket", "bad-value"],
)  # fmt: skip
def test_usage_and_config_errors_exit_with_status_2(arguments, message, tmp_path, capsys):
    """Refused before JAX is loaded, so run in this process: run_pretrain.py exits with what
    main() returns (argparse exits itself). (Bad override keys and types, as a subprocess:
    tests/test_pretrain.py.)"""
    from debertina_jax.cli.pretrain import main

    ours = logging.getLogger("debertina_jax")
    level = ours.level  # main() sets its own; the other tests keep theirs
    try:
        status = main(arguments(tmp_path))
    except SystemExit as e:
        status = e.code
    finally:
        ours.setLevel(level)
    err = capsys.readouterr().err
    line = _error_line(subprocess.CompletedProcess([], status, "", err), 2)
    expected = message(tmp_path) if callable(message) else message
    assert expected in line, line
    assert not (tmp_path / "run").exists()
