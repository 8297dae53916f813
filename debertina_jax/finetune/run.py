"""A whole fine-tuning run: task -> examples -> tokens, the pretrained encoder, N seeds of
training (trainer.py), results.json with per-seed and mean/std metrics, and the best seed's
model exported to OUT/hf (export_hf.py).

    result = finetune(FinetuneJob(model="runs/tiny", task="temas", output="out/temas"))
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from debertina_jax.config import ConfigError
from debertina_jax.finetune.batching import steps_per_epoch
from debertina_jax.finetune.encoding import TaskTokenizer
from debertina_jax.finetune.examples import TASK_TYPES, check_labels, label_names
from debertina_jax.finetune.export_hf import export_task_model
from debertina_jax.finetune.logbook import Logbook
from debertina_jax.finetune.metrics import HIGHER_IS_BETTER, is_better, seed_std
from debertina_jax.finetune.optimizer import make_optimizer
from debertina_jax.finetune.pretrained import build_task_model, load_pretrained, task_config
from debertina_jax.finetune.settings import FinetuneSettings
from debertina_jax.finetune.step import make_predict, make_train_step, place_state, split_model
from debertina_jax.finetune.tables import TaskFileError
from debertina_jax.finetune.tasks import (
    SPLITS,
    TaskSpec,
    file_task,
    load_split,
    named_task,
    task_sources,
)
from debertina_jax.finetune.trainer import Plan, SeedResult, train_seed
from debertina_jax.model.attention import resolve_attention_impl
from debertina_jax.model.compute import Compute
from debertina_jax.runtime.sharding import batch_shards, make_mesh, mesh_shape

log = logging.getLogger(__name__)
RESULTS_FILE = "results.json"
DEFAULT_MAX_LENGTH = 256


@dataclass
class FinetuneJob:
    """What the command line asks for (see cli.py for the flags)."""

    model: str
    output: str
    task: str | None = None
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    text_fields: tuple[str, ...] | None = None
    label_field: str | None = None
    task_type: str | None = None
    step: int | None = None
    seeds: int = 1
    random_init: bool = False  # the baseline: the model's shape and tokenizer, random weights
    export: bool = True
    progress: bool = True
    settings: FinetuneSettings = field(default_factory=FinetuneSettings)


def resolve_task(job: FinetuneJob) -> TaskSpec:
    """The named task, or the task the files and flags describe (every flag then required)."""
    if job.task is not None:
        spec = named_task(job.task)
        if job.text_fields or job.label_field or job.task_type:
            raise TaskFileError(
                f"--task {job.task} fixes the fields and the task type; drop --text-fields, "
                "--label-field and --task-type (or drop --task)"
            )
        if spec.hub_path is None and spec.package_dir is None and not job.train:
            raise TaskFileError(f"task {job.task} needs --train and --validation files")
        return spec
    missing = [
        flag
        for flag, value in (
            ("--train", job.train),
            ("--validation", job.validation),
            ("--text-fields", job.text_fields),
            ("--label-field", job.label_field),
            ("--task-type", job.task_type),
        )
        if not value
    ]
    if missing:
        raise TaskFileError(f"without --task, give {', '.join(missing)}")
    if job.task_type not in TASK_TYPES:
        raise TaskFileError(f"--task-type must be one of {', '.join(TASK_TYPES)}")
    return file_task(tuple(job.text_fields), job.label_field, job.task_type)


def _compute(settings: FinetuneSettings) -> Compute:
    dtype = settings.train.dtype
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return Compute(
        dtype=dtype,
        scan_layers=settings.train.scan_layers,
        remat=settings.train.remat,
        attention_impl=resolve_attention_impl(settings.train.attention_impl),
    )


def _mesh(settings: FinetuneSettings):
    """The mesh over all devices, or over the first data x fsdp x tensor when all are fixed."""
    devices = jax.devices()
    sizes = (settings.mesh.data, settings.mesh.fsdp, settings.mesh.tensor)
    if -1 not in sizes:
        wanted = int(np.prod(sizes))
        if wanted > len(devices):
            raise ConfigError(f"the mesh {sizes} needs {wanted} devices, {len(devices)} exist")
        devices = devices[:wanted]
    mesh_shape(settings.mesh, len(devices))  # the error names the mesh keys
    return make_mesh(settings.mesh, devices=devices)


def _max_length(settings: FinetuneSettings, positions: int) -> int:
    wanted = settings.train.max_length
    if wanted is None:
        return min(DEFAULT_MAX_LENGTH, positions)
    if wanted > positions:
        raise ConfigError(
            f"train.max_length={wanted} exceeds the model's max_position_embeddings ({positions})"
        )
    return wanted


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {output} is a file")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"--output {output} is not empty; pass --overwrite to replace it")


def finetune(job: FinetuneJob, *, overwrite: bool = False) -> dict[str, Any]:
    """Runs the job; returns what results.json holds."""
    started = time.time()
    settings = job.settings
    if job.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {job.seeds}")
    output = Path(job.output)
    _check_output(output, overwrite)
    spec = resolve_task(job)
    files = {"train": job.train, "validation": job.validation, "test": job.test}
    splits = {split: load_split(spec, split, files[split]) for split in SPLITS}
    if splits["train"] is None or splits["validation"] is None:
        raise TaskFileError("fine-tuning needs a training and a validation split")
    names = label_names(splits["train"], spec.task_type, spec.class_names)
    for split in ("validation", "test"):
        if splits[split] is not None and names:
            check_labels(splits[split], names)
    metric = settings.train.metric or spec.metrics[0]
    if metric not in spec.metrics:
        raise ConfigError(
            f"train.metric={metric!r} is not a metric of this task ({', '.join(spec.metrics)})"
        )

    pretrained = load_pretrained(job.model, job.step)
    config = task_config(
        pretrained.config, spec.task_type, names, spec.label_field, settings.model.overrides()
    )
    max_length = _max_length(settings, config.max_position_embeddings)
    tokenizer = TaskTokenizer.load(pretrained.tokenizer_dir)
    encoded = {
        split: None
        if examples is None
        else tokenizer.encode(
            examples, names, max_length=max_length, truncation=settings.train.truncation
        )
        for split, examples in splits.items()
    }

    mesh = _mesh(settings)
    batch_size = settings.train.batch_size
    eval_batch_size = settings.train.eval_batch_size or batch_size
    for key, size in (("train.batch_size", batch_size), ("train.eval_batch_size", eval_batch_size)):
        if size % batch_shards(mesh):
            raise ConfigError(
                f"{key}={size} must be a multiple of mesh.data x mesh.fsdp ({batch_shards(mesh)})"
            )
    per_epoch = steps_per_epoch(len(encoded["train"]), batch_size)
    total = settings.train.max_steps or per_epoch * settings.train.epochs
    epochs = -(-total // per_epoch)
    compute = _compute(settings)

    output.mkdir(parents=True, exist_ok=True)
    logbook = Logbook(output, progress=job.progress)
    results: list[SeedResult] = []
    graphdef = train_step = predict = shardings = tx = None
    try:
        for k in range(job.seeds):
            seed = settings.train.seed + k
            model = build_task_model(
                pretrained, config, spec.task_type, compute, seed, random_init=job.random_init
            )
            graphdef_k, params = split_model(model)
            if train_step is None:  # one compilation for all seeds
                graphdef = graphdef_k
                tx = make_optimizer(settings.optimizer, params, config.num_hidden_layers, total)
                state, shardings = place_state(params, tx, mesh, settings.mesh.rules)
                train_step = make_train_step(
                    graphdef, tx, spec.task_type, settings.sift, mesh, shardings
                )
                predict = make_predict(graphdef, mesh, shardings["params"])
                plan = Plan(
                    train_step=train_step,
                    predict=predict,
                    task_type=spec.task_type,
                    label_names=names,
                    metric=metric,
                    train=encoded["train"],
                    validation=encoded["validation"],
                    validation_examples=splits["validation"],
                    test=encoded["test"],
                    test_examples=splits["test"],
                    batch_size=batch_size,
                    eval_batch_size=eval_batch_size,
                    max_length=max_length,
                    pad_id=tokenizer.pad_id,
                    epochs=epochs,
                    total_steps=total,
                    steps_per_epoch=per_epoch,
                    eval_every=settings.train.eval_every_steps or per_epoch,
                    patience=settings.train.patience,
                    log_every=settings.train.log_every_steps,
                )
            else:
                state, _ = place_state(params, tx, mesh, settings.mesh.rules)
            results.append(train_seed(plan, state, seed, logbook))
    finally:
        logbook.close()

    best = results[0]
    for r in results[1:]:
        if is_better(metric, r.validation.get(metric, float("nan")), best.validation.get(metric)):
            best = r
    report = None
    if job.export:
        # The best parameters gathered to the host, in the model they were trained in.
        best_model = nnx.merge(graphdef, jax.device_get(best.params))
        report = export_task_model(
            best_model,
            pretrained.tokenizer_dir,
            output / "hf",
            splits["validation"],
            encoded["validation"],
            max_length=max_length,
            pad_id=tokenizer.pad_id,
        )

    summary = {
        "task": job.task or "files",
        "task_type": spec.task_type,
        "labels": names,
        "metric": metric,
        "higher_is_better": HIGHER_IS_BETTER[metric],
        "model": str(job.model),
        "model_kind": pretrained.kind,
        "model_step": pretrained.step,
        "random_init": job.random_init,
        "data": task_sources(spec, files),
        "examples": {s: (0 if e is None else len(e)) for s, e in splits.items()},
        "truncated": {s: (0 if e is None else e.truncated) for s, e in encoded.items()},
        "max_length": max_length,
        "steps": total,
        "steps_per_epoch": per_epoch,
        "dtype": str(compute.dtype),
        "devices": len(mesh.devices.flat),
        "settings": settings.to_dict(),
        "seeds": [r.summary() for r in results],
        "mean": _aggregate(results, np.mean),
        "std": _aggregate(results, seed_std),
        "best_seed": best.seed,
        "hf": None if report is None else "hf",
        "hf_verification": report,
        "time_seconds": round(time.time() - started, 3),
    }
    tmp = output / f".{RESULTS_FILE}.tmp"
    summary = _finite(summary)
    tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, output / RESULTS_FILE)
    return summary


def _aggregate(results: list[SeedResult], reduce) -> dict[str, Any]:
    """`reduce` (mean or std) over seeds of each metric of each split, and of the throughput."""
    out: dict[str, Any] = {}
    for split in ("validation", "test"):
        per_seed = [getattr(r, split) for r in results if getattr(r, split) is not None]
        if per_seed:
            out[split] = {name: float(reduce([s[name] for s in per_seed])) for name in per_seed[0]}
    rates = [r.train_examples_per_second for r in results if r.train_examples_per_second]
    out["train_examples_per_second"] = float(reduce(rates)) if rates else None
    return out


def _finite(value: Any) -> Any:
    """NaN and infinities (an undefined Pearson r, say) as null: results.json stays valid JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
