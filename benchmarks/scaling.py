"""Virtual-time speedup of one training step (forward + backward), layer-parallel vs serial.

Ranks are emulated as threads of this process (``xbt.perf.emulate``), each with one torch
thread and a virtual clock: compute is the thread's CPU time, messages carry the sender's clock
through a link model (NVLink-class; for N = 512 also InfiniBand-class). Threads rather than
processes: on a 2-core machine 64 processes would spend minutes starting and their clocks would
be the same CPU-time clocks; threads run the same schedule through the same communicator code.
The serial baseline is the serial mode (autograd) of the same layers on the same kind of clock,
timed by rank 0 before every configuration of every world (the minimum of those), so that it
is measured under the same machine load as the runs it is compared with.
d_model 32 (2 heads, FF 64), batch 2 x 16 tokens, no dropout.

Grid: N in {32, ..., 512}, P = 1, 2, 4, ... up to N/4 (at most 64); levels 2-4, cfactor
2/4/8 (every hierarchy whose coarsest level gives each rank at least one interval); (1, 1)
and (2, 1) forward/backward iterations, skip of the first down-cycle on (the default). With
one forward iteration the skipped first down-cycle relaxes nothing, so F and FCF do the same
work and compute the same numbers: they are measured separately only with two iterations.
InfiniBand rows: N = 512, one forward / one backward iteration. One emulated world per (N, P)
runs every configuration (the stack is reconfigured, not rebuilt).
Each time is the minimum over ``--reps`` repetitions after a warm-up: thread CPU time on a
shared machine can only be inflated by other load, never deflated.

Beside each figure: ``cost_model`` in its unit (one forward layer step, an adjoint step 2), and
the same critical path priced with the step costs measured on this machine (``cost_model``'s
``step_costs``, "calibrated": a forward step, a recording forward step of the final sweep, an
adjoint step, an adjoint step of the final sweep that also forms parameter gradients, and a
serial layer), split by phase, to say which sweep bounds the critical path.

The measurement itself is ``xbraid_transformers.app.bench.scaling`` (shared with ``xbt
reproduce``'s scaling experiment); this script chooses the grid and writes the results.

    python benchmarks/scaling.py [--layers 32 64 128 256 512] [--reps 3]
writes benchmarks/results/scaling.json, scaling.md and scaling.png;
    python benchmarks/scaling.py --targets [--rounds 3] [--reps 5]
measures only the target cells, several times (scaling_targets.json and .md).
"""
import argparse
import json
import os
import platform
import statistics
import time

import torch

from xbraid_transformers.app.bench.scaling import (LINKS, Shape, best_rows, configurations, label, make_layers,
                                                   measure_world, unit_costs)

