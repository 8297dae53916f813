"""Named tasks: the Portuguese benchmarks through HF `datasets`, and the demo task shipped with
the package. A named task fixes the fields, the task type, the label names and the metrics, so

    --task assin2-rte                              reads the hub dataset (online)
    --task assin2-rte --train a.jsonl ...          reads local copies in the hub's columns

give the same examples. The second form is how the loading code is tested offline.

| task       | source                     | input               | label (metrics)          |
|------------|----------------------------|---------------------|--------------------------|
| assin2-rte | hub nilc-nlp/assin2        | premise, hypothesis | entailment_judgment, 2   |
|            |                            |                     | (accuracy, macro F1)     |
| assin2-sts | hub nilc-nlp/assin2        | premise, hypothesis | relatedness_score, 1-5   |
|            |                            |                     | (Pearson, MSE)           |
| hatebr     | hub ruanchaves/hatebr      | instagram_comments  | offensive_language, bool |
|            |                            |                     | (macro F1, accuracy)     |
| lener-br   | hub peluz/lener_br         | tokens              | ner_tags, 13 BIO tags    |
|            |                            |                     | (entity F1)              |
| temas      | package sample_data/tarefas| texto               | tema, 4 topics           |
|            | (offline, the demo's tasks)|                     | (accuracy, macro F1)     |
| frases     | package sample_data/tarefas| frase               | rotulo: natural or       |
|            |                            |                     | corrompida (accuracy...) |

Splits are the datasets' own train / validation / test, the ones the papers report on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from debertina_jax.finetune.examples import Examples, examples_from_rows
from debertina_jax.finetune.metrics import TASK_METRICS
from debertina_jax.finetune.tables import Row, TaskFileError, read_rows

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
# Hub datasets that still use a loading script: recent `datasets` refuses to run scripts, and
# the hub keeps an automatic Parquet conversion of them on this revision.
PARQUET_REVISION = "refs/convert/parquet"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_fields: tuple[str, ...]
    label_field: str
    task_type: str
    metrics: tuple[str, ...]  # the first one picks the best checkpoint and the best seed
    class_names: tuple[str, ...] | None = None  # label index -> name, when stored as indices
    hub_path: str | None = None
    hub_config: str | None = None
    package_dir: str | None = None  # files {split}.jsonl under debertina_jax/sample_data/


LENER_TAGS = ("O",) + tuple(
    f"{p}-{kind}"
    for kind in ("ORGANIZACAO", "PESSOA", "TEMPO", "LOCAL", "LEGISLACAO", "JURISPRUDENCIA")
    for p in ("B", "I")
)

NAMED_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "assin2-rte",
            ("premise", "hypothesis"),
            "entailment_judgment",
            "classification",
            ("accuracy", "macro_f1"),
            class_names=("NONE", "ENTAILMENT"),
            hub_path="nilc-nlp/assin2",
        ),
        TaskSpec(
            "assin2-sts",
            ("premise", "hypothesis"),
            "relatedness_score",
            "regression",
            ("pearson", "mse"),
            hub_path="nilc-nlp/assin2",
        ),
        TaskSpec(
            "hatebr",
            ("instagram_comments",),
            "offensive_language",
            "classification",
            ("macro_f1", "accuracy"),
            class_names=("non-offensive", "offensive"),
            hub_path="ruanchaves/hatebr",
        ),
        TaskSpec(
            "lener-br",
            ("tokens",),
            "ner_tags",
            "token-classification",
            TASK_METRICS["token-classification"],
            class_names=LENER_TAGS,
            hub_path="peluz/lener_br",
        ),
        TaskSpec(
            "temas",
            ("texto",),
            "tema",
            "classification",
            ("accuracy", "macro_f1"),
            package_dir="tarefas/temas",
        ),
        TaskSpec(
            "frases",
            ("frase",),
            "rotulo",
            "classification",
            ("accuracy", "macro_f1"),
            package_dir="tarefas/frases",
        ),
    )
}


def file_task(text_fields: tuple[str, ...], label_field: str, task_type: str) -> TaskSpec:
    """The spec of a task given by files and flags, with the task type's default metrics."""
    return TaskSpec("files", text_fields, label_field, task_type, TASK_METRICS[task_type])


def named_task(name: str) -> TaskSpec:
    try:
        return NAMED_TASKS[name]
    except KeyError:
        raise TaskFileError(
            f"unknown task {name!r}; named tasks: {', '.join(NAMED_TASKS)}"
        ) from None


def load_split(spec: TaskSpec, split: str, path: str | Path | None) -> Examples | None:
    """One split's examples: from `path` when given, else from the task's own source (the hub
    or the package); None for a split the task does not have without a file."""
    if path is not None:
        rows, source = read_rows(path), str(path)
    elif spec.package_dir is not None:
        found = _package_rows(spec, split)
        if found is None:
            return None
        rows, source = found
    elif spec.hub_path is not None:
        rows, source = hub_rows(spec.hub_path, spec.hub_config, split), f"{spec.hub_path}:{split}"
    else:
        return None
    return examples_from_rows(
        rows,
        source,
        text_fields=spec.text_fields,
        label_field=spec.label_field,
        task_type=spec.task_type,
        class_names=spec.class_names,
    )


def _package_rows(spec: TaskSpec, split: str) -> tuple[list[Row], str] | None:
    """The rows of a task shipped in the package; None for a missing test split."""
    root = resources.files("debertina_jax") / "sample_data" / spec.package_dir
    with resources.as_file(root / f"{split}.jsonl") as path:
        if not path.is_file():
            if split == "test":
                return None
            raise TaskFileError(f"task {spec.name} has no {split} split ({path} is missing)")
        return read_rows(path), str(path)


def hub_rows(path: str, config: str | None, split: str) -> list[Row]:
    """The rows of one split of a hub dataset, through HF `datasets` (needs the network)."""
    try:
        import datasets
    except ImportError:
        raise TaskFileError(
            f"named tasks read {path} with HF datasets: pip install 'debertina-jax[hf]', or "
            "pass local copies with --train/--validation/--test"
        ) from None
    try:
        data = datasets.load_dataset(path, config, split=split)
    except Exception as first:  # datasets raises many types; a script dataset raises one of them
        log.info("loading %s failed (%s); trying its Parquet conversion", path, first)
        try:
            data = datasets.load_dataset(path, config, split=split, revision=PARQUET_REVISION)
        except Exception as second:
            raise TaskFileError(
                f"cannot load {path} split {split!r} with HF datasets: {first}; from its "
                f"Parquet conversion: {second}"
            ) from None
    return [dict(row) for row in data]


def task_sources(spec: TaskSpec, files: dict[str, Any]) -> dict[str, str]:
    """Where each split comes from, for results.json."""
    out = {}
    for split in SPLITS:
        if files.get(split) is not None:
            out[split] = str(files[split])
        elif spec.package_dir is not None and split != "test":
            out[split] = f"package:{spec.package_dir}/{split}.jsonl"
        elif spec.hub_path is not None:
            out[split] = f"hub:{spec.hub_path}:{split}"
    return out
