"""Virtual-time speedup of layer-parallel training against depth, ranks, levels and coarsening
factor, and layer x data parallelism at a fixed number of ranks.

Ranks are emulated as threads with virtual clocks (``app.bench.scaling``, NVLink-class link
model), as in ``benchmarks/scaling.py``. The emulated communicator is one flat world without
sub-groups (``distributed.layer_data_groups`` needs torch.distributed), so each data degree d of
P ranks is measured as a layer-parallel step on P/d ranks with batch B/d, plus the all-reduce of
one rank's gradients over d ranks priced by the same communicator and link model.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..bench.scaling import (TRAINING_ITERS, Shape, allreduce_time, configurations, label, make_layers,
                             measure_world, serial_step_time, training_iterations, unit_costs)
from ...core.blocks import encoder_rhs
from ...core.layer_parallel import LayerParallel
from ..report import figure
from .base import Experiment, Verdict, answers, combine, fmt, markdown, one_thread

__all__ = ["EXPERIMENT", "SETTINGS", "run", "rank_correlation", "rises", "interior_minimum", "tables", "plot",
           "verdict"]

COMMON = dict(d_model=32, heads=2, ff=64, seq=16, batch=2, seed=0, link="NVLINK", series_levels=[2, 3],
              cfactors=[2, 4, 8], rise=1.2, rank_correlation=0.5, interior_margin=0.05)
SETTINGS = {
    "micro": dict(COMMON, depths=[8, 16], depth_ranks=2, ranks=[1, 2, 4], ranks_layers=16,
                  grid=[16, 2], grid_levels=[2, 3], cfactors=[2, 4], reps=1, unit_layers=8, unit_reps=2,
                  data=dict(layers=16, ranks=4, batch=4, seq=16)),
    "quick": dict(COMMON, depths=[32, 64, 128], depth_ranks=8, ranks=[1, 2, 4, 8, 16], ranks_layers=128,
                  grid=[128, 8], grid_levels=[2, 3, 4], reps=2, unit_layers=32, unit_reps=3,
                  data=dict(layers=64, ranks=16, batch=32, seq=64)),
    "full": dict(COMMON, depths=[32, 64, 128, 256, 512], depth_ranks=8, ranks=[1, 2, 4, 8, 16, 32],
                 ranks_layers=512, grid=[512, 16], grid_levels=[2, 3, 4], reps=2, unit_layers=32, unit_reps=5,
                 data=dict(layers=128, ranks=16, batch=32, seq=64)),
}


def _shape(s, batch=None, seq=None) -> Shape:
    return Shape(d_model=s["d_model"], heads=s["heads"], ff=s["ff"], batch=batch or s["batch"], seq=seq or s["seq"])


def _plan(n, p, levels, s):
    """One forward / one backward iteration (F and FCF coincide), the link of the settings."""
    plan = [(c, [s["link"]]) for c in configurations(n, p, levels, s["cfactors"], ((1, 1),))]
    if not plan:
        raise ValueError(f"no hierarchy of levels {levels} and cfactors {s['cfactors']} fits {n} "
                         f"layers on {p} ranks (at most one rank per layer)")
    return plan


def _compact(row) -> dict:
    keep = ("layers", "ranks", "levels", "cfactor", "serial_s", "parallel_s", "speedup", "model_speedup",
            "calibrated_speedup", "counts_match_model")
    return {k: row[k] for k in keep} | {"config": label(row)}


def _speedup_worlds(s, progress) -> dict:
    """Every (N, P) of the depth series, the rank series and the levels x cfactor grid, each
    measured once in its own emulated world."""
    shape = _shape(s)
    x = shape.input(s["seed"])
    grid = tuple(s["grid"])
    cells = {(n, s["depth_ranks"]) for n in s["depths"]} | {(s["ranks_layers"], p) for p in s["ranks"]}
    cells.add(grid)
    units = unit_costs(x, shape, s["unit_reps"], s["unit_layers"])
    worlds = {}
    for n in sorted({n for n, _ in cells}):
        layers = make_layers(n, shape)
        for p in sorted(p for m, p in cells if m == n):
            levels = s["grid_levels"] if (n, p) == grid else s["series_levels"]
            rows = measure_world(n, p, _plan(n, p, levels, s), layers, x, s["reps"], units)
            worlds[f"{n}/{p}"] = [_compact(r) for r in rows]
            progress(f"scaling: N={n} P={p}: {len(rows)} configurations")
    return worlds


def _data_parallel(s, progress) -> list:
    """Time per batch of d data groups x P/d layer ranks, for every power of two d <= P."""
    n, p, batch, seq = (s["data"][k] for k in ("layers", "ranks", "batch", "seq"))
    layers = make_layers(n, _shape(s))
    params_per_layer = sum(q.numel() for q in layers[0].parameters())
    out, serial_full_batch = [], None
    for d in (2 ** i for i in range(p.bit_length())):      # p is a power of two
        q, shape = p // d, _shape(s, batch // d, seq)
        x = shape.input(s["seed"])
        if q == 1:      # a one-rank layer group runs the serial network
            serial = LayerParallel(layers, rhs=encoder_rhs).serial()
            step = min(serial_step_time(serial, x) for _ in range(s["reps"] + 1))
            config, counts_match = "serial", None
        else:
            units = unit_costs(x, shape, s["unit_reps"], s["unit_layers"])
            rows = measure_world(n, q, _plan(n, q, s["series_levels"], s), layers, x, s["reps"], units)
            best = min(rows, key=lambda r: r["parallel_s"])
            step, config, counts_match = best["parallel_s"], label(best), all(r["counts_match_model"] for r in rows)
            serial_full_batch = serial_full_batch or best["serial_s"]      # d = 1 comes first
        gradients = params_per_layer * (n // q)          # the largest rank's block
        reduce = allreduce_time(gradients, d, s["link"])
        out.append(dict(data=d, layer=q, batch=batch // d, config=config, step_s=step, allreduce_s=reduce,
                        time_s=step + reduce, gradients=gradients, counts_match_model=counts_match))
        progress(f"scaling: data {d} x layer {q}: {1e3 * (step + reduce):.1f} ms per batch")
    for row in out:
        row["serial_full_batch_s"] = serial_full_batch
    return out


def run(s: dict, progress) -> dict:
    data = s["data"]
    if data["ranks"] & (data["ranks"] - 1) or data["batch"] % data["ranks"]:
        raise ValueError(f"the layer x data split needs a power-of-two number of ranks that divides the "
                         f"batch; got {data['ranks']} ranks and batch {data['batch']}")
    # timing, not training: no seeds; each time is the least of ``reps`` repetitions after a warm-up.
    # One torch thread, as each emulated rank has: under load a second one inflates thread CPU time
    with one_thread():
        return {"settings": s, "seeds": [], "repetitions": s["reps"], "worlds": _speedup_worlds(s, progress),
                "data_parallel": _data_parallel(s, progress), "training_iterations": training_iterations()}


# ---------------------------------------------------------------------------- the analysis
def _series(result, by_depth: bool):
    """The best row at each depth (P fixed) or at each rank count (N fixed)."""
    s = result["settings"]
    cells = [(n, s["depth_ranks"]) for n in s["depths"]] if by_depth else [(s["ranks_layers"], p) for p in s["ranks"]]
    return [max((r for r in result["worlds"][f"{n}/{p}"] if r["levels"] in s["series_levels"]),
                key=lambda r: r["speedup"]) for n, p in cells]


def rank_correlation(xs, ys) -> float:
    """Spearman's rank correlation: Pearson's of the ranks (no ties among measured times)."""
    rx, ry = (np.argsort(np.argsort(v)) for v in (xs, ys))
    return float(np.corrcoef(rx, ry)[0, 1])


def rises(xs, ys, s) -> Optional[bool]:
    """The last speedup at least ``rise`` times the first, and the rank correlation with x at
    least ``rank_correlation`` (one dip from noise allowed, a falling trend not)."""
    if len(xs) < 2:
        return None
    return ys[-1] >= s["rise"] * ys[0] and rank_correlation(xs, ys) >= s["rank_correlation"]


def interior_minimum(data, s) -> Optional[bool]:
    """The data degree of the least time per batch lies strictly between 1 and P, and that time
    is at least ``interior_margin`` below both ends."""
    if len(data) < 3:
        return None
    times = [r["time_s"] for r in data]
    i = min(range(len(times)), key=times.__getitem__)
    return 0 < i < len(times) - 1 and times[i] <= (1 - s["interior_margin"]) * min(times[0], times[-1])


def _checks(result):
    s = result["settings"]
    depth, ranks = _series(result, True), _series(result, False)
    return {"speedup rises with depth": rises(s["depths"], [r["speedup"] for r in depth], s),
            "speedup rises with ranks": rises(s["ranks"], [r["speedup"] for r in ranks], s),
            "time per batch has an interior minimum in d": interior_minimum(result["data_parallel"], s)}


def _series_table(rows, key):
    return markdown([key, "best configuration", "serial (ms)", "parallel (ms)", "emulated speedup", "cost model",
                     "calibrated"],
                    [[r["layers" if key == "N" else "ranks"], r["config"], 1e3 * r["serial_s"], 1e3 * r["parallel_s"],
                      r["speedup"], r["model_speedup"], r["calibrated_speedup"]] for r in rows])


def tables(result: dict) -> str:
    s = result["settings"]
    n, p = s["grid"]
    grid = {(r["levels"], r["cfactor"]): r for r in result["worlds"][f"{n}/{p}"]}
    grid_rows = [[f"{levels} levels", *[f"{fmt(grid[(levels, m)]['speedup'])} "
                                        f"({fmt(grid[(levels, m)]['model_speedup'])})"
                                        if (levels, m) in grid else "-" for m in s["cfactors"]]]
                 for levels in s["grid_levels"]]
    runs, data, dp = [r for rows in result["worlds"].values() for r in rows], result["data_parallel"], s["data"]
    return "\n\n".join([
        f"Encoder layers d_model {s['d_model']} ({s['heads']} heads, FF {s['ff']}), batch {s['batch']} x "
        f"{s['seq']} tokens; emulated ranks (threads, one torch thread each, CPU-time clocks, "
        f"{s['link']} link model); one forward / one backward MGRIT iteration, skip of the first "
        f"down-cycle; each time the minimum of {s['reps']} repetitions after a warm-up; best over "
        f"levels {s['series_levels']} x cfactor {s['cfactors']}. `cost model`: step counts (a forward "
        f"step 1, an adjoint step 2); `calibrated`: the same critical path priced with this machine's "
        f"measured step costs. Cost-model counts equal the measured counts on every rank in "
        f"{sum(r['counts_match_model'] for r in runs)} of {len(runs)} runs. Every speedup here is emulated "
        f"(virtual time of threads on this CPU), none a GPU's; no training seeds: timing, the least of "
        f"{result['repetitions']} repetitions.",
        f"Emulated speedup vs depth N at P = {s['depth_ranks']} (Fig. 6):",
        _series_table(_series(result, True), "N"),
        f"Emulated speedup vs ranks P at N = {s['ranks_layers']} (Fig. 7):",
        _series_table(_series(result, False), "P"),
        f"Emulated speedup vs levels and cfactor at N = {n}, P = {p} (Fig. 8; cost model in brackets):",
        markdown(["", *[f"cfactor {m}" for m in s["cfactors"]]], grid_rows),
        f"Layer x data parallel on P = {dp['ranks']} ranks, N = {dp['layers']}, global batch {dp['batch']} x "
        f"{dp['seq']} tokens (Fig. 9): d data groups of P/d layer ranks; each group a layer-parallel step (best "
        f"configuration; the serial network when P/d = 1) on batch {dp['batch']}/d, then the "
        f"all-reduce of the largest rank's gradients over d ranks priced by the same link model "
        f"(the emulated communicator forms no sub-groups). Longer sequences than above, so that a "
        f"group's step shrinks with its batch as a device's does once it is busy (at 16 tokens a "
        f"batch of 2 costs this CPU nearly as much as one of 16). Serial step of the whole batch on one rank: "
        f"{fmt(1e3 * data[0]['serial_full_batch_s'])} ms.",
        markdown(["d", "P/d", "batch per group", "configuration", "step (ms)", "all-reduce (ms)",
                  "time per batch (ms)", "emulated speedup vs one rank"],
                 [[r["data"], r["layer"], r["batch"], r["config"], 1e3 * r["step_s"], 1e3 * r["allreduce_s"],
                   1e3 * r["time_s"], r["serial_full_batch_s"] / r["time_s"]] for r in data]),
        _training_table(result["training_iterations"]),
    ])


def _training_table(cited: dict) -> str:
    commit = (cited.get("provenance") or {}).get("commit", "unknown")
    head = (f"Emulated speedups at the iteration counts training uses ({TRAINING_ITERS} forward / backward "
            f"iterations, F-relaxation), cited from the scaling study's re-run (`{cited['source']}` and "
            f"`scaling.md`, commit `{commit}`), not measured again")
    return head + (": the file was not found when this ran." if not cited["rows"] else
                   "; best over levels 2-4 and cfactor 2/4/8, and the default hierarchy:\n\n"
                   + markdown(["N", "P", "best configuration", "emulated speedup", "cost model", "default L2 m4 F"],
                              [[r["layers"], r["ranks"], r["config"], r["speedup"], r["model_speedup"],
                                r["default_speedup"]] for r in cited["rows"]]))


def plot(result: dict, path: str) -> None:
    s = result["settings"]
    (n, p), data = s["grid"], result["data_parallel"]
    with figure(path, dpi=90, ncols=4, figsize=(15, 3.6)) as (fig, axes):
        for ax, rows, xs in ((axes[0], _series(result, True), s["depths"]),
                             (axes[1], _series(result, False), s["ranks"])):
            ax.plot(xs, [r["speedup"] for r in rows], "o-", label="measured (emulated)")
            ax.plot(xs, [r["model_speedup"] for r in rows], ":", label="cost model")
        for levels in s["grid_levels"]:
            rows = sorted((r for r in result["worlds"][f"{n}/{p}"] if r["levels"] == levels),
                          key=lambda r: r["cfactor"])
            axes[2].plot([r["cfactor"] for r in rows], [r["speedup"] for r in rows], "o-", label=f"{levels} levels")
        axes[3].plot([r["data"] for r in data], [1e3 * r["time_s"] for r in data], "o-", label="time per batch")
        axes[3].plot([r["data"] for r in data], [1e3 * r["allreduce_s"] for r in data], "s:", label="all-reduce")
        for ax, x, y in zip(axes, (f"depth N (P = {s['depth_ranks']})", f"ranks P (N = {s['ranks_layers']})",
                                   f"cfactor (N = {n}, P = {p})", f"data degree d (P = {s['data']['ranks']})"),
                            ("emulated speedup",) * 3 + ("virtual ms",)):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x)
            ax.set_ylabel(y)
            ax.legend(fontsize=7)


def verdict(result: dict) -> Verdict:
    s = result["settings"]
    checks = _checks(result)
    depth, ranks = _series(result, True), _series(result, False)
    data = result["data_parallel"]
    return Verdict(
        combine(checks.values()),
        f"confirmed when all hold: at P = {s['depth_ranks']} the best emulated speedup at the largest depth is "
        f"at least {s['rise']}x that at the smallest and its rank correlation with depth is at least "
        f"{s['rank_correlation']}; the same for the speedup against P at N = {s['ranks_layers']}; and the "
        f"least time per batch over the data degrees d of P = {s['data']['ranks']} ranks lies at an "
        f"interior d, at least {s['interior_margin']:.0%} below both d = 1 and d = P. Levels and cfactor "
        f"are reported, not judged",
        "emulated speedup vs N " + ", ".join(f"{r['layers']}: {fmt(r['speedup'])}x" for r in depth)
        + "; vs P " + ", ".join(f"{r['ranks']}: {fmt(r['speedup'])}x" for r in ranks)
        + "; time per batch vs d " + ", ".join(f"{r['data']}: {fmt(1e3 * r['time_s'])} ms" for r in data)
        + "; " + answers(checks),
        f"emulated speedup {fmt(depth[0]['speedup'])}x -> {fmt(depth[-1]['speedup'])}x for N {s['depths'][0]} -> "
        f"{s['depths'][-1]} (P = {s['depth_ranks']}), {fmt(ranks[0]['speedup'])}x -> "
        f"{fmt(ranks[-1]['speedup'])}x for P {s['ranks'][0]} -> {s['ranks'][-1]} (N = {s['ranks_layers']}); "
        f"time per batch least at d = {min(data, key=lambda r: r['time_s'])['data']} of "
        f"{', '.join(str(r['data']) for r in data)}")


EXPERIMENT = Experiment(
    name="scaling", title="Scaling: emulated speedup vs depth, ranks, levels, cfactor; layer x data parallel",
    claim="Layer-parallel paper, Figs. 6-8: the speedup of layer-parallel training over serial "
          "training grows with the network's depth (32 to 256 layers), with the number of GPUs, "
          "and with the MGRIT levels and coarsening factor, reaching roughly 3x on 8 GPUs for deep "
          "encoders, while two-GPU runs of small models are slower than serial; Fig. 9: combining "
          "layer and data parallelism at a fixed number of GPUs, the time per batch is parabolic in "
          "the data-parallel degree, least at an intermediate split.",
    paper="speedup grows with depth and GPUs, ~3x on 8 GPUs; time per batch parabolic in the data degree",
    settings=SETTINGS, run=run, tables=tables, plot=plot, verdict=verdict)
