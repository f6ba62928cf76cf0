"""Seq2Seq: an encoder-decoder translation model solved as *one* ODE by MGRIT.

    model = Seq2Seq(Seq2SeqConfig(src_vocab=4000, tgt_vocab=4000))
    logits = model(src, tgt_in)                 # src: (B, S), tgt_in: (B, T) -> (B, T, tgt_vocab)
    loss = model.loss(src, tgt)                 # teacher forcing on tgt = [BOS] ... [EOS]
    out = model.greedy_decode(src, max_len=40)  # (B, <= max_len)

The state is Z = [X, Y] (source and target along the sequence): encoder layers move X,
decoder layers move Y with cross-attention to LayerNorm(X); the boundary between them must be
a C-point of every MGRIT level (num_encoder_layers a multiple of the product of the cfactors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import LayerParallelTransformer
from .common import LayerParallelModel, ParallelConfig, initialise_, pre_ln_layer

__all__ = ["Seq2SeqConfig", "Seq2Seq"]


@dataclass
class Seq2SeqConfig:
    src_vocab: int = 4000
    tgt_vocab: int = 4000
    max_len: int = 128
    d_model: int = 128
    n_heads: int = 4
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    d_ff: Optional[int] = None     # default 4 * d_model
    dropout: float = 0.0
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        if tuple(self.parallel.buffer_layers) != (0, 0):
            raise ValueError("buffer layers are for decoder-only stacks; the encoder-decoder ODE "
                             "takes buffer_layers=(0, 0)")


class Seq2Seq(LayerParallelModel):
    def __init__(self, config: Seq2SeqConfig, comm=None):
        super().__init__()
        self.config = c = config
        d, ff = c.d_model, c.d_ff or 4 * c.d_model
        self.src_tok = nn.Embedding(c.src_vocab, d)
        self.tgt_tok = nn.Embedding(c.tgt_vocab, d)
        self.pos = nn.Embedding(c.max_len, d)
        self.drop = nn.Dropout(c.dropout)
        enc = pre_ln_layer(nn.TransformerEncoderLayer, d, c.n_heads, ff, c.dropout)
        dec = pre_ln_layer(nn.TransformerDecoderLayer, d, c.n_heads, ff, c.dropout)
        num_layers = c.num_encoder_layers + c.num_decoder_layers
        options = c.parallel.stack_options(num_layers)
        del options["buffer_layers"]
        self.transformer = LayerParallelTransformer(enc, dec, c.num_encoder_layers,
                                                    c.num_decoder_layers, nn.LayerNorm(d),
                                                    nn.LayerNorm(d), comm=comm, **options)
        self.head = nn.Linear(d, c.tgt_vocab, bias=False)
        initialise_(self, self.transformer, c.parallel, num_layers)
        self.head.weight = self.tgt_tok.weight  # weight tying

    def _embed(self, tok: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.config.max_len:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_len {self.config.max_len}")
        return self.drop(tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device)))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        pad = self.config.pad_id
        src_pad = src == pad                                            # (B, S)
        tgt_pad = tgt_in == pad                                         # (B, T)
        y = self.transformer(self._embed(self.src_tok, src),            # (B, S, d)
                             self._embed(self.tgt_tok, tgt_in),         # (B, T, d)
                             tgt_is_causal=True,
                             src_key_padding_mask=src_pad if src_pad.any() else None,
                             tgt_key_padding_mask=tgt_pad if tgt_pad.any() else None,
                             memory_key_padding_mask=src_pad if src_pad.any() else None)
        return self.head(y)                                             # (B, T, tgt_vocab)

    def loss(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: predict tgt[:, 1:] from tgt[:, :-1]; padding is ignored."""
        logits = self(src, tgt[:, :-1])
        labels = tgt[:, 1:].masked_fill(tgt[:, 1:] == self.config.pad_id, -100)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, max_len: int) -> torch.Tensor:
        """Greedy translation of src (B, S): [BOS] ... up to [EOS] (then padding), (B, <= max_len)."""
        c = self.config
        out = torch.full((len(src), 1), c.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(len(src), dtype=torch.bool, device=src.device)
        for _ in range(max_len - 1):
            nxt = self(src, out)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, c.pad_id), nxt)
            out = torch.cat([out, nxt[:, None]], 1)
            done |= nxt == c.eos_id
            if done.all():
                break
        return out
