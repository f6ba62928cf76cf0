"""Pipeline parallelism (torch.distributed.pipelining: GPipe, 1F1B) beside layer-parallel MGRIT on
the same layers, the same loss and the same ranks.

Real: 2 gloo processes on this machine (one torch thread each), wall time per training step
(least of ``--reps`` after a warm-up; every variant started together on both processes and
ended by the slower), the batch (8 x 16 tokens, d_model 32) in m = 1, 2, 4, 8 micro-batches;
MGRIT solves the whole batch at once and in m solves. The serial baseline is the same layers
through autograd on one process while the other waits, in the same run.

Priced: both from the step costs measured here at each micro-batch size, for P up to 64 and N
up to 512 (``xbraid_transformers.app.bench.pipeline``): pipelining (m + P - 1) stage steps, each
the forward and backward of N / P layers at B / m plus a send and a receive under the NVLink
link model; MGRIT the cost model's critical path at the same step costs and link (the best
hierarchy, one forward / one backward iteration), once per solve. These are virtual figures:
per-layer costs of this CPU, as if each rank had a device of its own. At this size a layer step
costs about the same at every micro-batch size (overhead-bound), which is the worst case for
pipelining; the same grid is also priced with step costs proportional to the micro-batch
(compute-bound, as an accelerator at large batch), the best case for it.

    python benchmarks/pipeline_vs_mgrit.py [--reps 5] [--out DIR]
writes pipeline_vs_mgrit.json, .md and .png (default: benchmarks/results);
    python benchmarks/pipeline_vs_mgrit.py --smoke --out DIR
runs 4 layers, m = 1, 2 and a small priced grid (by default into a temporary directory).
"""
import argparse
import itertools
import os
import tempfile
import time

import torch

from xbraid_transformers.app.bench.pipeline import (SCHEDULES, micro_batch_costs, priced_rows,
                                                    proportional_costs, real_worker)
from xbraid_transformers.app.bench.scaling import Shape
from xbraid_transformers.app.provenance import provenance, write_json, write_markdown
from xbraid_transformers.app.report import figure
from xbraid_transformers.distributed import spawn
from xbraid_transformers.mgrit.clock import NVLINK

