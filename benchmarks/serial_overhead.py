"""Serial-mode overhead: forward + backward wall time of LayerParallelTransformerEncoder in
serial mode over torch.nn.TransformerEncoder(norm_first=True) with the same weights
(step_size=1.0, so both compute the same network), in training mode, measured interleaved in
one run (median of the per-round ratios). One torch thread; times are the thread's CPU time
(``time.thread_time``), which other processes on a shared machine do not inflate.

    python benchmarks/serial_overhead.py   -> benchmarks/results/serial_overhead.json
"""
import json
import os
import statistics
import time

import torch
from torch import nn

import xbraid_transformers as xbt

OUT = os.path.join(os.path.dirname(__file__), "results")


def step(model, x):
    start = time.thread_time()
    model(x).square().mean().backward()
    return time.thread_time() - start


def measure(d_model, layers, batch, seq, dropout, rounds=30):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model, max(1, d_model // 64), 4 * d_model, dropout=dropout,
                                       norm_first=True, batch_first=True)
    ref = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).train()
    ours = xbt.LayerParallelTransformerEncoder.from_torch(ref, step_size=1.0, dropout_seed=0)
    ours.serial().train()
    x = torch.randn(batch, seq, d_model)
    for _ in range(3):
        step(ref, x), step(ours, x)
    ratios = []
    for _ in range(rounds):
        a, b = step(ref, x), step(ours, x)
        ratios.append(b / a)
    return dict(d_model=d_model, layers=layers, batch=batch, seq=seq, dropout=dropout,
                ratio_median=statistics.median(ratios), ratio_min=min(ratios))


def main():
    torch.set_num_threads(1)
    rows = [measure(256, 8, 8, 64, 0.1), measure(256, 8, 8, 64, 0.0), measure(64, 16, 4, 32, 0.1),
            measure(64, 16, 4, 32, 0.0)]
    for r in rows:
        print(r)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "serial_overhead.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