SHAPE = Shape(d_model=32, heads=2, ff=64, batch=2, seq=16)
OUT = os.path.join(os.path.dirname(__file__), "results")
TARGETS = {(128, 8): 3.5, (512, 64): 10.0}   # issue 14, one forward / one backward iteration
TARGET_CELLS = [(128, 8), (512, 32), (512, 64)]   # and where the cost model says 10x is possible


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64],
                    help="rank counts, each used where P <= N/4")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--targets", action="store_true",
                    help="only the cells of the targets (and N = 512, P = 32), one forward / one "
                         "backward iteration, both links; writes scaling_targets.json and .md")
    ap.add_argument("--rounds", type=int, default=3,
                    help="with --targets: times every cell is measured, round-robin over the cells")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(SHAPE.batch, SHAPE.seq, SHAPE.d_model)
    start = time.time()
    if args.targets:
        cells = TARGET_CELLS
    else:
        cells = [(n, p) for n in args.layers for p in args.ranks if p <= n // 4]
    rows, serial, step_costs = [], {}, {}
    for round_ in range(args.rounds if args.targets else 1):
        for n in sorted({n for n, _ in cells}):
            # measured again for every N: the load of a shared machine drifts
            units = unit_costs(x, SHAPE)
            step_costs.setdefault(n, []).append(units)
            print(f"N={n}: step costs (ms):", {k: round(v * 1e3, 3) for k, v in units.items()},
                  flush=True)
            layers = make_layers(n, SHAPE)
            for p in [p for m, p in cells if m == n]:
                configs = configurations(n, p)
                if args.targets:
                    plan = [(c, list(LINKS)) for c in configs if c["fwd_iters"] == 1]
                else:   # InfiniBand beside NVLink for N = 512, with the iterations of the targets
                    plan = [(c, list(LINKS) if n == 512 and c["fwd_iters"] == 1 else ["NVLINK"])
                            for c in configs]
                world = measure_world(n, p, plan, layers, x, args.reps, units)
                for row in world:
                    row["round"] = round_
                serial.setdefault(f"{n}/{p}", []).append(world[0]["serial_s"])
                rows += world
                best = max(world, key=lambda r: r["speedup"])
                print(f"N={n:4d} P={p:2d} {len(world):2d} runs; best {label(best)} "
                      f"{best['link']}: {best['speedup']:5.2f}x (model {best['model_speedup']:5.2f}x) "
                      f"[{time.time() - start:.0f} s]", flush=True)
    os.makedirs(OUT, exist_ok=True)
    meta = dict(d_model=SHAPE.d_model, heads=SHAPE.heads, ff=SHAPE.ff, batch=SHAPE.batch, seq=SHAPE.seq,
                reps=args.reps,
                rounds=args.rounds if args.targets else 1,
                step_costs_s=step_costs, serial_s_per_world=serial,
                links={k: vars(v) for k, v in LINKS.items()},
                machine=f"{platform.machine()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__}",
                wall_s=time.time() - start)
    name = "scaling_targets" if args.targets else "scaling"
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)
    if args.targets:
        write_targets_table(rows, meta)
    else:
        write_table(rows, meta)
        plot(rows)


def _spread(values):
    return f"{statistics.median(values):.2f}x [{min(values):.2f}-{max(values):.2f}]"