SHAPE = Shape(d_model=32, heads=2, ff=64, batch=8, seq=16)
PRICED = Shape(d_model=32, heads=2, ff=64, batch=64, seq=16)   # room for up to 64 micro-batches
OUT = os.path.join(os.path.dirname(__file__), "results")
MGRIT = {"L2 m8 1/1": dict(levels=2, cfactor=8, fwd_iters=1, bwd_iters=1),
         "L2 m4 F 2/1 (training default)": dict(levels=2, cfactor=4, relax="F", fwd_iters=2, bwd_iters=1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real-layers", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--layers", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    ap.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--priced-microbatches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", help="directory of the results (default: benchmarks/results; with --smoke a "
                                  "temporary directory)")
    ap.add_argument("--smoke", action="store_true", help="4 layers, m = 1 and 2, a small priced grid")
    args = ap.parse_args()
    shape, priced_shape = SHAPE, PRICED
    mgrit = MGRIT
    if args.smoke:
        args.real_layers, args.layers, args.ranks, args.microbatches, args.reps = [8], [16], [2, 4], [1, 2], 1
        args.priced_microbatches = [1, 2]
        shape = priced_shape = Shape(d_model=8, heads=2, ff=16, batch=4, seq=4)
        mgrit = {"L2 m4 1/1": dict(levels=2, cfactor=4, fwd_iters=1, bwd_iters=1)}
    out = args.out or (tempfile.mkdtemp(prefix="pipeline_vs_mgrit-") if args.smoke else OUT)
    facts = provenance()
    torch.set_num_threads(1)
    start = time.time()
    load = [os.getloadavg()[0]]     # the 1-minute load average before and after the real runs
    rows = []
    for n in args.real_layers:
        got = spawn(real_worker, 2, n, args.microbatches, mgrit, shape, args.reps, timeout=300.0)[0]
        rows += got
        print(f"real N={n}: " + ", ".join(f"{r['schedule']} m={r['microbatches']} {r['speedup_vs_serial']:.2f}x"
                                         for r in got), flush=True)
    load.append(os.getloadavg()[0])
    ms = args.priced_microbatches
    costs = micro_batch_costs(priced_shape, ms)
    print("step costs (ms) per micro-batch count:",
          {m: {k: round(v * 1e3, 3) for k, v in c.items()} for m, c in costs.items()}, flush=True)
    rows += priced_rows(args.layers, args.ranks, ms, costs, priced_shape, NVLINK)
    rows += priced_rows(args.layers, args.ranks, ms, proportional_costs(costs), priced_shape, NVLINK,
                        basis="proportional")
    os.makedirs(out, exist_ok=True)
    meta = dict(d_model=shape.d_model, heads=shape.heads, ff=shape.ff, batch=shape.batch, seq=shape.seq,
                priced_batch=priced_shape.batch, reps=args.reps, mgrit_real=mgrit, step_costs_s=costs,
                link=vars(NVLINK), load_average_real=load, cpus=os.cpu_count(), wall_s=time.time() - start)
    write_json(os.path.join(out, "pipeline_vs_mgrit.json"), dict(meta, rows=rows), facts)
    write_table(rows, meta, out, facts)
    plot(rows, out)
    print(f"wrote {out}/pipeline_vs_mgrit.*", flush=True)


def _best_solves(ours) -> str:
    split = [r for m, r in ours.items() if m > 1]
    if not split:
        return "-"
    best = max(split, key=lambda r: r["speedup_vs_serial"])
    return f"{best['speedup_vs_serial']:.2f}x (m={best['microbatches']})"


def _priced_table(priced, ms, title, batch):
    lines = [
        "",
        f"## Priced with {title}, P up to 64 (virtual: a device per rank)",
        "",
        f"Batch of the pricing: {batch} sequences. Speedup over the serial step. Pipelining (GPipe and "
        "1F1B cost the same time; 1F1B holds "
        "fewer micro-batches' activations): (m + P - 1) stage steps of N/P layers at B/m, with a "
        "send and a receive each under the NVLink link model. MGRIT: the cost model's critical "
        "path, best hierarchy at one forward / one backward iteration, whole batch (`MGRIT`) or m "
        "solves of B/m. `winner`: the faster of pipelining (best m) and MGRIT (best m).",
        "",
        "| N | P | N/P | " + " | ".join(f"pipeline m={m}" for m in ms) + " | MGRIT | MGRIT, best m solves "
        "| MGRIT hierarchy | winner |",
        "|" + "---|" * (7 + len(ms)),
    ]
    cells = sorted({(r["layers"], r["ranks"]) for r in priced})
    for n, p in cells:
        here = [r for r in priced if (r["layers"], r["ranks"]) == (n, p)]
        pipe = {r["microbatches"]: r for r in here if r["schedule"] == SCHEDULES[0]}
        ours = {r["microbatches"]: r for r in here if r["schedule"].startswith("MGRIT")}
        best_pipe = max(r["speedup_vs_serial"] for r in pipe.values())
        best_ours = max(r["speedup_vs_serial"] for r in ours.values())
        winner = "MGRIT" if best_ours > best_pipe else "pipelining"
        margin = max(best_ours, best_pipe) / min(best_ours, best_pipe)
        lines.append(f"| {n} | {p} | {n // p} | " + " | ".join(f"{pipe[m]['speedup_vs_serial']:.2f}x" for m in ms)
                     + f" | {ours[1]['speedup_vs_serial']:.2f}x | {_best_solves(ours)} "
                     + f"| {ours[1]['mgrit']} | {winner} ({margin:.2f}x) |")
    return lines


def write_table(rows, meta, out, facts):
    real = [r for r in rows if r["kind"] == "real"]
    priced = [r for r in rows if r["kind"] == "priced"]
    lines = [
        "# Pipeline parallelism (GPipe, 1F1B) beside layer-parallel MGRIT",
        "",
        f"Same layers (pre-LN encoder layers as forward-Euler steps, d_model {meta['d_model']}, "
        f"{meta['heads']} heads, FF {meta['ff']}), same loss, batch {meta['batch']} x {meta['seq']} "
        "tokens split into m micro-batches.",
        "",
        "## Real: 2 gloo processes on this machine, wall time per training step",
        "",
        f"Least of {meta['reps']} steps after a warm-up; `speedup`: the serial step (same layers, "
        "one process, the other waiting) over the variant's. A shared machine of "
        f"{meta['cpus']} cores with a 1-minute load average of {meta['load_average_real'][0]:.1f} "
        f"before and {meta['load_average_real'][1]:.1f} after these runs: two processes rarely had "
        "a core each, so these wall times say how the implementations behave under contention, "
        "not what two devices would give (the priced tables below do).",
        "",
        "| N | variant | m | seconds/step | speedup vs serial |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['layers']} | {r['schedule']} | {r['microbatches']} | {r['seconds_per_step'] * 1e3:.1f} ms | "
              f"{r['speedup_vs_serial']:.2f}x |" for r in real]
    ms = sorted({r["microbatches"] for r in priced})
    titles = {"measured": "the step costs measured here at each micro-batch size",
              "proportional": "step costs proportional to the micro-batch (the whole batch's / m)"}
    for basis, title in titles.items():
        lines += _priced_table([r for r in priced if r["step_costs"] == basis], ms, title, meta["priced_batch"])
    lines += ["", f"Step costs measured here (ms per layer) at each micro-batch count m (batch "
                  f"{meta['priced_batch']} / m):"]
    lines += [f"- m = {m}: " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in c.items())
              for m, c in meta["step_costs_s"].items()]
    write_markdown(os.path.join(out, "pipeline_vs_mgrit.md"), "\n".join(lines), facts)


def plot(rows, out):
    priced = [r for r in rows if r["kind"] == "priced"]
    ranks = sorted({r["ranks"] for r in priced})
    panels = [p for p in ranks if p in (8, 64)] or ranks[-1:]
    bases = ["measured", "proportional"]
    with figure(os.path.join(out, "pipeline_vs_mgrit.png"), figsize=(4.6 * len(panels), 3.6 * len(bases)),
                nrows=len(bases), ncols=len(panels), squeeze=False) as (fig, axes):
        _draw(priced, panels, bases, axes)


def _draw(priced, panels, bases, axes):
    for (b, basis), (i, p) in itertools.product(enumerate(bases), enumerate(panels)):
        ax = axes[b][i]
        here = [r for r in priced if r["ranks"] == p and r["step_costs"] == basis]
        for c, m in enumerate(sorted({r["microbatches"] for r in here})):
            pipe = sorted((r for r in here if r["schedule"] == SCHEDULES[0] and r["microbatches"] == m),
                          key=lambda r: r["layers"])
            ax.plot([r["layers"] / p for r in pipe], [r["speedup_vs_serial"] for r in pipe], "o-",
                    color=f"C{c}", label=f"pipelining, m={m}")
        ours = sorted((r for r in here if r["schedule"] == "MGRIT"), key=lambda r: r["layers"])
        ax.plot([r["layers"] / p for r in ours], [r["speedup_vs_serial"] for r in ours], "k^--", lw=2,
                label="MGRIT (whole batch)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("layers per rank N/P")
        ax.set_title(f"P = {p}, step costs {basis} (priced, NVLink model)", fontsize=8)
        ax.axhline(1, color="gray", lw=0.5)
        ax.set_ylabel("speedup over serial")
    axes[0][-1].legend(fontsize=7)


if __name__ == "__main__":
    main()
