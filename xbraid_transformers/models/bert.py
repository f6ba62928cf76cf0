"""BERT: a masked-language-model encoder whose transformer stack is an ODE solved by MGRIT,
plus a classification head for fine-tuning (e.g. Rotten Tomatoes polarity).

    bert = Bert(BertConfig(vocab_size=8000, num_layers=16))
    inputs, labels = mask_tokens(ids, BertConfig.mask_id, vocab_size, special_ids)  # 80/10/10
    loss = bert.mlm_loss(inputs, labels)        # ids: (B, T), padding where ids == pad_id
    clf = BertClassifier(bert, num_classes=2)   # logits = clf(ids): (B, 2), [CLS] pooled
    classification_metrics(clf, ids, labels)    # {"loss", "accuracy"}; mlm_eval_loss for MLM

Pre-LN layers, step T/N; the MLM decoder is tied to the token embedding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerParallelModel, ParallelConfig, encoder_stack, initialise_

__all__ = ["BertConfig", "Bert", "BertClassifier", "mask_tokens", "sample_mlm_batch",
           "mlm_eval_loss", "classification_metrics"]


@dataclass
class BertConfig:
    vocab_size: int = 8000
    max_len: int = 128
    d_model: int = 128
    n_heads: int = 4
    num_layers: int = 8
    d_ff: Optional[int] = None     # default 4 * d_model
    dropout: float = 0.0
    pad_id: int = 0                # WordPiece specials: [PAD] [UNK] [CLS] [SEP] [MASK]
    mask_id: int = 4
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


class Bert(LayerParallelModel):
    def __init__(self, config: BertConfig, comm=None):
        super().__init__()
        self.config = c = config
        self.tok = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Embedding(c.max_len, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = encoder_stack(c, comm)       # step T/N, MGRIT, buffers, final LayerNorm
        self.mlm_transform = nn.Sequential(nn.Linear(c.d_model, c.d_model), nn.GELU(),
                                           nn.LayerNorm(c.d_model))
        self.mlm_bias = nn.Parameter(torch.zeros(c.vocab_size))
        initialise_(self, self.encoder, c.parallel, c.num_layers)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, d) of token ids (B, T); positions with pad_id are masked keys."""
        B, T = ids.shape
        if T > self.config.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len {self.config.max_len}")
        x = self.drop(self.tok(ids) + self.pos(torch.arange(T, device=ids.device)))  # (B, T, d)
        padding = ids == self.config.pad_id                                          # (B, T)
        return self.encoder(x, src_key_padding_mask=padding if padding.any() else None)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlm_transform(hidden) @ self.tok.weight.T + self.mlm_bias   # (B, T, vocab)

    def mlm_loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy at the masked positions (labels -100 elsewhere). The head runs at those
        positions only (about 15% of the tokens): its vocabulary-wide product, replicated on
        every rank, is then a small part of a step instead of a serial bottleneck."""
        chosen = labels != -100                                 # (B, T)
        logits = self.mlm_logits(self(inputs)[chosen])          # (masked, vocab)
        return F.cross_entropy(logits, labels[chosen])


class BertClassifier(LayerParallelModel):
    """Sequence classification: the hidden state of the first token ([CLS]) -> linear layer."""

    def __init__(self, bert: Bert, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.bert = bert
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(bert.config.d_model, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.bert(ids)[:, 0]))       # (B, num_classes)


def mask_tokens(ids: torch.Tensor, mask_id: int, vocab_size: int, special_ids: Sequence[int] = (),
                prob: float = 0.15, generator: Optional[torch.Generator] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption: choose ``prob`` of the non-special tokens; of those 80% -> [MASK],
    10% -> a random token, 10% unchanged. Returns (inputs, labels); labels are -100 where
    nothing is predicted."""
    if not 0 < prob < 1:
        raise ValueError(f"prob must be in (0, 1), got {prob}")
    rand = lambda: torch.rand(ids.shape, generator=generator).to(ids.device)  # noqa: E731
    special = torch.zeros_like(ids, dtype=torch.bool)
    for s in special_ids:
        special |= ids == s
    chosen = (rand() < prob) & ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = rand()
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(ids, mask_id), ids)
    random_tokens = torch.randint(vocab_size, ids.shape, generator=generator).to(ids.device)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_tokens, inputs)
    return inputs, labels


def sample_mlm_batch(rows: torch.Tensor, batch_size: int, mask_id: int, vocab_size: int,
                     special_ids: Sequence[int] = (), generator: Optional[torch.Generator] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random rows of ``rows`` (N, T), corrupted by :func:`mask_tokens`:
    (inputs, labels)."""
    picked = rows[torch.randint(len(rows), (batch_size,), generator=generator)]
    return mask_tokens(picked, mask_id, vocab_size, special_ids, generator=generator)


@torch.no_grad()
def mlm_eval_loss(bert: Bert, rows: torch.Tensor, special_ids: Sequence[int] = (), batches: int = 5,
                  batch_size: int = 100, seed: int = 123) -> float:
    """Mean masked-LM loss over ``batches`` masked batches of ``rows`` drawn from ``seed``: every
    model is scored on the same corrupted inputs. The caller chooses the mode (eval, serial)."""
    c, generator = bert.config, torch.Generator().manual_seed(seed)
    return sum(bert.mlm_loss(*sample_mlm_batch(rows, batch_size, c.mask_id, c.vocab_size, special_ids,
                                               generator)).item()
               for _ in range(batches)) / batches


@torch.no_grad()
def classification_metrics(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor,
                           chunk: int = 250) -> dict:
    """Cross-entropy and accuracy of a classifier's logits on (ids, labels), ``chunk`` rows at a
    time (bounded memory). The caller chooses the mode (eval, serial)."""
    logits = torch.cat([model(ids[i:i + chunk]) for i in range(0, len(ids), chunk)])
    return {"loss": F.cross_entropy(logits, labels).item(),
            "accuracy": (logits.argmax(-1) == labels).float().mean().item()}
