"""benchmarks/downstream.py's own rules: which checkpoints of a run it fine-tunes, and its table
(the fine-tuning runs themselves are tests/test_finetune.py's)."""

from __future__ import annotations

import importlib.util

import pytest
from deberta_testing import REPO

_spec = importlib.util.spec_from_file_location("downstream", REPO / "benchmarks" / "downstream.py")
downstream = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(downstream)


def test_every_kth_checkpoint_and_always_the_last(tmp_path, tiny_run_dir):
    assert downstream.checkpoint_steps(str(tiny_run_dir), 1) == [10, 20]
    assert downstream.checkpoint_steps(str(tiny_run_dir), 2) == [10, 20]  # 20 is the last
    assert downstream.checkpoint_steps(str(tiny_run_dir), 5) == [10, 20]
    with pytest.raises(SystemExit, match=f"no checkpoints in {tmp_path}"):
        downstream.checkpoint_steps(str(tmp_path), 1)


def test_table_rows():
    rows = [
        {"label": "random init", "mean": 0.5, "std": 0.01, "test_mean": None, "test_std": None},
        {"label": "1000", "mean": 0.725, "std": 0.0165, "test_mean": 0.7, "test_std": 0.02},
    ]
    lines = downstream.table(rows, "accuracy").splitlines()
    assert lines[0] == "| pretraining step | validation accuracy (mean +- std) | test accuracy |"
    assert lines[2] == "| random init | 0.5000 +- 0.0100 |  |"
    assert lines[3] == "| 1000 | 0.7250 +- 0.0165 | 0.7000 +- 0.0200 |"
