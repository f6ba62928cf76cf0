"""Token counting on random sequences: no data needed."""
from __future__ import annotations

import torch
from torch import nn

from ...nn import LayerParallelTransformerEncoder
from .base import Task, TaskConfig

__all__ = ["CountingModel", "SyntheticTask"]


class CountingModel(nn.Module):
    """Embedding -> layer-parallel pre-LN encoder -> per-token classifier."""

    def __init__(self, config: TaskConfig, comm=None):
        super().__init__()
        c = config
        self.embed = nn.Embedding(c.vocab, c.d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(c.seq_len, c.d_model))
        layer = nn.TransformerEncoderLayer(c.d_model, c.heads, 4 * c.d_model, dropout=c.dropout,
                                           norm_first=True, batch_first=True)
        self.encoder = LayerParallelTransformerEncoder(layer, c.layers, nn.LayerNorm(c.d_model),
                                                       mgrit=c.mgrit, step_size=c.step_size,
                                                       dropout_seed=c.seed, comm=comm)
        self.head = nn.Linear(c.d_model, c.seq_len + 1)

    def forward(self, tokens):                      # tokens: (B, T)
        x = self.embed(tokens) + self.pos           # (B, T, d)
        return self.head(self.encoder(x))           # (B, T, T+1) logits of the count


class SyntheticTask(Task):
    """For every token of a random sequence, predict how often it occurs (needs attention)."""

    name = "synthetic"

    def __init__(self, config: TaskConfig, comm=None):
        super().__init__(config, CountingModel(config, comm))

    def batch(self, split, step, micro=0):
        c = self.config
        tokens = torch.randint(c.vocab, (c.batch_size, c.seq_len),
                               generator=self.generator(split, step, micro))
        counts = (tokens[:, :, None] == tokens[:, None, :]).sum(-1)
        return tokens, counts

    def loss(self, batch):
        tokens, counts = batch
        logits = self.model(tokens)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), counts.reshape(-1))
