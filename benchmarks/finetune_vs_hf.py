"""Fine-tuning in JAX (python -m debertina_jax.finetune) against HF transformers' Trainer on the
same exported discriminator, data and hyperparameters: the validation metric over seeds on each
side (mean, std), and training throughput (examples/s) on this machine.

    python benchmarks/finetune_vs_hf.py --model runs/tiny --task temas --seeds 3 \\
        --output bench.json [section.key=value ...]

MODEL is a pretraining workdir or an HF directory; a workdir's discriminator is written to an
HF directory first (what convert_to_pt.py writes, minus the RTD head). Sequence tasks only.
The HF side needs `accelerate` (Trainer's dependency): `pip install 'debertina-jax[bench]'`.

What is held equal: tokenizer and max_length, AdamW (lr, betas, eps, weight decay off biases
and LayerNorm, clip 1.0), linear warmup (the same number of steps) and decay, batch size,
epochs, dropout (the model's config), evaluation after every epoch and the best epoch's metric
reported. Not equal: the random streams (head initialisation, shuffling, dropout), hence seeds.
Layer-wise decay and SiFT are off (HF Trainer has neither built in).

Throughput: examples per second over the training steps after the first (JAX: the first step
compiles; HF: excluded the same way), without evaluation; the whole run's wall time is given too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from debertina_jax.finetune.cli import add_task_arguments
from debertina_jax.finetune.metrics import accuracy, macro_f1, mse, pearson, seed_std
from debertina_jax.finetune.optimizer import warmup_steps
from debertina_jax.finetune.settings import parse_settings

METRICS = ("accuracy", "macro_f1", "pearson", "mse")


def hf_directory(model: str, out: Path) -> Path:
    """`model` as an HF directory (a workdir's discriminator is written to `out`)."""
    from debertina_jax.finetune.export_hf import TOKENIZER_FILES
    from debertina_jax.finetune.pretrained import load_pretrained
    from debertina_jax.hf.convert import to_hf

    pretrained = load_pretrained(model)
    if pretrained.kind == "hf":
        return Path(model)
    to_hf(pretrained.backbone, out, "float32")
    for name in TOKENIZER_FILES:
        if (pretrained.tokenizer_dir / name).is_file():
            shutil.copy2(pretrained.tokenizer_dir / name, out / name)
    return out


def run_jax(model_dir: Path, args, settings, work: Path) -> dict:
    from debertina_jax.finetune.run import FinetuneJob, finetune

    job = FinetuneJob(
        model=str(model_dir), output=str(work / "jax"), task=args.task, train=args.train,
        validation=args.validation, text_fields=args.text_fields, label_field=args.label_field,
        task_type=args.task_type, seeds=args.seeds, export=False, progress=False,
        settings=settings,
    )  # fmt: skip
    started = time.perf_counter()
    result = finetune(job, overwrite=True)
    wall = time.perf_counter() - started
    return {
        "validation": [s["validation"] for s in result["seeds"]],
        "train_examples_per_second": [s["train_examples_per_second"] for s in result["seeds"]],
        "wall_seconds": wall,
        "metric": result["metric"],
        "steps": result["steps"],
        "labels": result["labels"],
    }


def run_hf(model_dir: Path, args, settings, work: Path, labels: list[str], steps: int) -> dict:
    import torch
    import transformers

    from debertina_jax.finetune.run import FinetuneJob, resolve_task
    from debertina_jax.finetune.tasks import load_split

    torch.set_num_threads(args.torch_threads)
    transformers.logging.set_verbosity_error()
    spec = resolve_task(
        FinetuneJob(model="", output="", task=args.task, train=args.train,
                    validation=args.validation, text_fields=args.text_fields,
                    label_field=args.label_field, task_type=args.task_type)
    )  # fmt: skip
    if spec.task_type == "token-classification":
        raise SystemExit("this benchmark compares sequence tasks only")
    splits = {s: load_split(spec, s, getattr(args, s)) for s in ("train", "validation")}
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    max_length = settings.train.max_length or min(256, tokenizer.model_max_length)
    regression = spec.task_type == "regression"

    class Data(torch.utils.data.Dataset):
        def __init__(self, examples):
            columns = list(zip(*examples.texts, strict=True))
            self.encoded = tokenizer(*columns, truncation=True, max_length=max_length)
            index = {name: i for i, name in enumerate(labels)}
            self.labels = [float(y) if regression else index[y] for y in examples.labels]

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            item = {k: v[i] for k, v in self.encoded.items()}
            item["labels"] = self.labels[i]
            return item

    train, validation = Data(splits["train"]), Data(splits["validation"])

    def compute_metrics(prediction):
        logits, gold = prediction.predictions, prediction.label_ids
        if regression:
            return {"pearson": pearson(logits[:, 0], gold), "mse": mse(logits[:, 0], gold)}
        predicted = logits.argmax(-1)
        return {"accuracy": accuracy(predicted, gold), "macro_f1": macro_f1(predicted, gold)}

    class StepClock(transformers.TrainerCallback):
        def __init__(self):
            self.seconds, self.steps, self.started = 0.0, 0, None

        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.steps += 1
            if self.steps > 1:  # the first step is excluded, as JAX's compiling one is
                self.seconds += time.perf_counter() - self.started

    opt, tr = settings.optimizer, settings.train
    seeds = []
    for k in range(args.seeds):
        seed = tr.seed + k
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(model_dir),
            num_labels=1 if regression else len(labels),
            id2label=None if regression else dict(enumerate(labels)),
            label2id=None if regression else {n: i for i, n in enumerate(labels)},
            **settings.model.overrides(),
        )  # fmt: skip
        clock = StepClock()
        trainer = transformers.Trainer(
            model=model,
            args=transformers.TrainingArguments(
                output_dir=str(work / f"hf-{seed}"), learning_rate=opt.learning_rate,
                num_train_epochs=tr.epochs, max_steps=tr.max_steps or -1,
                per_device_train_batch_size=tr.batch_size,
                per_device_eval_batch_size=tr.eval_batch_size or tr.batch_size,
                warmup_steps=warmup_steps(opt, steps), weight_decay=opt.weight_decay,
                adam_beta1=opt.b1, adam_beta2=opt.b2, adam_epsilon=opt.eps,
                max_grad_norm=opt.clip_norm, lr_scheduler_type="linear", eval_strategy="epoch",
                save_strategy="no", logging_strategy="no", report_to=[], seed=seed,
                use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
            ),
            train_dataset=train,
            eval_dataset=validation,
            data_collator=transformers.DataCollatorWithPadding(tokenizer),
            compute_metrics=compute_metrics,
            callbacks=[clock],
        )  # fmt: skip
        trainer.remove_callback(transformers.PrinterCallback)  # no metrics dicts on stdout
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
        evals = [r for r in trainer.state.log_history if "eval_loss" in r]
        metric = f"eval_{args.metric}"
        better = max if args.metric != "mse" else min
        best = better(evals, key=lambda r: r[metric])
        examples = _examples_after_first(trainer.state.global_step, len(train), tr.batch_size)
        seeds.append({
            "validation": {k[5:]: v for k, v in best.items() if k[5:] in METRICS},
            "train_examples_per_second": examples / clock.seconds if clock.seconds else None,
            "wall_seconds": wall,
            "steps": trainer.state.global_step,
        })  # fmt: skip
    return {
        "validation": [s["validation"] for s in seeds],
        "train_examples_per_second": [s["train_examples_per_second"] for s in seeds],
        "wall_seconds": sum(s["wall_seconds"] for s in seeds),
        "steps": seeds[0]["steps"],
        "torch_threads": args.torch_threads,
    }


