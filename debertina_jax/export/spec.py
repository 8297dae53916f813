"""What is exported of a run, model by model: one spec each, so the code that writes, describes
and verifies a model directory never asks which model it has."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str  # OUT/<name>; the model of that name in export.checkpoint.ExportSource
    hf_architecture: str  # config.json `architectures`: what transformers builds
    our_architecture: str  # our class for a lossless re-import (hf.convert.from_hf)
    auto_class: str  # the transformers Auto class that verify loads it with
    outputs: tuple[str, ...]  # what verify compares with transformers
    masked_inputs: bool  # verified on inputs with [MASK]s, as in fill-mask use
    carries_emd: bool  # may hold the enhanced mask decoder (its position table, a metadata flag)
    description: str  # model card: "This directory holds ..."
    usage: str  # model card: how to load it (Python)


# The discriminator is a plain encoder for HF: HF has no RTD class, and fine-tuning starts from
# the encoder (transformers reports mask_predictions.* as unused).
DISCRIMINATOR = ModelSpec(
    name="discriminator",
    hf_architecture="DebertaV2Model",
    our_architecture="DebertaV2ForReplacedTokenDetection",
    auto_class="AutoModel",
    outputs=("hidden states",),
    masked_inputs=False,
    carries_emd=False,
    description=(
        "the ELECTRA-style **discriminator** (replaced-token detection), the model to "
        "fine-tune. The word embeddings are the merged GDES table (E_G + E_delta). The RTD "
        "head is stored as `mask_predictions.*`: transformers does not use it and lists it "
        "as unused when loading; `debertina_jax.hf.convert.from_hf(dir, "
        '"DebertaV2ForReplacedTokenDetection")` reads it back.'
    ),
    usage=(
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
        'path = "path/to/this/directory"\n'
        "tokenizer = AutoTokenizer.from_pretrained(path)\n"
        "model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)"
    ),
)
GENERATOR = ModelSpec(
    name="generator",
    hf_architecture="DebertaV2ForMaskedLM",
    our_architecture="DebertaV2ForMaskedLM",
    auto_class="AutoModelForMaskedLM",
    outputs=("hidden states", "logits"),
    masked_inputs=True,
    carries_emd=True,
    description=(
        "the ELECTRA-style **generator** (masked language model) that trained the "
        "discriminator. It is not the model to fine-tune."
    ),
    usage=(
        "from transformers import pipeline\n\n"
        'fill = pipeline("fill-mask", model="path/to/this/directory")\n'
        'fill("A capital de Portugal é [MASK].")'
    ),
)
SPECS = {spec.name: spec for spec in (DISCRIMINATOR, GENERATOR)}
MODELS = tuple(SPECS)
# The weights an export can take from a checkpoint (export/weights.py): the parameters as they
# are, or their moving average (runs with train.ema_decay).
WEIGHTS = ("raw", "ema")
