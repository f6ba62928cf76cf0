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

Grid: N in {32, ..., 512}, P = 1, 2, 4, ... up to N/4 (at most 64, and 128 at N = 512); levels
2-4, cfactor 2/4/8, every hierarchy that fits N (coarse levels live on the ranks that own their
points, so any of them runs on any P <= N); (1, 1) forward/backward iterations, and (2, 1)
with F-relaxation, the training default, skip of the first down-cycle on (the default). With
one forward iteration the skipped first down-cycle relaxes nothing, so F and FCF do the same
work and compute the same numbers. InfiniBand rows: N = 512, one forward / one backward
iteration. One emulated world per (N, P) runs every configuration (the stack is reconfigured,
not rebuilt). Each time is the minimum over ``--reps`` repetitions after a warm-up: thread CPU
time on a shared machine can only be inflated by other load, never deflated.

Beside each figure: ``cost_model`` in its unit (one forward layer step, an adjoint step 2), and
the same critical path priced with the step costs measured on this machine (``cost_model``'s
``step_costs``, "calibrated": a forward step, a recording forward step of the final sweep, an
adjoint step, an adjoint step of the final sweep that also forms parameter gradients, and a
serial layer), split by phase, to say which sweep bounds the critical path; the ratio measured
/ calibrated; and where the rest goes, measured: the critical rank's compute against its own
evaluations priced at the standalone step costs (the excess is our overhead per step, or the
emulator inflating step costs), the emulator's inflation of a step's CPU time measured in the
same world (``step_inflation``: the ranks run serial layer steps in turns round a ring), and the
critical rank's waiting.

