"""The model card (README.md) of an exported model directory."""

from __future__ import annotations

import numpy as np

from debertina_jax.config import Config, sequence_phases
from debertina_jax.config.model import DebertaV2Config
from debertina_jax.export.checkpoint import ExportSource
from debertina_jax.export.spec import ModelSpec
from debertina_jax.hf.names import BASE_PREFIX, EMD_POSITIONS_KEY

README_NAME = "README.md"
_EMD_NOTE = (
    "\n\n**Warning: this generator was trained with the enhanced mask decoder "
    "(EMD), which transformers cannot run.** Its last layer is the EMD layer, which "
    "transformers applies once to the hidden states instead of twice to "
    "position-enriched queries, so its predictions differ from the ones seen in "
    "pretraining. The EMD's position table is kept as "
    f"`{EMD_POSITIONS_KEY}` (ignored by transformers) so that debertina-jax can "
    "read the generator back without loss."
)


def parameter_counts(tensors: dict[str, np.ndarray], *, emd: bool = False) -> dict[str, int]:
    """Sizes as the DeBERTina card counts them: the word table is "embeddings", the rest of the
    encoder "backbone"; heads (and the EMD's position table, with `emd`) apart."""
    counts = {"embeddings": 0, "backbone": 0, "heads": 0}
    for key, value in tensors.items():
        if emd and key == EMD_POSITIONS_KEY:
            counts["heads"] += value.size
        elif key.endswith("embeddings.word_embeddings.weight"):
            counts["embeddings"] += value.size
        elif key.startswith(BASE_PREFIX):
            counts["backbone"] += value.size
        else:
            counts["heads"] += value.size
    return counts


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _shapes(config: Config) -> str:
    """The batch shape of the run's steps, per sequence-length phase when it has several."""
    phases = sequence_phases(config)
    if len(phases) == 1:
        return f"batch {phases[0].batch_size} x {phases[0].max_seq_length} tokens"
    return "; ".join(
        f"steps {p.first_step:,}-{p.last_step:,}: batch {p.batch_size} x {p.max_seq_length} tokens"
        for p in phases
    )


def model_card(
    source: ExportSource,
    spec: ModelSpec,
    model_config: DebertaV2Config,
    counts: dict[str, int],
    dtype: str,
) -> str:
    """A short README.md: what the model is, its sizes and training, and how to load it."""
    c = model_config
    total = counts["embeddings"] + counts["backbone"]
    tokens = "unknown" if source.tokens_seen is None else f"{source.tokens_seen:,}"
    what = spec.description
    if spec.carries_emd and source.emd_positions is not None:
        what += _EMD_NOTE
    lines = [
        f"# DeBERTa-v3 {spec.name}, pretrained with debertina-jax",
        "",
        f"This directory holds {what}",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | DeBERTa-v3 (`model_type` deberta-v2), {c.num_hidden_layers} layers x "
        f"{c.hidden_size} hidden, {c.num_attention_heads} heads, FFN {c.intermediate_size} |",
        f"| vocabulary | {c.vocab_size} rows (tokenizer: {source.config.data.vocab_size} pieces "
        "+ [MASK]) |",
        f"| parameters | backbone {_count(counts['backbone'])} + embeddings "
        f"{_count(counts['embeddings'])} = {_count(total)} (heads "
        f"{_count(counts['heads'])} more) |",
        f"| weights | `{dtype}` |",
        f"| embedding sharing | {source.config.generator.embedding_sharing} |",
        "",
        "## Pretraining",
        "",
        f"- steps: {source.step:,} ({_shapes(source.config)})",
        f"- tokens seen: {tokens}",
    ]
    if source.weights:
        lines.append(f"- weights: {source.weights}")
    if source.eval_metrics:
        shown = {
            k: v
            for k, v in sorted(source.eval_metrics.items())
            if k not in ("step", "split", "time") and isinstance(v, int | float)
        }
        lines.append(f"- held-out evaluation at step {source.eval_metrics.get('step')}:")
        lines += [f"  - {k}: {v:.4g}" for k, v in shown.items()]
    else:
        lines.append("- held-out evaluation: none recorded")
    lines += ["", "## How to load", "", "```python", spec.usage, "```", ""]
    return "\n".join(lines)
