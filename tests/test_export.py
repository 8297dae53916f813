"""convert_to_pt.py / debertina_jax.export: a tiny sharded pretraining run -> HF directories,
verified; the EMD generator; bad input; and the way back (debertina_jax.hf.init).

One tiny run (8 simulated devices, mesh data 2 x fsdp 2 x tensor 2) is trained once per session
(the conftest fixture `tiny_run_dir`) and converted once by the CLI in a one-device subprocess
(`tiny_export_cli`, `tiny_export_dir`); test_finetune_hf.py uses them too. Other states are
built eagerly (`_fresh_state`): jitting the initialisation costs a compilation per call.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from deberta_testing import TINY_RUN, TINY_YAML
from flax import nnx
from process_testing import REPO, process_env
from safetensors import safe_open
from safetensors.numpy import save_file

from debertina_jax.config import Config, load_config
from debertina_jax.export import export as export_lib
from debertina_jax.export import verify as verify_lib
from debertina_jax.export.checkpoint import load_source
from debertina_jax.export.errors import ExportError, Float16OverflowError, OutputPathError
from debertina_jax.export.export import export, export_tensors
from debertina_jax.export.spec import SPECS
from debertina_jax.export.verify import VerificationError
from debertina_jax.hf import names
from debertina_jax.hf.convert import from_hf, model_to_state_dict
from debertina_jax.hf.files import read_hf_weights
from debertina_jax.hf.init import HFInitError
from debertina_jax.hf.names import EMD_POSITIONS_KEY
from debertina_jax.pretraining.state import (
    abstract_train_state,
    create_train_state,
    init_state_from_hf,
    merge_pair,
    shardings_of,
)
from debertina_jax.runtime.checkpointing import (
    Checkpointer,
    CheckpointNotFoundError,
    CheckpointRestoreError,
    restore_checkpoint,
)
from debertina_jax.runtime.sharding import make_mesh

WORD = "deberta.embeddings.word_embeddings.weight"


def _fresh_state(config: Config, seed: int = 0) -> tuple[nnx.GraphDef, dict]:
    """What create_train_state makes (sharded on the config's mesh), initialised eagerly."""
    graphdef, abstract, init = abstract_train_state(config, make_mesh(config.mesh), seed)
    return graphdef, jax.device_put(init(), shardings_of(abstract))


def _run_config(**overrides) -> Config:
    """The tiny run's config with some sections replaced (e.g. init=InitConfig(...))."""
    config = load_config(TINY_YAML, TINY_RUN)
    return dataclasses.replace(config, **overrides)


def _cli(*args: str) -> int:
    """Runs convert_to_pt.main in this process (fast: JAX and torch are already loaded)."""
    spec = importlib.util.spec_from_file_location("convert_to_pt", REPO / "convert_to_pt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---- the main path -------------------------------------------------------------------------------
def test_cli_converts_a_sharded_run_on_one_cpu_device(tiny_export_cli):
    out, done = tiny_export_cli.output, tiny_export_cli.process
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    # The defaults: the latest step, both models, float32, verified.
    assert "wrote discriminator of step 20" in done.stdout
    assert "wrote generator of step 20" in done.stdout
    checks = [line for line in done.stdout.splitlines() if "max abs diff" in line]
    assert len(checks) == 10 and all(line.endswith("ok") for line in checks), done.stdout
    for which in ("discriminator", "generator"):
        files = sorted(p.name for p in (out / which).iterdir())
        assert files == sorted(
            ["README.md", "config.json", "model.safetensors", "special_tokens_map.json",
             "spm.model", "tokenizer.json", "tokenizer_config.json"]
        )  # fmt: skip
    assert _leftovers(out.parent) == []


# ---- what verification checks, and with which tolerances ----------------------------------------
DOCS = REPO / "docs" / "export.md"
_CHECK_LINE = re.compile(
    r"^(\w+)\s+(tensors|tokenizer|hidden states|logits)\s+vs (.+?)\s+max abs diff (\S+) "
    r"\(tolerance (\S+)\)\s+(ok|FAILED)$"
)


def _documented_tolerances() -> tuple[float, dict[str, float]]:
    """(same weights, {dtype: against the checkpoint}) as docs/export.md states them."""
    text = " ".join(DOCS.read_text().split())
    same = re.search(r"\(names, layouts, architecture settings\)\. Tolerance `([^`]+)`", text)
    by_dtype = re.search(
        r"Tolerance `([^`]+)` for float32, `([^`]+)` for float16, `([^`]+)` for bfloat16", text
    )
    assert same and by_dtype, f"{DOCS} no longer states the tolerances"
    dtypes = ("float32", "float16", "bfloat16")
    return float(same.group(1)), dict(zip(dtypes, map(float, by_dtype.groups()), strict=True))


def _output_scales(directory: Path) -> dict[str, float]:
    """max(1, max |output|) over the non-padding positions of the verification batch, per
    output, computed here with transformers: what a relative tolerance is multiplied by."""
    import torch
    import transformers

    generator = directory.name == "generator"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    batch = tokenizer(list(verify_lib.VERIFY_SENTENCES), padding=True, truncation=True,
                      max_length=verify_lib.VERIFY_MAX_TOKENS, return_tensors="pt")  # fmt: skip
    keep = batch["attention_mask"].bool()
    ids = batch["input_ids"].clone()
    if generator:  # the fill-mask input: every MASK_EVERY-th word piece masked
        for row, length in enumerate(keep.sum(dim=1).tolist()):
            ids[row, 1 : length - 1 : verify_lib.MASK_EVERY] = tokenizer.mask_token_id
    auto = transformers.AutoModelForMaskedLM if generator else transformers.AutoModel
    model = auto.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=batch["attention_mask"],
                    output_hidden_states=True)  # fmt: skip
    outputs = {"hidden states": out.hidden_states[-1]}
    if generator:
        outputs["logits"] = out.logits
    return {what: max(1.0, float(value[keep].abs().max())) for what, value in outputs.items()}


def test_verification_uses_the_documented_tolerances(tiny_export_cli, tiny_export_dir):
    """The tolerances in the code are the documented ones (a looser one fails here), and each
    printed check applied them to the size of the outputs (computed here independently)."""
    same, by_dtype = _documented_tolerances()
    assert verify_lib.SAME_WEIGHTS_TOLERANCE == same
    assert verify_lib.TOLERANCES == by_dtype
    lines = [_CHECK_LINE.match(line) for line in tiny_export_cli.process.stdout.splitlines()
             if "max abs diff" in line]  # fmt: skip
    assert len(lines) == 10 and all(lines), tiny_export_cli.process.stdout
    scales = {
        model: _output_scales(tiny_export_dir / model) for model in ("discriminator", "generator")
    }
    for line in lines:
        model, what, against, diff, tolerance, status = line.groups()
        diff, tolerance = float(diff), float(tolerance)
        if what in ("tensors", "tokenizer"):
            assert tolerance == 0 and diff == 0, line.string
            continue
        relative = same if against == "JAX on the same weights" else by_dtype["float32"]
        assert against in ("JAX on the same weights", "JAX on the checkpoint (f32)")
        # The printed tolerance has 3 significant digits.
        assert tolerance == pytest.approx(relative * scales[model][what], rel=5e-3), line.string
        # float32 HF against JAX: measured below 6.3e-6, the documented 5x headroom at least.
        assert 0 < diff <= tolerance / 5 and status == "ok", line.string


@pytest.fixture(scope="module")
def tiny_source(tiny_run_dir):
    """The tiny run's last checkpoint as the export reads it."""
    return load_source(tiny_run_dir)


def _failed(checks: list[verify_lib.Check]) -> set[tuple[str, str]]:
    return {(c.what, c.against) for c in checks if not c.passed}


def test_verification_fails_on_two_swapped_tensors(tmp_path, tiny_source, tiny_export_dir):
    """The written file holds the query and key weights of a layer swapped (same shape)."""
    out = tmp_path / "generator"
    shutil.copytree(tiny_export_dir / "generator", out)
    with safe_open(str(out / "model.safetensors"), "np") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (no __iter__)
    layer = "deberta.encoder.layer.0.attention.self"
    query, key = f"{layer}.query_proj.weight", f"{layer}.key_proj.weight"
    tensors[query], tensors[key] = tensors[key], tensors[query]
    save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
    spec = SPECS["generator"]
    checks = verify_lib.verify(out, spec, tiny_source, export_tensors(tiny_source, spec), "float32")
    # transformers and our reader read the same wrong file: only the checkpoint sees it.
    assert _failed(checks) == {
        ("tensors", "checkpoint in float32"),
        ("hidden states", "JAX on the checkpoint (f32)"),
        ("logits", "JAX on the checkpoint (f32)"),
    }
    message = str(VerificationError(checks))
    assert re.search(r"generator\s+tensors\s+vs checkpoint in float32 .*FAILED", message)


def test_verification_fails_when_the_name_mapping_swaps_two_tensors(
    tmp_path, monkeypatch, tiny_source
):
    """A mapping bug that our writer and reader share: the round trip is exact, transformers
    reads query as key. Only the comparison with transformers can see it."""
    mapping = names._LAYER_MODULES
    monkeypatch.setitem(mapping, ("attention", "query_proj"), "attention.self.key_proj")
    monkeypatch.setitem(mapping, ("attention", "key_proj"), "attention.self.query_proj")
    spec = SPECS["generator"]
    tensors = export_tensors(tiny_source, spec)
    export_lib.write_model_dir(tmp_path / "g", spec, tensors, dtype="float32", source=tiny_source)
    checks = verify_lib.verify(tmp_path / "g", spec, tiny_source, tensors, "float32")
    assert _failed(checks) == {
        (what, against)
        for what in ("hidden states", "logits")
        for against in ("JAX on the same weights", "JAX on the checkpoint (f32)")
    }
    assert [c.max_abs_diff for c in checks if c.what in ("tensors", "tokenizer")] == [0, 0]
    with pytest.raises(VerificationError, match=r"generator\s+logits\s+vs JAX on the same"):
        raise VerificationError(checks)


# What the conversion may not load: our optimizer, train state and train step. (optax itself is
# loaded by flax.nnx, so its presence proves nothing; no module of ours may hold it.)
TRAINING_MODULES = (
    "debertina_jax.pretraining.optimizer",
    "debertina_jax.pretraining.state",
    "debertina_jax.pretraining.step",
    "debertina_jax.pretraining.loop",
)
# The CLI in a process where torch is not installed (as far as imports can tell): the export
# needs it only to verify. Run twice: verified (refused before anything is read), then
# --no-verify; then which of our modules it loaded.
_WITHOUT_TORCH = """
import json, sys

class Hidden:
    # A module finder blind to torch: `import torch` and find_spec("torch") as if absent.
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch" or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)

    def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()

sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
from debertina_jax.cli.export import main

workdir, output = sys.argv[1:]
refused = main(["--workdir", workdir, "--output", output])
code = main(["--workdir", workdir, "--output", output, "--no-verify"])
ours = sorted(m for m in sys.modules if m.startswith("debertina_jax"))
with_optax = [m for m in ours if "optax" in vars(sys.modules[m])]
print(json.dumps({"refused": refused, "code": code, "modules": ours, "with_optax": with_optax,
                  "torch": "torch" in sys.modules}))
"""


def test_conversion_without_torch_and_without_the_optimizer_or_train_step(tmp_path, tiny_run_dir):
    env = process_env(1)
    out = tmp_path / "out"
    command = [sys.executable, "-c", _WITHOUT_TORCH, str(tiny_run_dir), str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.splitlines()[-1])
    # Verification says what it lacks, as bad input, before reading anything.
    assert loaded["refused"] == 2, done.stderr[-3000:]
    assert "verifying the export needs torch and transformers" in done.stderr
    assert "--no-verify" in done.stderr and "Traceback" not in done.stderr
    # --no-verify writes both models without torch.
    assert loaded["code"] == 0, done.stderr[-3000:]
    assert not loaded["torch"]
    assert "not verified (--no-verify)" in done.stdout
    assert (out / "discriminator" / "model.safetensors").is_file()
    assert (out / "generator" / "model.safetensors").is_file()
    # What the conversion may not load: our optimizer, train state and train step.
    assert "debertina_jax.export.export" in loaded["modules"]  # it did run the export
    assert not set(TRAINING_MODULES) & set(loaded["modules"])
    assert loaded["with_optax"] == []


def test_discriminator_directory(tmp_path, tiny_run_dir, tiny_export_dir):
    out = tiny_export_dir / "discriminator"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deberta-v2"
    assert config["architectures"] == ["DebertaV2Model"]
    tensors = read_hf_weights(out)
    assert all(k.startswith(("deberta.", "mask_predictions.")) for k in tensors)
    assert {k for k in tensors if k.startswith("mask_predictions.")} == {
        f"mask_predictions.{m}.{p}"
        for m in ("LayerNorm", "dense", "classifier")
        for p in ("weight", "bias")
    }
    # GDES merged: the table is E_G + E_delta of the checkpoint, not E_delta.
    params = restore_checkpoint(tiny_run_dir).state["params"]

    def table(model: str) -> np.ndarray:
        embeddings = params[model]["deberta"]["embeddings"]
        return np.asarray(embeddings["word_embeddings"]["embedding"]["value"])

    np.testing.assert_array_equal(tensors[WORD], table("generator") + table("discriminator"))
    assert np.abs(table("discriminator")).max() > 0  # E_delta did train

    # Our reader gets the RTD head back.
    rtd = model_to_state_dict(from_hf(out, "DebertaV2ForReplacedTokenDetection"))
    assert sorted(rtd) == sorted(tensors)
    for key in rtd:
        np.testing.assert_array_equal(rtd[key], tensors[key])


def test_model_card_says_what_was_trained(tiny_run_dir, tiny_export_dir):
    card = (tiny_export_dir / "discriminator" / "README.md").read_text()
    rows = [json.loads(line) for line in (tiny_run_dir / "metrics.jsonl").open()]
    last_eval = [r for r in rows if r["split"] == "eval"][-1]
    assert "- steps: 20 (batch 8 x 64 tokens)" in card
    assert f"- tokens seen: {20 * 8 * 64:,}" in card
    assert f"rtd_accuracy: {last_eval['rtd_accuracy']:.4g}" in card
    assert "2 layers x 64 hidden" in card and "AutoModelForSequenceClassification" in card
    tensors = read_hf_weights(tiny_export_dir / "discriminator")
    embeddings = tensors[WORD].size
    backbone = sum(v.size for k, v in tensors.items() if k.startswith("deberta.")) - embeddings
    assert f"backbone {backbone:,} + embeddings {embeddings:,} = {backbone + embeddings:,}" in card
    generator_card = (tiny_export_dir / "generator" / "README.md").read_text()
    assert "fill-mask" in generator_card and "enhanced mask decoder" not in generator_card


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_exports_verify(dtype, tmp_path, tiny_run_dir):
    result = export(tiny_run_dir, tmp_path / "out", dtype=dtype, models=("generator",))
    assert result.checks and all(c.passed for c in result.checks)
    rounding = [c for c in result.checks if c.against.startswith("JAX on the checkpoint")]
    assert len(rounding) == 2 and all(0 < c.max_abs_diff <= c.tolerance for c in rounding)
    # The documented tolerances, times the size of the outputs (computed here).
    same, documented = _documented_tolerances()
    scales = _output_scales(tmp_path / "out" / "generator")
    for check in result.checks:
        if check.what in ("tensors", "tokenizer"):
            assert check.tolerance == 0 == check.max_abs_diff
        elif check.against == "JAX on the same weights":
            assert check.tolerance == pytest.approx(same * scales[check.what], rel=1e-3)
        else:  # scaled by our outputs on float32 weights, HF's here are on rounded ones
            expected = documented[dtype] * scales[check.what]
            assert check.tolerance == pytest.approx(expected, rel=0.05), check
    path = tmp_path / "out" / "generator" / "model.safetensors"
    with safe_open(str(path), "np") as f:
        names = list(f.keys())
    with safe_open(str(path), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in names} == {f"torch.{dtype}"}
    assert json.loads((path.parent / "config.json").read_text())["dtype"] == dtype
    assert not (tmp_path / "out" / "discriminator").exists()


def test_older_step_and_generator_only(tmp_path, tiny_run_dir):
    result = export(
        tiny_run_dir, tmp_path / "out", step=10, models=("generator",), verify_outputs=False
    )
    assert result.step == 10 and result.checks == []
    assert "- steps: 10 " in (tmp_path / "out" / "generator" / "README.md").read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["generator"]


# ---- the enhanced mask decoder -------------------------------------------------------------------
def _save_run(workdir: Path, config: Config, state: dict, tokenizer: Path, step: int = 1) -> Path:
    """A run directory holding one checkpoint of `state`, using `tokenizer` (the tiny run's)."""
    config = dataclasses.replace(
        config, data=dataclasses.replace(config.data, tokenizer_dir=str(tokenizer))
    )
    with Checkpointer(workdir, every_steps=1, keep=1, async_save=False) as checkpointer:
        meta = {"config": config.to_dict(), "tokens_seen": 123}
        checkpointer.save(step, state, {"json": None}, meta, force=True)
    return workdir


def test_emd_generator_is_exported_with_a_warning_and_reimported_losslessly(tmp_path, tiny_run_dir):
    config = _run_config()
    generator = dataclasses.replace(
        config.generator, enhanced_mask_decoder=True, num_hidden_layers=2
    )
    config = dataclasses.replace(config, generator=generator)
    graphdef, state = _fresh_state(config, 3)
    run = _save_run(tmp_path / "run", config, state, tiny_run_dir / "tokenizer")
    result = export(run, tmp_path / "out", models=("generator",))
    assert any("enhanced mask decoder" in w for w in result.warnings)
    assert all(c.passed for c in result.checks)  # HF runs our export_generator() model exactly
    out = tmp_path / "out" / "generator"
    assert (
        "Warning: this generator was trained with the enhanced mask decoder"
        in (out / "README.md").read_text()
    )
    pair = merge_pair(graphdef, state)
    table = np.asarray(pair.enhanced_mask_decoder.position_embeddings.embedding[...])
    np.testing.assert_array_equal(read_hf_weights(out)[EMD_POSITIONS_KEY], table)

    # Back into a fresh EMD run: generator body, EMD layer and table all come back.
    init = dataclasses.replace(config.init, generator_from_hf=str(out))
    config2 = dataclasses.replace(config, init=init)
    graphdef2, state2 = _fresh_state(config2, 4)
    state2 = init_state_from_hf(config2, graphdef2, state2)
    for name in ("generator", "enhanced_mask_decoder"):
        a = jax.tree.leaves(state["params"][name])
        b = jax.tree.leaves(state2["params"][name])
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- bad input -----------------------------------------------------------------------------------
def test_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoints in"):
        export(tmp_path, tmp_path / "out")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint in"):
        export(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_step_that_does_not_exist(tmp_path, capsys, tiny_run_dir):
    with pytest.raises(CheckpointNotFoundError, match=r"step 7 .*available steps: \[10, 20\]"):
        export(tiny_run_dir, tmp_path / "out", step=7)
    assert _cli("--workdir", str(tiny_run_dir), "--output", str(tmp_path / "o"), "--step", "7") == 2
    assert "error: no checkpoint for step 7" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_truncated_checkpoint(tmp_path, capsys, tiny_run_dir):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir / "checkpoints", run / "checkpoints")
    shutil.copytree(tiny_run_dir / "tokenizer", run / "tokenizer")
    data_files = [p for p in (run / "checkpoints" / "20" / "state").rglob("*") if p.is_file()]
    for path in data_files:
        if path.stat().st_size > 1000:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointRestoreError, match=r"cannot restore checkpoint .*20"):
        export(run, tmp_path / "out")
    assert _cli("--workdir", str(run), "--output", str(tmp_path / "out")) == 2
    assert "corrupted or incomplete" in capsys.readouterr().err
    # The older checkpoint is intact and still converts.
    export(run, tmp_path / "out", step=10, verify_outputs=False)


