"""GPT: a decoder-only language model whose transformer stack is an ODE solved by MGRIT.

    model = GPT(GPTConfig(vocab_size=4096, num_layers=16))
    logits, loss = model(idx, targets)          # idx, targets: (B, T) token ids
    model.serial() / model.layer_parallel()     # same training code in both modes

Pre-LN layers with causal self-attention, step T/N (``parallel.final_time`` / ODE layers);
``parallel.buffer_layers=(2, 2)`` runs the first and last two layers serially with step 1
(the paper's 2 + 16 + 2 GPT). Weights tied between the token embedding and the LM head.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerParallelModel, ParallelConfig, encoder_stack, initialise_

__all__ = ["GPTConfig", "GPT"]


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 128          # longest context
    d_model: int = 128
    n_heads: int = 4
    num_layers: int = 8
    d_ff: Optional[int] = None     # default 4 * d_model
    dropout: float = 0.0
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


class GPT(LayerParallelModel):
    def __init__(self, config: GPTConfig, comm=None):
        super().__init__()
        self.config = c = config
        self.tok = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Embedding(c.block_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = encoder_stack(c, comm)        # step T/N, MGRIT, buffers, final LayerNorm
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        initialise_(self, self.blocks, c.parallel, c.num_layers)
        self.head.weight = self.tok.weight  # weight tying

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))          # (B, T, d)
        x = self.blocks(x, is_causal=True)                     # (B, T, d), final LayerNorm included
        logits = self.head(x)                                  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None):
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T); returns (B, T + new)."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            logits = self(context)[0][:, -1] / temperature    # (B, vocab)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return idx
