"""The convergence-factor indicator (the paper's Figs. 4-5): serial, pure layer-parallel and
adaptive training of GPT, BERT and ViT over seeds, and whether the rho > 1 trigger fires as the
layer-parallel loss parts from serial.

Per family and seed three runs of the trainer: ``serial``; ``parallel`` (pure layer-parallel,
probing on the controller's schedule without acting: rho and the gradient trigger's error
estimate over batches); ``adaptive`` (the package's controller switches to serial at the first
probe with rho > 1, the paper's indicator).

Measured: the batch at which the layer-parallel training loss *parts* from serial (the first
batch from which on the relative gap of the two trailing-mean training losses stays above
``part_tol``), the first probe at which rho > 1 in the pure layer-parallel run, the adaptive
run's switch, and every run's final evaluation loss relative to serial's (the exact network on
the same validation batches).
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from typing import List, Optional

from ...control import ControlConfig
from ...mgrit.config import MGRITConfig
from ..tasks import TaskConfig, build_task
from ..trainer import TrainConfig, Trainer, seed_everything
from ..report import figure
from .base import (INCONCLUSIVE, Experiment, Spread, Verdict, answer, combine, fmt, markdown, seed_tolerance,
                   sign, trailing_mean, within)

__all__ = ["RUNS", "GAP_FLOOR", "SETTINGS", "FAMILY_TITLES", "STAND_INS", "micro_text",
           "family_seeds", "run", "parting_batch", "first_probe_above", "analyse", "checks",
           "tables", "plot", "verdict", "EXPERIMENT"]

RUNS = ("serial", "parallel", "adaptive")
GAP_FLOOR = 0.01      # the smallest tolerance on the final-loss gap (relative), whatever the seeds say

# GPT 16 layers deep with a coarsening factor of 4 and BERT with the ODE step of a standard
# transformer (h = 1) and one forward iteration: in both rho grows, and the layer-parallel loss can
# fall behind serial, within the runs (at GPT's previous width of 32 rho crossed 1 at batch 280-460
# of 500; at 16 the losses part by batch 120); ViT at cfactor 4 crossed 1 by batch 150
_GPT = dict(task="gpt", layers=16, d_model=16, heads=2, seq_len=16, batch_size=8, levels=2, cfactor=4,
            relax="F", fwd_iters=2, bwd_iters=1, lr=4e-3, warmup=20)
_BERT = dict(task="bert", layers=8, d_model=16, heads=2, seq_len=16, batch_size=8, levels=2, cfactor=4,
             step_size=1.0, relax="F", fwd_iters=1, bwd_iters=1, lr=1e-2, warmup=20)
_VIT = dict(task="vit", layers=8, d_model=16, heads=2, batch_size=16, levels=2, cfactor=4, relax="F",
            fwd_iters=2, bwd_iters=1, lr=4e-3, warmup=20)
COMMON = dict(threshold=1.0, grad_threshold=0.5, part_tol=0.02, eval_batches=4)
SETTINGS = {
    # no data packages: stand-ins that need none (see `micro_text`)
    "micro": dict(COMMON, seeds=[0, 1], window=4, eval_batches=1, families={
        "gpt": dict(_GPT, layers=4, cfactor=2, steps=16, probe_every=4, warmup=0, lr=3e-3, data="micro-text"),
        "bert": dict(task="synthetic", layers=4, d_model=16, heads=2, seq_len=8, batch_size=8,
                     vocab=8, levels=2, cfactor=2, relax="F", fwd_iters=2, bwd_iters=1, lr=3e-3,
                     warmup=0, steps=16, probe_every=4),
        # one forward iteration: the losses part within the run, so the trigger's timing is judged
        "vit": dict(task="growth", layers=16, d_model=8, batch_size=32, levels=2, cfactor=4,
                    relax="F", fwd_iters=1, bwd_iters=1, lr=3e-2, warmup=0, clip=0.0, steps=120,
                    probe_every=5)}),
    # ViT's seed-to-seed spread is near the effect: 5 seeds
    "quick": dict(COMMON, seeds=[0, 1, 2], window=10, families={
        "gpt": dict(_GPT, steps=200, probe_every=10),
        "bert": dict(_BERT, steps=150, probe_every=10),
        "vit": dict(_VIT, steps=250, probe_every=10, seeds=[0, 1, 2, 3, 4])}),
    "full": dict(COMMON, seeds=[0, 1, 2, 3, 4], window=20, families={
        "gpt": dict(_GPT, steps=400, probe_every=20),
        "bert": dict(_BERT, steps=300, probe_every=20, seeds=[0, 1, 2]),
        "vit": dict(_VIT, steps=400, probe_every=20)}),
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
    names = ("layers", "d_model", "heads", "seq_len", "batch_size", "vocab", "step_size")
    task = TaskConfig(name=f["task"], seed=seed, data_path=data_path,
                      mgrit=MGRITConfig(levels=f["levels"], cfactor=f["cfactor"], relax=f["relax"],
                                        fwd_iters=f["fwd_iters"], bwd_iters=f["bwd_iters"]),
                      **{k: f[k] for k in names if k in f})
    # the parallel run measures both indicators; the adaptive run acts on rho, the paper's
    trigger = "gradient" if run == "parallel" else "rho"
    control = ControlConfig(probe_every=f["probe_every"], threshold=s["threshold"],
                            grad_threshold=s["grad_threshold"], trigger=trigger, action="serial")
    train = TrainConfig(mode=run, monitor=run == "parallel", steps=f["steps"], lr=f["lr"],
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


def family_seeds(s: dict, family: str) -> List[int]:
    """The seeds of a family: its own list where its seed spread needs more, else the common one."""
    return s["families"][family].get("seeds", s["seeds"])


def run(s: dict, progress) -> dict:
    out = {"settings": s, "families": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for family, f in s["families"].items():
            data_path = micro_text(tmp) if f.get("data") == "micro-text" else None
            seeds = {}
            for seed in family_seeds(s, family):
                seeds[str(seed)] = {name: _train(f, s, seed, name, data_path) for name in RUNS}
                progress(f"indicator: {family} seed {seed} done "
                         f"({sum(r['seconds'] for r in seeds[str(seed)].values()):.0f} s)")
            out["families"][family] = {"seeds": seeds}
    out["seeds"] = sorted({int(k) for fam in out["families"].values() for k in fam["seeds"]})
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
    """Per family: per seed the parting batch, the rho and gradient crossings, the rho trigger's
    lateness (batches past one probe interval after the parting; a crossing that never comes
    counts at the run's end), the adaptive switch and the final gaps; over the seeds the gaps'
    spreads and the tolerance serial's own seed spread sets."""
    s = result["settings"]
    out = {}
    for family, fam in result["families"].items():
        f = s["families"][family]
        rows, serial_final = [], []
        for seed, runs in fam["seeds"].items():
            serial, parallel = runs["serial"], runs["parallel"]
            serial_final.append(serial["final_eval_loss"])
            parts = parting_batch(serial["loss"], parallel["loss"], s["window"], s["part_tol"])
            rho_cross = first_probe_above(parallel["probes"], "rho", s["threshold"])
            rows.append({"seed": int(seed), "parts": parts, "rho_crosses": rho_cross,
                         "grad_crosses": first_probe_above(parallel["probes"], "grad_error",
                                                           s["grad_threshold"]),
                         "lateness": None if parts is None else
                         (f["steps"] if rho_cross is None else rho_cross) - parts - f["probe_every"],
                         "switch": runs["adaptive"]["switch_step"],
                         "gap_parallel": _gap(parallel, serial), "gap_adaptive": _gap(runs["adaptive"], serial)})
        finite = [v for v in serial_final if v is not None]
        scale = sum(finite) / len(finite) if finite else math.nan
        out[family] = {"rows": rows, "probe_every": f["probe_every"],
                       "tolerance": seed_tolerance([v / scale for v in finite], GAP_FLOOR),
                       "parted": sum(r["parts"] is not None for r in rows),
                       **{k: Spread.of(r[k] for r in rows) for k in ("gap_parallel", "gap_adaptive")}}
    return out


def checks(result: dict) -> dict:
    """Per family: does the adaptive run end at serial's loss (``within`` serial's seed
    tolerance), and does rho exceed 1 by one probe interval after the losses part (the lateness,
    over the seeds whose losses part, below 0)? Each is None (not measurable) for a family whose
    losses never part: then pure layer-parallel already matches serial and neither claim is tested."""
    out = {}
    for family, a in analyse(result).items():
        lateness = [r["lateness"] for r in a["rows"] if r["lateness"] is not None]
        late = sign(lateness)
        diverged = any(not math.isfinite(r["gap_adaptive"]) for r in a["rows"])
        out[family] = {"reaches": None if not a["parted"] else
                       False if diverged else within([r["gap_adaptive"] for r in a["rows"]], a["tolerance"]),
                       "timely": None if not a["parted"] else late if late == INCONCLUSIVE else not late}
    return out


# ---------------------------------------------------------------------------- the report
def _describe(family: str, f: dict, s: dict) -> str:
    if f["task"] in STAND_INS:
        what = f"stand-in: {STAND_INS[f['task']]}"
    elif f.get("data") == "micro-text":
        what = "GPT on a small generated text file (stand-in for Shakespeare: no data package)"
    else:
        what = {"gpt": "GPT on Shakespeare characters", "bert": "BERT masked LM on IMDB",
                "vit": "ViT on Fashion-MNIST (MNIST-5k when absent)"}[f["task"]]
    size = ", ".join(f"{k} {f[k]}" for k in ("layers", "d_model", "step_size", "steps", "probe_every", "lr")
                     if k in f)
    return (f"- {FAMILY_TITLES[family]}: {what}; {size}; MGRIT {f['levels']} levels, cfactor "
            f"{f['cfactor']}, {f['relax']}-relaxation, {f['fwd_iters']} forward / {f['bwd_iters']} "
            f"backward iterations; seeds {family_seeds(s, family)}")


def tables(result: dict) -> str:
    s = result["settings"]
    analysis = analyse(result)
    rows = [[FAMILY_TITLES[family], r["seed"], r["parts"], r["rho_crosses"], r["grad_crosses"],
             r["lateness"], r["switch"], r["gap_parallel"], r["gap_adaptive"]]
            for family, a in analysis.items() for r in a["rows"]]
    means = [[FAMILY_TITLES[family], str(a["gap_parallel"]), str(a["gap_adaptive"]), a["tolerance"],
              f"{a['parted']} of {len(a['rows'])}"] for family, a in analysis.items()]
    return "\n\n".join([
        f"Per family and seed: serial, pure layer-parallel (probing without acting) and adaptive "
        f"(the controller switches to serial at the first probe with rho > {s['threshold']:g}). "
        f"The losses *part* at the first batch from which on the {s['window']}-batch trailing-mean "
        f"training loss of the layer-parallel run stays more than {100 * s['part_tol']:g}% above "
        f"serial's; the rho trigger's *lateness* is the batch where rho first exceeds 1 (the run's "
        f"end if never) minus the parting batch minus one probe interval (> 0: late). The gradient "
        f"trigger's crossing (relative gradient error > {s['grad_threshold']:g}) is reported, not "
        f"judged. Gaps: final evaluation loss relative to serial's. Regime: deep stacks, a coarsening "
        f"factor of 4 where it fits, a large ODE step h and few MGRIT iterations, with learning rates "
        f"that grow the weights fast, so that rho approaches 1 within the run and pure layer-parallel "
        f"training can fall behind serial: where it never does, neither claim is tested.",
        "\n".join(_describe(family, f, s) for family, f in s["families"].items()),
        markdown(["family", "seed", "losses part", "rho > 1 (probe)", "grad error > thr (probe)",
                  "lateness", "switch (adaptive)", "gap parallel", "gap adaptive"], rows),
        "Over the seeds (mean [95% interval]); the tolerance is twice serial's seed standard "
        f"deviation of the final loss (relative), at least {100 * GAP_FLOOR:g}%:\n\n"
        + markdown(["family", "gap parallel", "gap adaptive", "tolerance", "losses parted"], means)])


def plot(result: dict, path: str) -> None:
    s = result["settings"]
    families = list(result["families"])
    colors = dict(zip(RUNS, ("black", "tab:red", "tab:blue")))
    with figure(path, dpi=80, nrows=2, ncols=len(families), figsize=(4.2 * len(families), 6.4),
                squeeze=False) as (fig, axes):
        for col, family in enumerate(families):
            top, bottom = axes[0][col], axes[1][col]
            for i, (seed, runs) in enumerate(result["families"][family]["seeds"].items()):
                gap = [p - q for p, q in zip(trailing_mean(runs["parallel"]["loss"], s["window"]),
                                             trailing_mean(runs["serial"]["loss"], s["window"]))]
                top.plot(gap, color=f"C{i}", lw=1, label=f"seed {seed}")
                if runs["adaptive"]["switch_step"] is not None:
                    top.axvline(runs["adaptive"]["switch_step"], color=f"C{i}", ls="--", lw=0.8)
                probes = runs["parallel"]["probes"]
                bottom.plot([p["step"] for p in probes], [p["rho"] for p in probes], "o-", color=f"C{i}",
                            ms=2, lw=1, label=f"seed {seed}")
            top.axhline(0, color=colors["serial"], lw=0.8)
            top.set_title(FAMILY_TITLES[family])
            top.set_ylabel("parallel - serial training loss\n(trailing mean; --: switch)")
            bottom.axhline(s["threshold"], color="k", lw=0.8)
            bottom.set_xlabel("batch")
            bottom.set_ylabel("rho (pure layer-parallel run)")
            top.legend(fontsize=6)


def verdict(result: dict) -> Verdict:
    c = checks(result)
    analysis = analyse(result)
    measured = [v for fam in c.values() for v in fam.values() if v is not None] or [None]
    evidence = "; ".join(
        f"{FAMILY_TITLES[family]}: adaptive gap {a['gap_adaptive']} vs parallel {a['gap_parallel']} "
        f"(tol {fmt(a['tolerance'])}: {answer(c[family]['reaches'])}); losses part at "
        f"{[r['parts'] for r in a['rows']]}, rho > 1 at {[r['rho_crosses'] for r in a['rows']]}, "
        f"lateness {[r['lateness'] for r in a['rows']]} (on time: {answer(c[family]['timely'])}); "
        f"gradient error > {result['settings']['grad_threshold']:g} at "
        f"{[r['grad_crosses'] for r in a['rows']]}"
        for family, a in analysis.items())
    return Verdict(combine(measured),
                   f"per family, over its seeds, judged only where the pure layer-parallel loss parts "
                   f"from serial's in some seed (else not measurable: nothing to remedy): the adaptive "
                   f"run (switch to serial at rho > 1) reaches serial when the 95% interval of its mean "
                   f"final-loss gap lies within +-tol, tol = max({100 * GAP_FLOOR:g}%, 2 x serial's seed "
                   f"standard deviation), fails when it lies wholly outside (or a run diverged); "
                   f"rho rises in time when the mean lateness over the seeds whose losses part is below 0 "
                   f"(95% interval), late when above; anything else within the noise. Confirmed when "
                   f"every measurable check holds, contradicted when one fails, inconclusive when one "
                   f"is within the noise, not measurable when no family's losses part",
                   evidence,
                   "; ".join(f"{FAMILY_TITLES[f]}: adaptive - serial {a['gap_adaptive']} (tol "
                             f"{fmt(a['tolerance'])}), parted in {a['parted']} of {len(a['rows'])}, "
                             f"on time {answer(c[f]['timely'])}" for f, a in analysis.items()))


EXPERIMENT = Experiment(
    name="indicator", title="The convergence-factor indicator (Figs. 4-5)",
    claim="Layer-parallel paper, Figs. 4-5: for BERT, GPT and ViT, pure layer-parallel training "
          "with few MGRIT iterations eventually trails serial training; the convergence factor "
          "rho, probed every few hundred batches, rises with training as the layer-parallel loss "
          "parts from serial, and switching to serial when rho > 1 (the indicator) gives the "
          "serial loss.",
    paper="switching at rho > 1 recovers the serial loss (BERT, GPT, ViT), rho rising as the losses part",
    settings=SETTINGS, run=run, tables=tables, plot=plot, verdict=verdict)
