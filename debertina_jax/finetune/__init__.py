"""Fine-tuning and downstream evaluation of a pretrained discriminator (`python -m
debertina_jax.finetune`, `debertina-finetune`). One job per file:

    cli.py          the command line
    run.py          a whole run: task, encoder, seeds, results.json, export
    settings.py     the hyperparameters (section.key=value)
    tables.py       CSV / TSV / JSON lines / Parquet -> rows
    examples.py     rows -> texts (or word lists) and labels, checked
    tasks.py        named tasks (ASSIN2, HateBR, LeNER-Br via HF datasets; the demo task)
    encoding.py     examples -> token ids (and per-word labels)
    batching.py     padded, fixed-size batches
    pretrained.py   the encoder from a workdir or an HF directory; the task model
    optimizer.py    AdamW, warmup + linear decay, layer-wise learning-rate decay
    sift.py         SiFT adversarial training
    step.py         the jitted train step and predictions on the mesh
    trainer.py      one seed: training, evaluation, early stopping
    evaluation.py   predictions -> metrics
    metrics.py      accuracy, macro F1, Pearson, MSE, entity-level F1
    logbook.py      metrics.jsonl, TensorBoard, progress bar
    export_hf.py    the best model -> OUT/hf, verified with transformers
"""