The measurement itself is ``xbraid_transformers.app.bench.scaling`` (shared with ``xbt
reproduce``'s scaling experiment); this script chooses the grid and writes the results.

    python benchmarks/scaling.py [--layers 32 64 128 256 512] [--reps 3] [--out DIR]
writes scaling.json, scaling.md and scaling.png (default: benchmarks/results);
    python benchmarks/scaling.py --targets [--rounds 3] [--reps 5]
measures only the target cells, several times (scaling_targets.json and .md);
    python benchmarks/scaling.py --smoke --out DIR
runs 16 layers on 1-4 ranks into DIR (a check that it runs; by default a temporary directory).
"""
import argparse
import os
import statistics
import tempfile
import time

import torch

from xbraid_transformers.app.bench.scaling import (LINKS, Shape, best_rows, configurations, label, make_layers,
                                                   measure_world, step_inflation, unit_costs)
from xbraid_transformers.app.provenance import provenance, write_json, write_markdown
from xbraid_transformers.app.report import figure

SHAPE = Shape(d_model=32, heads=2, ff=64, batch=2, seq=16)
OUT = os.path.join(os.path.dirname(__file__), "results")
TARGETS = {(128, 8): 3.5, (512, 64): 8.0}   # one forward / one backward iteration
MODEL_TARGETS = {(512, 64): 12.0}
TARGET_CELLS = [(128, 8), (512, 32), (512, 64)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64],
                    help="rank counts, each used where P <= N/4")
    ap.add_argument("--extra", nargs="*", default=["512/128"],
                    help="further N/P cells beyond the grid")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--targets", action="store_true",
                    help="only the cells of the targets (and N = 512, P = 32), one forward / one "
                         "backward iteration, both links; writes scaling_targets.json and .md")
    ap.add_argument("--rounds", type=int, default=3,
                    help="with --targets: times every cell is measured, round-robin over the cells")
    ap.add_argument("--out", help="directory of the results (default: benchmarks/results; with --smoke a "
                                  "temporary directory)")
    ap.add_argument("--smoke", action="store_true", help="16 layers on 1, 2 and 4 ranks, one repetition")
    args = ap.parse_args()
    if args.smoke:
        args.layers, args.ranks, args.extra, args.reps, args.rounds = [16], [1, 2, 4], [], 1, 1
    out = args.out or (tempfile.mkdtemp(prefix="scaling-") if args.smoke else OUT)
    facts = provenance()
    torch.set_num_threads(1)
    x = torch.randn(SHAPE.batch, SHAPE.seq, SHAPE.d_model)
    start = time.time()
    if args.targets:
        cells = TARGET_CELLS
    else:
        cells = [(n, p) for n in args.layers for p in args.ranks if p <= n // 4]
        cells += [tuple(int(v) for v in cell.split("/")) for cell in args.extra]
    rows, serial, step_costs, inflation = [], {}, {}, {}
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
                            for c in configs if c["fwd_iters"] == 1 or c["relax"] == "F"]
                world = measure_world(n, p, plan, layers, x, args.reps, units)
                factor = step_inflation(x, p, max(1, n // p), SHAPE) if p > 1 else 1.0
                inflation.setdefault(f"{n}/{p}", []).append(factor)
                for row in world:
                    row["round"] = round_
                    row["step_inflation"] = factor
                serial.setdefault(f"{n}/{p}", []).append(world[0]["serial_s"])
                rows += world
                best = max(world, key=lambda r: r["speedup"])
                print(f"N={n:4d} P={p:3d} {len(world):2d} runs; best {label(best)} "
                      f"{best['link']}: {best['speedup']:5.2f}x (model {best['model_speedup']:5.2f}x, "
                      f"calibrated {best['calibrated_speedup']:5.2f}x) inflation {factor:.2f} "
                      f"[{time.time() - start:.0f} s]", flush=True)
    os.makedirs(out, exist_ok=True)
    meta = dict(d_model=SHAPE.d_model, heads=SHAPE.heads, ff=SHAPE.ff, batch=SHAPE.batch, seq=SHAPE.seq,
                reps=args.reps, emulated=True,
                rounds=args.rounds if args.targets else 1,
                step_costs_s=step_costs, serial_s_per_world=serial, step_inflation=inflation,
                links={k: vars(v) for k, v in LINKS.items()},
                machine=f"{os.cpu_count()} CPUs (shared), torch {torch.__version__}",
                wall_s=time.time() - start)
    name = "scaling_targets" if args.targets else "scaling"
    write_json(os.path.join(out, f"{name}.json"), dict(meta, rows=rows), facts)
    if args.targets:
        write_targets_table(rows, meta, out, facts)
    else:
        write_table(rows, meta, out, facts)
        plot(rows, out)
    print(f"wrote {out}/{name}.*", flush=True)


def _spread(values):
    return f"{statistics.median(values):.2f}x [{min(values):.2f}-{max(values):.2f}]"


def _gap(r) -> str:
    """Where the critical rank's time goes beyond its priced evaluations: our overhead (its
    compute over the priced evaluations, less the emulator's measured inflation) and waiting."""
    compute, priced, wait = r["critical_compute_s"], r["critical_priced_s"], r["critical_wait_s"]
    inflated = priced * r["step_inflation"]
    return (f"{(compute - inflated) / priced:+.0%} | {r['step_inflation'] - 1:+.0%} | "
            f"{wait / (wait + compute):.0%}")


def write_targets_table(rows, meta, out, facts):
    lines = [
        "# Scaling targets: every configuration of the target cells, one forward / one backward "
        "iteration (emulated ranks)",
        "",
        f"Same setting as scaling.md. Every cell measured in {meta['rounds']} rounds (round-robin "
        f"over the cells, so that each samples the machine's load at {meta['rounds']} moments); "
        f"each figure the minimum of {meta['reps']} repetitions; sweep took "
        f"{meta['wall_s'] / 60:.0f} min. Speedups in virtual time: median [min-max] over the rounds; "
        "the NVLink and InfiniBand link models alternate step by step in one emulated world. "
        "`ratio`: measured / calibrated (medians). `overhead`, `inflation`, `wait`, `bound` as in "
        "scaling.md (medians, NVLink).",
        "",
        "| N | P | configuration | NVLink | InfiniBand | model | calibrated | ratio | overhead | inflation "
        "| wait | bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
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
        middle = sorted(nvlink, key=lambda r: r["speedup"])[len(nvlink) // 2]
        speedups = [r["speedup"] for r in nvlink]
        target = TARGETS.get(key[:2]) if key[:2] in TARGETS else None
        mark = f" (target {target:g}x)" if target else ""
        table.append((key[0], key[1], -statistics.median(speedups), (
            f"| {key[0]} | {key[1]} | {label(first)} | {_spread(speedups)}{mark} | "
            f"{_spread(infiniband) if infiniband else '-'} | {first['model_speedup']:.2f}x | "
            f"{statistics.median(r['calibrated_speedup'] for r in nvlink):.2f}x | "
            f"{statistics.median(r['ratio'] for r in nvlink):.2f} | {_gap(middle)} | "
            f"{bound} {phases[bound] / sum(phases.values()):.0%} |")))
    lines += [line for *_, line in sorted(table)]
    write_markdown(os.path.join(out, "scaling_targets.md"), "\n".join(lines), facts)


def _best_table(rows, iters, relax_note):
    best = best_rows(rows, iters)
    infiniband = best_rows(rows, iters, "INFINIBAND")
    lines = [
        "| N | P | best configuration | measured | model | calibrated | ratio | overhead | inflation | wait "
        "| bound | InfiniBand |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(best):
        r = best[key]
        phases = r["calibrated_phases"]
        bound = max(phases, key=phases.get)
        share = phases[bound] / sum(phases.values())
        ib = infiniband.get(key)
        target = TARGETS.get(key) if iters == "1/1" else None
        mark = f" (target {target:g}x)" if target else ""
        model_target = MODEL_TARGETS.get(key) if iters == "1/1" else None
        model_mark = f" (target {model_target:g}x)" if model_target else ""
        lines.append(
            f"| {key[0]} | {key[1]} | {label(r)} | **{r['speedup']:.2f}x**{mark} | "
            f"{r['model_speedup']:.2f}x{model_mark} | {r['calibrated_speedup']:.2f}x | {r['ratio']:.2f} | "
            f"{_gap(r)} | {bound} {share:.0%} | " + (f"{ib['speedup']:.2f}x |" if ib else "- |"))
    return lines


def write_table(rows, meta, out, facts):
    default = {(r["layers"], r["ranks"]): r for r in rows
               if (r["levels"], r["cfactor"], r["relax"], r["iters"], r["link"]) == (2, 4, "F", "2/1", "NVLINK")}
    lines = [
        "# Scaling: virtual-time speedup of one training step (emulated ranks)",
        "",
        f"d_model {meta['d_model']}, batch {meta['batch']} x {meta['seq']} tokens; ranks emulated as "
        f"threads (one torch thread each, CPU-time clocks), so every speedup here is virtual time, "
        f"not a wall clock; minimum of {meta['reps']} repetitions; {meta['machine']}; sweep took "
        f"{meta['wall_s'] / 60:.0f} min. Coarse levels live on the ranks that own their points "
        "(balanced fine blocks; a coarse interval on the rank of its first layer).",
        "",
        "Columns: `measured`: serial / layer-parallel virtual time, the best configuration per "
        "(N, P) over levels 2-4 and cfactor 2/4/8 (skip on). `model`: cost_model (unit: a forward "
        "step; an adjoint step 2). `calibrated`: the same critical path priced with this machine's "
        "measured step costs. `ratio`: measured / calibrated. Where the rest goes, on the critical "
        "rank (the one busiest computing), measured: `overhead`: its compute beyond its own "
        "evaluations priced at the standalone step costs, less the emulator's inflation, as a share "
        "of those priced evaluations (our overhead per step: Python, bookkeeping, messages); "
        "`inflation`: how much the emulator inflates a step's CPU time in this world "
        "(`step_inflation`, ranks taking turns round a ring); `wait`: its share of time spent "
        "waiting (the coarsest chain, F-intervals that run over ranks, and other ranks' overhead). "
        "`bound`: the calibrated phase with the largest share.",
        "",
        "## One forward / one backward iteration (the targets)",
        "",
    ]
    lines += _best_table(rows, "1/1", "")
    lines += [
        "",
        "## Two forward / one backward iterations, F-relaxation (the training defaults)",
        "",
        "Best configuration with the default iterations; the last column is the default "
        "hierarchy itself (2 levels, cfactor 4, F-relaxation, `app/defaults.py`).",
        "",
    ]
    table = _best_table(rows, "2/1", "")
    table[0] = table[0].replace("| InfiniBand |", "| default L2 m4 F 2/1 |")
    for i, key in enumerate(sorted(best_rows(rows, "2/1")), start=2):
        d = default.get(key)
        cell = f"{d['speedup']:.2f}x (model {d['model_speedup']:.2f}x)" if d else "-"
        table[i] = table[i].rsplit("|", 2)[0] + f"| {cell} |"
    lines += table
    lines += ["", "Step costs measured here before each N (ms; `serial`: forward and backward of "
              "one layer through autograd):"]
    lines += [f"- N = {n}: " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in units.items())
              for n, rounds in meta["step_costs_s"].items() for units in rounds]
    lines += ["",
        f"Model counts equal measured counts on every rank in {sum(r['counts_match_model'] for r in rows)} "
        f"of {len(rows)} runs."]
    write_markdown(os.path.join(out, "scaling.md"), "\n".join(lines), facts)


def plot(rows, out):
    ns = sorted({r["layers"] for r in rows})
    with figure(os.path.join(out, "scaling.png"), figsize=(3.6 * len(ns), 3.6), ncols=len(ns),
                squeeze=False) as (fig, axes):
        _draw_scaling(rows, ns, axes)


def _draw_scaling(rows, ns, axes):
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
                ax.plot(ps, [r["calibrated_speedup"] for r in sel], "--", color=color, lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"N = {n} (dotted: model; dashed: calibrated)", fontsize=8)
        ax.set_xlabel("emulated ranks P")
        ax.axhline(1, color="gray", lw=0.5)
    axes[0][0].set_ylabel("virtual-time speedup")
    axes[0][-1].legend(fontsize=7)


if __name__ == "__main__":
    main()
