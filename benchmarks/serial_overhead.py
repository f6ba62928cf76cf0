"""Serial-mode overhead: forward + backward wall time of LayerParallelTransformerEncoder in
serial mode over torch.nn.TransformerEncoder(norm_first=True) with the same weights
(step_size=1.0, so both compute the same network), in training mode, measured interleaved in
one run (median of the per-round ratios). One torch thread; times are the thread's CPU time
(``time.thread_time``), which other processes on a shared machine do not inflate.

    python benchmarks/serial_overhead.py [--out DIR]   -> benchmarks/results/serial_overhead.json
    python benchmarks/serial_overhead.py --smoke       # one small size, 3 rounds, a temporary directory
"""
import argparse
import os
import statistics
import tempfile
import time

import torch
from torch import nn

import xbraid_transformers as xbt
from xbraid_transformers.app.provenance import provenance, write_json

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# (d_model, layers, batch, seq, dropout) of each measured size
SIZES = [(256, 8, 8, 64, 0.1), (256, 8, 8, 64, 0.0), (64, 16, 4, 32, 0.1), (64, 16, 4, 32, 0.0)]
SMOKE_SIZES = [(32, 4, 2, 8, 0.1)]


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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", help="directory of serial_overhead.json (default: benchmarks/results; with "
                                  "--smoke a temporary directory)")
    ap.add_argument("--smoke", action="store_true", help="one small size, 3 rounds")
    args = ap.parse_args()
    sizes = SMOKE_SIZES if args.smoke else SIZES
    rounds = 3 if args.smoke else args.rounds
    out = args.out or (tempfile.mkdtemp(prefix="serial_overhead-") if args.smoke else OUT)
    facts = provenance()
    torch.set_num_threads(1)
    rows = [measure(*size, rounds=rounds) for size in sizes]
    for r in rows:
        print(r)
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "serial_overhead.json"),
               dict(timer="thread CPU time", rounds=rounds, rows=rows), facts)
    print(f"wrote {out}/serial_overhead.json")


if __name__ == "__main__":
    main()
