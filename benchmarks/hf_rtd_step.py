"""The same ELECTRA / DeBERTa-v3 RTD training step written with HF PyTorch modules, as a baseline.

generator     transformers DebertaV2ForMaskedLM at the generator's depth (its own word table E_G,
              tied to its MLM decoder)
discriminator transformers DebertaV2Model + the official RTD head
              (LayerNorm(h + h[:, 0]) -> dense -> gelu -> Linear(H, 1))
GDES          the discriminator reads E_G.detach() + E_delta (E_delta starts at zero)
step          15% masking (always [MASK]), generator forward, MLM cross-entropy, sampling from the
              generator softmax (no gradient), RTD binary cross-entropy over every token,
              loss = MLM + rtd_weight * RTD, backward, clip 1.0, AdamW (decay 0.01 except biases
              and LayerNorm).

`masked_only=False` is what HF users write: DebertaV2ForMaskedLM(..., labels=...) projects every
position onto the vocabulary. `masked_only=True` runs the backbone, then the MLM head on the
masked positions only (the same trick our step uses), a stronger baseline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import transformers
from torch import nn

from debertina_jax.config import Config, generator_model_config
from debertina_jax.config.model import DebertaV2Config
from debertina_jax.pretraining.flops import masked_per_sequence


def hf_config(config: DebertaV2Config) -> transformers.DebertaV2Config:
    """Our model config as an HF DebertaV2Config (dropout and all)."""
    d = config.to_dict()
    d.pop("model_type", None)
    return transformers.DebertaV2Config(**d)


class RTDHead(nn.Module):
    """The official DeBERTa-v3 replaced-token-detection head."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dense = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h + h[:, :1])
        return self.classifier(nn.functional.gelu(self.dense(h)))[..., 0]


class HFElectra(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        gen = hf_config(generator_model_config(config))
        disc = hf_config(config.model)
        self.generator = transformers.DebertaV2ForMaskedLM(gen)
        self.discriminator = transformers.DebertaV2Model(disc)
        self.head = RTDHead(disc.hidden_size, disc.layer_norm_eps)
        e_g = self.generator.deberta.embeddings.word_embeddings.weight
        self.delta = nn.Parameter(torch.zeros_like(e_g))
        # GDES: the discriminator never reads its own table; drop it so AdamW does not update it.
        self.discriminator.embeddings.word_embeddings.weight.requires_grad_(False)


def _optimizer(model: HFElectra, config: Config) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = name.endswith("bias") or "LayerNorm" in name or ".norm." in name
        (no_decay if plain else decay).append(p)
    opt = config.optimizer
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": opt.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=opt.learning_rate,
        betas=(opt.b1, opt.b2),
        eps=opt.eps,
    )


def _mask(ids: torch.Tensor, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted ids, bool masked) with round(mask_prob * L) non-special tokens per full row."""
    batch, length = ids.shape
    maskable = ids > 3  # [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3 are never chosen
    count = masked_per_sequence(length, config.data.mask_prob)
    scores = torch.where(maskable, torch.rand(batch, length), -1.0)
    chosen = scores.topk(count, dim=1).indices
    masked = torch.zeros_like(maskable).scatter_(1, chosen, True) & maskable
    return torch.where(masked, torch.full_like(ids, config.data.vocab_size), ids), masked


def make_hf_step(
    config: Config, *, dtype: str = "float32", masked_only: bool = False, seed: int = 0
) -> Callable[[torch.Tensor], float]:
    """step(input_ids [B, L] int64) -> loss, one full RTD training update."""
    torch.manual_seed(seed)
    model = HFElectra(config)
    model.train()
    optimizer = _optimizer(model, config)
    generator, rtd_weight = model.generator, config.train.rtd_weight
    temperature = config.generator.temperature
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if dtype == "bfloat16"
        else contextlib.nullcontext()
    )

    def step(ids: torch.Tensor) -> float:
        attention = (ids != 0).long()
        corrupted, masked = _mask(ids, config)
        with autocast:
            if masked_only:
                hidden = generator.deberta(corrupted, attention_mask=attention)[0][masked]
                if generator.legacy:
                    logits = generator.cls(hidden)
                else:
                    table = generator.deberta.embeddings.word_embeddings
                    logits = generator.lm_predictions(hidden, table)
            else:
                out = generator(corrupted, attention_mask=attention)
                logits = out.logits[masked]
            mlm = nn.functional.cross_entropy(logits.float(), ids[masked])
            with torch.no_grad():
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                sampled = torch.multinomial(probs, 1)[:, 0]
            disc_ids = ids.clone()
            disc_ids[masked] = sampled
            labels = (disc_ids != ids).float()
            e_g = generator.deberta.embeddings.word_embeddings.weight
            embeds = nn.functional.embedding(disc_ids, e_g).detach() + nn.functional.embedding(
                disc_ids, model.delta
            )
            hidden = model.discriminator(inputs_embeds=embeds, attention_mask=attention)[0]
            rtd_logits = model.head(hidden).float()
            bce = nn.functional.binary_cross_entropy_with_logits(
                rtd_logits, labels, reduction="none"
            )
            rtd = (bce * attention).sum() / attention.sum()
            loss = mlm + rtd_weight * rtd
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.clip_norm)
        optimizer.step()
        return loss.item()

    return step
