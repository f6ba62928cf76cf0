"""Virtual-time speedup of one training step (forward + backward), layer-parallel vs serial.

Ranks are emulated as threads of this process (``xbt.perf.emulate``), each with one torch
thread and a virtual clock: compute is the thread's CPU time, messages carry the sender's clock
(NVLink-class link model). Threads rather than processes: on a 2-core machine 16 processes
would spend minutes starting and their clocks would be the same CPU-time clocks; threads run
the same schedule with the same communicator code paths. The serial baseline is the serial
mode (autograd) of the same layers, measured with the same CPU-time clock. d_model 32 (2
heads, FF 64), batch 2 x 16 tokens, no dropout, to keep the sweep within ~10 minutes on CPU.

    python benchmarks/scaling.py [--layers 32 64 128 256] [--ranks 1 2 4 8 16]
writes benchmarks/results/scaling.json and scaling.png.
"""
import argparse
import itertools
import json
import os
import time

import torch
from torch import nn

import xbraid_transformers as xbt
from xbraid_transformers.core.blocks import encoder_rhs
from xbraid_transformers.perf import cost_model, emulate

D, HEADS, FF, BATCH, SEQ = 32, 2, 64, 2, 16
OUT = os.path.join(os.path.dirname(__file__), "results")


def make_layers(n):
    torch.manual_seed(0)
    return [nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, norm_first=True, batch_first=True)
            for _ in range(n)]


def training_step(comm, layers, options, serial, x, reps):
    stack = xbt.LayerParallel(layers, rhs=encoder_rhs, mgrit=xbt.MGRITConfig(**options), comm=comm)
    if serial:
        stack.serial()
    best = None
    for _ in range(reps + 1):                       # the first call warms up
        stack.counts.reset()
        comm.allreduce_sum(0.0)                     # start together
        comm.clock.reset()
        inp = x.clone().requires_grad_()
        stack(inp).square().mean().backward()
        comm.clock.tick()
        comm.allreduce_sum(0.0)                     # the step ends when the last rank is done
        t = comm.clock.time
        best = t if best is None else min(best, t)
    for p in stack.parameters():
        p.grad = None
    return best, dict(vars(stack.counts)), comm.clock.compute


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--levels", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--relax", nargs="+", default=["FCF", "F"], choices=["F", "FCF"],
                    help="relaxation on every non-coarsest level")
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(BATCH, SEQ, D)
    rows = []
    start = time.time()
    for n in args.layers:
        layers = make_layers(n)
        serial_t = emulate(training_step, 1, layers, dict(levels=1), True, x, args.reps)[0][0]
        for p, levels, m, relax, (fi, bi) in itertools.product(
                args.ranks, args.levels, (2, 4), args.relax, ((1, 1), (2, 1))):
            if n // m ** (levels - 1) < p:
                continue
            options = dict(levels=levels, cfactor=m, fwd_iters=fi, bwd_iters=bi, relax=relax)
            out = emulate(training_step, p, layers, options, False, x, args.reps)
            t = max(o[0] for o in out)
            model = cost_model(n, p, levels, m, fi, bi, relax=relax)
            rows.append(dict(layers=n, ranks=p, levels=levels, cfactor=m, relax=relax, iters=f"{fi}/{bi}",
                             serial_s=serial_t, parallel_s=t, speedup=serial_t / t,
                             model_speedup=model["speedup"],
                             steps_rank0=out[0][1], steps_last=out[-1][1]))
            print(f"N={n:4d} P={p:2d} L={levels} m={m} {relax:3s} {fi}/{bi}: speedup {serial_t / t:5.2f} "
                  f"(model {model['speedup']:5.2f})  [{time.time() - start:.0f} s]", flush=True)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "scaling.json"), "w") as f:
        json.dump(dict(d_model=D, batch=BATCH, seq=SEQ, link="NVLINK", rows=rows), f, indent=1)
    plot(rows)


def plot(rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns = sorted({r["layers"] for r in rows})
    fig, axes = plt.subplots(1, len(ns), figsize=(4 * len(ns), 3.5), squeeze=False)
    for ax, n in zip(axes[0], ns):
        configs = sorted({(r["levels"], r["cfactor"], r["relax"], r["iters"]) for r in rows})
        for levels, m, relax, it in configs:
            sel = [r for r in rows if (r["layers"], r["levels"], r["cfactor"], r["relax"], r["iters"])
                   == (n, levels, m, relax, it)]
            if sel:
                line, = ax.plot([r["ranks"] for r in sel], [r["speedup"] for r in sel], "o-",
                                label=f"L{levels} m{m} {relax} {it}")
                ax.plot([r["ranks"] for r in sel], [r["model_speedup"] for r in sel], ":",
                        color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_title(f"N = {n} (dotted: cost model)")
        ax.set_xlabel("ranks")
        ax.axhline(1, color="gray", lw=0.5)
    axes[0][0].set_ylabel("virtual-time speedup")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "scaling.png"), dpi=100)


if __name__ == "__main__":
    main()