def write_targets_table(rows, meta):
    lines = [
        "# Scaling targets: every configuration of the target cells, one forward / one backward "
        "iteration",
        "",
        f"Same setting as scaling.md. Every cell measured in {meta['rounds']} rounds (round-robin "
        f"over the cells, so that each samples the machine's load at {meta['rounds']} moments); "
        f"each figure the minimum of {meta['reps']} repetitions; sweep took "
        f"{meta['wall_s'] / 60:.0f} min. Speedups: median [min-max] over the rounds; the NVLink "
        "and InfiniBand link models alternate step by step in one emulated world. `wait`, "
        "`calibrated` and `bound` as in scaling.md (medians).",
        "",
        "| N | P | configuration | NVLink | InfiniBand | model | calibrated | wait | bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups = {}
    for r in rows:
        groups.setdefault((r["layers"], r["ranks"], r["levels"], r["cfactor"]), []).append(r)
    table = []
    for key, group in groups.items():
        nvlink = [r for r in group if r["link"] == "NVLINK"]
        infiniband = [r["speedup"] for r in group if r["link"] == "INFINIBAND"]
        first = nvlink[0]
        phases = first["calibrated_phases"]
        bound = max(phases, key=phases.get)
        wait = statistics.median(r["critical_wait_s"] / (r["critical_wait_s"] + r["critical_compute_s"])
                                 for r in nvlink)
        speedups = [r["speedup"] for r in nvlink]
        table.append((key[0], key[1], -statistics.median(speedups), (
            f"| {key[0]} | {key[1]} | {label(first)} | {_spread(speedups)} | {_spread(infiniband)} | "
            f"{first['model_speedup']:.2f}x | "
            f"{statistics.median(r['calibrated_speedup'] for r in nvlink):.2f}x | {wait:.0%} | "
            f"{bound} {phases[bound] / sum(phases.values()):.0%} |")))
    lines += [line for *_, line in sorted(table)]
    with open(os.path.join(OUT, "scaling_targets.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def write_table(rows, meta):
    one, two = best_rows(rows, "1/1"), best_rows(rows, "2/1")
    infiniband = best_rows(rows, "1/1", "INFINIBAND")
    lines = [
        "# Scaling: virtual-time speedup of one training step",
        "",
        f"d_model {meta['d_model']}, batch {meta['batch']} x {meta['seq']} tokens; emulated ranks "
        f"(threads, one torch thread each, CPU-time clocks); minimum of {meta['reps']} repetitions; "
        f"{meta['machine']}; sweep took {meta['wall_s'] / 60:.0f} min.",
        "Best configuration per (N, P) over levels 2-4, cfactor 2/4/8, F/FCF; skip on. "
        "`model`: cost_model (unit: a forward step; an adjoint step 2). `calibrated`: the same "
        "critical path priced with this machine's measured step costs (and the serial step "
        "with the serial layer cost measured at the same moment). `wait`: the critical "
        "rank's waiting share of its time (mostly the coarsest chain). `bound`: the calibrated "
        "phase with the largest share.",
        "",
        "| N | P | best 1/1 (NVLink) | speedup | model | calibrated | wait | bound | best 2/1 | speedup | model "
        "| InfiniBand 1/1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(one):
        r, s = one[key], two.get(key)
        phases = r["calibrated_phases"]
        bound = max(phases, key=phases.get)
        share = phases[bound] / sum(phases.values())
        wait = r["critical_wait_s"] / (r["critical_wait_s"] + r["critical_compute_s"])
        ib = infiniband.get(key)
        target = TARGETS.get(key)
        mark = f" (target {target:g}x)" if target else ""
        lines.append(
            f"| {key[0]} | {key[1]} | {label(r)} | **{r['speedup']:.2f}x**{mark} | {r['model_speedup']:.2f}x | "
            f"{r['calibrated_speedup']:.2f}x | {wait:.0%} | {bound} {share:.0%} | "
            + (f"{label(s)} | {s['speedup']:.2f}x | {s['model_speedup']:.2f}x | " if s else "- | - | - | ")
            + (f"{ib['speedup']:.2f}x ({label(ib)}) |" if ib else "- |"))
    lines += ["", "Step costs measured here before each N (ms; `serial`: forward and backward of "
              "one layer through autograd):"]
    lines += [f"- N = {n}: " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in units.items())
              for n, rounds in meta["step_costs_s"].items() for units in rounds]
    lines += ["",
        f"Model counts equal measured counts on every rank in {sum(r['counts_match_model'] for r in rows)} "
        f"of {len(rows)} runs."]
    with open(os.path.join(OUT, "scaling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns = sorted({r["layers"] for r in rows})
    fig, axes = plt.subplots(1, len(ns), figsize=(3.6 * len(ns), 3.6), squeeze=False)
    series = [("1/1", "NVLINK", "C0", "o-"), ("2/1", "NVLINK", "C1", "s-"),
              ("1/1", "INFINIBAND", "C2", "^--")]
    for ax, n in zip(axes[0], ns):
        for iters, link, color, style in series:
            best = best_rows(rows, iters, link)
            sel = [best[k] for k in sorted(best) if k[0] == n]
            if not sel:
                continue
            ps = [r["ranks"] for r in sel]
            ax.plot(ps, [r["speedup"] for r in sel], style, color=color,
                    label=f"best {iters} {link.lower()}")
            if link == "NVLINK":
                ax.plot(ps, [r["model_speedup"] for r in sel], ":", color=color)
        ax.set_xscale("log", base=2)
        ax.set_title(f"N = {n} (dotted: cost model)", fontsize=9)
        ax.set_xlabel("ranks P")
        ax.axhline(1, color="gray", lw=0.5)
    axes[0][0].set_ylabel("virtual-time speedup")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "scaling.png"), dpi=100)


if __name__ == "__main__":
    main()
