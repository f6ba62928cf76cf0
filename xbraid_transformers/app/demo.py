"""A one-minute demo: the same small encoder trained serially and layer-parallel.

    python -m xbraid_transformers.demo [--layers 32] [--steps 40]

Task (synthetic, no data needed): for every token of a random sequence, predict how often that
token occurs in the sequence (a histogram task that needs attention). Both runs start from the
same initialisation and see the same batches; the layer-parallel run uses MGRIT with few
iterations, so its gradients are inexact and its loss differs slightly from the serial one.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from ..mgrit.config import MGRITConfig
from ..nn import LayerParallelTransformerEncoder

__all__ = ["HistogramModel", "batch", "main"]


class HistogramModel(nn.Module):
    def __init__(self, vocab: int, seq_len: int, d_model: int, layers: int, mgrit: MGRITConfig):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, 4, 4 * d_model, dropout=0.0,
                                           norm_first=True, batch_first=True)
        self.encoder = LayerParallelTransformerEncoder(layer, layers, nn.LayerNorm(d_model),
                                                       mgrit=mgrit)
        self.head = nn.Linear(d_model, seq_len + 1)

    def forward(self, tokens):                      # tokens: (B, T)
        x = self.embed(tokens) + self.pos           # (B, T, d)
        return self.head(self.encoder(x))           # (B, T, T+1) logits of the count


def batch(generator, batch_size, seq_len, vocab):
    tokens = torch.randint(vocab, (batch_size, seq_len), generator=generator)
    counts = (tokens[:, :, None] == tokens[:, None, :]).sum(-1)
    return tokens, counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    vocab, seq_len, batch_size = 8, 12, 32
    mgrit = MGRITConfig(levels=2, cfactor=4, relax="FCF", fwd_iters=2, bwd_iters=1)
    parallel = HistogramModel(vocab, seq_len, args.d_model, args.layers, mgrit)
    serial = copy.deepcopy(parallel)
    serial.encoder.serial()
    loss_fn = nn.CrossEntropyLoss()
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=3e-3)
                  for name, m in (("serial", serial), ("parallel", parallel))}
    print(f"{args.layers}-layer pre-LN encoder, d_model={args.d_model}, MGRIT: {mgrit.levels} levels, "
          f"cfactor {mgrit.cfactors[0]}, {mgrit.relax}-relaxation, {mgrit.fwd_iters} forward / "
          f"{mgrit.bwd_iters} backward iterations")
    print(f"{'step':>4} {'serial loss':>12} {'parallel loss':>14}  forward residuals / backward residuals")
    generators = {name: torch.Generator().manual_seed(args.seed) for name in optimizers}
    seconds = {name: 0.0 for name in optimizers}
    for step in range(1, args.steps + 1):
        losses = {}
        for name, model in (("serial", serial), ("parallel", parallel)):
            tokens, counts = batch(generators[name], batch_size, seq_len, vocab)
            start = time.perf_counter()
            logits = model(tokens)
            loss = loss_fn(logits.reshape(-1, seq_len + 1), counts.reshape(-1))
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            seconds[name] += time.perf_counter() - start
            losses[name] = loss.item()
        if step == 1 or step % 5 == 0:
            stats = parallel.encoder.stats
            fwd = ", ".join(f"{r:.2e}" for r in stats.fwd_residuals)
            bwd = ", ".join(f"{r:.2e}" for r in stats.bwd_residuals) or "-"
            print(f"{step:4d} {losses['serial']:12.4f} {losses['parallel']:14.4f}  [{fwd}] / [{bwd}]")
    print(f"wall time on one process: serial {seconds['serial']:.1f} s, layer-parallel "
          f"{seconds['parallel']:.1f} s (MGRIT does more work in total; its gain comes from "
          "spreading layers over processes)")


if __name__ == "__main__":
    main()