def test_corrupted_checkpoint_metadata(tmp_path, tiny_run_dir):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir / "checkpoints", run / "checkpoints")
    (run / "checkpoints" / "20" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(CheckpointRestoreError, match="cannot read .*20.*meta"):
        export(run, tmp_path / "out")


def test_output_path_is_a_file(tmp_path, capsys, tiny_run_dir):
    target = tmp_path / "model.bin"
    target.write_text("keep me")
    with pytest.raises(OutputPathError, match="is a file"):
        export(tiny_run_dir, target)
    assert _cli("--workdir", str(tiny_run_dir), "--output", str(target)) == 2
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_non_empty_output_needs_overwrite_and_is_replaced_whole(tmp_path, tiny_run_dir):
    out = tmp_path / "out"
    (out / "old").mkdir(parents=True)
    with pytest.raises(OutputPathError, match="not empty.*--overwrite"):
        export(tiny_run_dir, out, verify_outputs=False)
    assert (out / "old").is_dir()
    export(tiny_run_dir, out, models=("generator",), verify_outputs=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["generator"]
    assert _leftovers(tmp_path) == []
    # Never the run itself, or a directory above it.
    for target in (tmp_path / "run", tmp_path):
        with pytest.raises(OutputPathError, match="holds the run"):
            export(tmp_path / "run", target, overwrite=True)
    # An empty directory is fine without --overwrite.
    (tmp_path / "empty").mkdir()
    export(tiny_run_dir, tmp_path / "empty", models=("generator",), verify_outputs=False)


def test_bad_arguments_exit_with_status_2(tmp_path, capsys, tiny_run_dir):
    with pytest.raises(ExportError, match="unsupported dtype 'int8'.*float32, float16, bfloat16"):
        export(tiny_run_dir, tmp_path / "out", dtype="int8")
    base = ["--workdir", str(tiny_run_dir), "--output", str(tmp_path / "o")]
    assert _cli(*base, "--dtype", "fp8") == 2
    assert "unsupported dtype 'fp8'" in capsys.readouterr().err
    for bad in (["--model", "both-of-them"], ["--average-last", "0"], ["--weights", "best"]):
        with pytest.raises(SystemExit) as info:  # argparse's own usage errors
            _cli(*base, *bad)
        assert info.value.code == 2, bad
        assert "error:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


_LAYER1 = "deberta.encoder.layer.1.intermediate.dense.weight"


def test_nan_inf_and_float16_overflow_are_refused_naming_the_tensor(tmp_path, capsys, tiny_run_dir):
    """One run, one bad value per checkpoint: NaN (step 1), inf (step 2), 1e6 (step 3)."""
    config = _run_config()
    config = dataclasses.replace(
        config, data=dataclasses.replace(config.data, tokenizer_dir=str(tiny_run_dir / "tokenizer"))
    )
    graphdef, state = _fresh_state(config)
    pair = merge_pair(graphdef, state)
    kernel = pair.discriminator.deberta.encoder.layers[1].intermediate.kernel
    clean = kernel[...]
    run = tmp_path / "run"
    with Checkpointer(run, every_steps=1, keep=3, async_save=False) as checkpointer:
        for step, value in ((1, np.nan), (2, -np.inf), (3, 1e6)):
            kernel[...] = clean.at[3, 5].set(value)
            params = {**state, "params": nnx.state(pair, nnx.Param)}
            meta = {"config": config.to_dict(), "tokens_seen": 123}
            checkpointer.save(step, params, {"json": None}, meta, force=True)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=rf"discriminator tensor {re.escape(_LAYER1)} holds NaN"):
        export(run, out, step=1)
    assert _cli("--workdir", str(run), "--output", str(out), "--step", "2") == 2
    err = capsys.readouterr().err
    assert f"discriminator tensor {_LAYER1} holds NaN or infinite values" in err
    assert "Traceback" not in err
    with pytest.raises(
        Float16OverflowError,
        match=rf"discriminator tensor {re.escape(_LAYER1)} does not fit float16: its largest "
        r"magnitude is 1e\+06",
    ):
        export(run, out, dtype="float16")
    assert not out.exists() and _leftovers(tmp_path) == []
    export(run, out, dtype="bfloat16", verify_outputs=False)  # bfloat16 holds it


def test_failed_verification_or_crash_writes_nothing(tmp_path, monkeypatch, capsys, tiny_run_dir):
    """What export does with a failed check (which checks fail: the mutation tests above)."""
    out = tmp_path / "out"
    (out / "previous").mkdir(parents=True)

    def failing(directory, spec, *args):
        assert (directory / "model.safetensors").is_file()  # written, in the staging directory
        return [verify_lib.Check(spec.name, "hidden states", "JAX on the same weights", 1.0, 0.1)]

    monkeypatch.setattr(export_lib, "verify", failing)
    with pytest.raises(VerificationError, match=r"generator\s+hidden states .*FAILED"):
        export(tiny_run_dir, out, models=("generator",), overwrite=True)
    args = ["--workdir", str(tiny_run_dir), "--output", str(out), "--dtype", "bfloat16"]
    assert _cli(*args, "--model", "generator", "--overwrite") == 3
    assert "FAILED" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["previous"]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_lib, "verify", crash)
    with pytest.raises(KeyboardInterrupt):
        export(tiny_run_dir, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["previous"]
    assert _leftovers(tmp_path) == []


# ---- back from HF: init.discriminator_from_hf / init.generator_from_hf ---------------------------
def _init_config(**init) -> Config:
    config = _run_config()
    return dataclasses.replace(config, init=dataclasses.replace(config.init, **init))


def _start(config: Config, seed: int = 7):
    graphdef, state = _fresh_state(config, seed)
    return merge_pair(graphdef, init_state_from_hf(config, graphdef, state))


def _assert_same(model, directory: Path) -> None:
    ours, theirs = model_to_state_dict(model), read_hf_weights(directory)
    theirs.pop(EMD_POSITIONS_KEY, None)
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_init_from_export_reproduces_it_exactly_under_gdes(tiny_export_dir):
    out = tiny_export_dir
    pair = _start(
        _init_config(
            discriminator_from_hf=str(out / "discriminator"),
            generator_from_hf=str(out / "generator"),
        )
    )
    _assert_same(pair.export_discriminator(), out / "discriminator")  # E_G + E_delta == E_D
    _assert_same(pair.generator, out / "generator")
    e_g = np.asarray(pair.generator.deberta.embeddings.word_embeddings.embedding[...])
    e_delta = np.asarray(pair.discriminator.deberta.embeddings.word_embeddings.embedding[...])
    np.testing.assert_array_equal(e_g, read_hf_weights(out / "generator")[WORD])
    assert np.abs(e_delta).max() > 0


def test_init_discriminator_only_gives_the_generator_its_table(tiny_export_dir):
    out = tiny_export_dir / "discriminator"
    pair = _start(_init_config(discriminator_from_hf=str(out)))
    _assert_same(pair.export_discriminator(), out)
    e_g = np.asarray(pair.generator.deberta.embeddings.word_embeddings.embedding[...])
    np.testing.assert_array_equal(e_g, read_hf_weights(out)[WORD])
    assert not np.asarray(pair.discriminator.deberta.embeddings.word_embeddings.embedding).any()


@pytest.mark.parametrize("sharing", ["es", "nes"])
def test_init_under_es_and_nes(sharing, tiny_export_dir):
    out = tiny_export_dir
    config = _init_config(
        discriminator_from_hf=str(out / "discriminator"), generator_from_hf=str(out / "generator")
    )
    generator = dataclasses.replace(config.generator, embedding_sharing=sharing)
    pair = _start(dataclasses.replace(config, generator=generator))
    _assert_same(pair.export_discriminator(), out / "discriminator")
    e_g = np.asarray(pair.generator.deberta.embeddings.word_embeddings.embedding[...])
    # es: one table, the discriminator's; nes: each model its own.
    source = out / ("discriminator" if sharing == "es" else "generator")
    np.testing.assert_array_equal(e_g, read_hf_weights(source)[WORD])


def test_init_from_a_plain_encoder_keeps_a_fresh_rtd_head(tmp_path, caplog, tiny_export_dir):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_export_dir / "discriminator", plain)
    tensors = {k.removeprefix("deberta."): v for k, v in read_hf_weights(plain).items()
               if not k.startswith("mask_predictions.")}  # fmt: skip
    save_file(tensors, str(plain / "model.safetensors"), metadata={"format": "pt"})
    pair = _start(_init_config(discriminator_from_hf=str(plain)))
    assert "no RTD head" in caplog.text
    ours = model_to_state_dict(pair.export_discriminator())
    for key, value in tensors.items():
        np.testing.assert_array_equal(ours["deberta." + key], value)