def _examples_after_first(steps: int, n: int, batch_size: int) -> int:
    """Examples in training steps 2..steps, the last batch of each epoch being short."""
    per_epoch = -(-n // batch_size)
    sizes = [n - batch_size * (per_epoch - 1) if i % per_epoch == per_epoch - 1 else batch_size
             for i in range(steps)]  # fmt: skip
    return sum(sizes[1:])


def summarise(side: dict) -> dict:
    out = {}
    for name in side["validation"][0]:
        values = [v[name] for v in side["validation"]]
        out[name] = {"mean": float(np.mean(values)), "std": seed_std(values), "values": values}
    rates = [r for r in side["train_examples_per_second"] if r]
    out["train_examples_per_second"] = float(np.mean(rates)) if rates else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    add_task_arguments(parser, test=False)  # HF Trainer's side evaluates on validation only
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
    parser.add_argument("--output", help="write the numbers as JSON here")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    settings = parse_settings(args.overrides)
    if settings.optimizer.layer_decay != 1.0 or settings.sift.enabled:
        raise SystemExit("layer decay and SiFT have no HF Trainer counterpart; leave them off")
    import jax

    work = Path(tempfile.mkdtemp(prefix="finetune-vs-hf-"))
    try:
        model_dir = hf_directory(args.model, work / "model")
        jax_side = run_jax(model_dir, args, settings, work)
        args.metric = jax_side["metric"]
        hf_side = run_hf(model_dir, args, settings, work, jax_side["labels"], jax_side["steps"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "model": args.model, "task": args.task or args.train, "seeds": args.seeds,
        "settings": settings.to_dict(), "metric": args.metric, "steps": jax_side["steps"],
        "jax": {**summarise(jax_side), "wall_seconds": jax_side["wall_seconds"],
                "devices": jax.device_count(), "backend": jax.default_backend()},
        "hf": {**summarise(hf_side), "wall_seconds": hf_side["wall_seconds"],
               "torch_threads": hf_side["torch_threads"]},
        "load_average": os.getloadavg(),
    }  # fmt: skip
    for side in ("jax", "hf"):
        r = report[side]
        metrics = ", ".join(
            f"{k} {v['mean']:.4f} +- {v['std']:.4f}" for k, v in r.items() if isinstance(v, dict)
        )
        rate = r["train_examples_per_second"]
        print(f"{side:4s} {metrics}; {rate:,.1f} train examples/s; {r['wall_seconds']:.0f} s")
    print(f"load average {report['load_average']}")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