def test_init_refuses_a_different_shape_or_vocabulary(tmp_path, tiny_export_dir):
    out = tiny_export_dir / "discriminator"
    config = _init_config(discriminator_from_hf=str(out))
    wider = dataclasses.replace(config, model=config.model.replace(vocab_size=2100))
    with pytest.raises(HFInitError) as info:
        _start(wider)
    message = str(info.value)
    assert f"init.discriminator_from_hf={out} does not fit" in message
    rows = config.model.vocab_size  # the exported run's: data.vocab_size + 1 ([MASK])
    assert f"tensor {WORD}: HF ({rows}, 64), this run (2100, 64)" in message
    assert f"vocabulary: the HF model has {rows} rows, this run 2100" in message
    assert "mask_predictions" not in message  # only what differs

    shallower = dataclasses.replace(config, model=config.model.replace(num_hidden_layers=1))
    with pytest.raises(HFInitError, match=r"tensor deberta\.encoder\.layer\.1\..* is not in this"):
        _start(shallower)

    other = dataclasses.replace(config, model=config.model.replace(hidden_act="relu"))
    with pytest.raises(HFInitError, match="setting hidden_act: HF 'gelu', this run 'relu'"):
        _start(other)
    with pytest.raises(FileNotFoundError, match="init.generator_from_hf=.*not a directory"):
        _start(_init_config(generator_from_hf=str(tmp_path / "missing")))


def test_a_new_run_starts_from_the_export(tiny_export_dir):
    """create_train_state, as pretrain() calls it, with init.* set: the first step's weights
    are the exported ones, sharded over the run's mesh."""
    out = tiny_export_dir
    config = _init_config(
        discriminator_from_hf=str(out / "discriminator"), generator_from_hf=str(out / "generator")
    )
    graphdef, state = create_train_state(config, make_mesh(config.mesh), 11)
    pair = merge_pair(graphdef, state)
    _assert_same(pair.export_discriminator(), out / "discriminator")
    _assert_same(pair.generator, out / "generator")
    shardings = {leaf.sharding.spec for leaf in jax.tree.leaves(state["params"])}
    assert any("fsdp" in spec for spec in shardings) and any("tensor" in spec for spec in shardings)
