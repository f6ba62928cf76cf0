"""Multilevel training in depth (the multilevel paper): FLOPs to the single-level loss for the
paper's (even, odd, fine) V-cycle and for nested iteration (N/4 -> N/2 -> N, our own scheme)
against single-level training of a 12-layer GPT, under SGD with momentum (the paper's optimizer)
and AdamW, over seeds. The measurement is ``app.bench.multilevel`` (also ``benchmarks/multilevel.py``'s).
Each scheme and optimizer keeps the learning rate of the grid with the lowest final validation loss
on a tuning seed that is not judged; every judged seed then trains each scheme at its rate from the
same initial model on the same batches. A seed's target is its single-level final validation loss.
"""
from __future__ import annotations

import math

from ...data.sources import DataSourceMissing
from ..bench.multilevel import FAMILIES, schedules, to_target, train_curve, view_flops
from ..report import figure
from .base import (CONFIRMED, CONTRADICTED, INCONCLUSIVE, NOT_MEASURABLE, Experiment, Spread, Verdict, fmt,
                   markdown, one_thread)

__all__ = ["EXPERIMENT", "SETTINGS", "SINGLE", "NESTED", "V_CYCLE", "PAPER_SAVING", "run", "savings", "lateness",
           "check", "tables", "plot", "verdict"]

SINGLE, NESTED, V_CYCLE = "single-level", "nested N/4->N/2->N", "v-cycle"
PAPER_SAVING = 0.44            # the paper: 44 % fewer FLOPs to the same training loss
JUDGED = "sgd"                 # the paper's optimizer; AdamW is reported beside it
LATE_SHARE = 0.2               # late target: single-level's last quarter made at most this share of the drop

COMMON = dict(optimizers=["sgd", "adamw"], clip=1.0, schedules=[NESTED, V_CYCLE], tune_seed=100,
              lrs=dict(sgd=[0.3, 1.0, 3.0], adamw=[1e-3, 3e-3, 1e-2]))
SETTINGS = {
    # synthetic motif text: no data package, a few seconds
    "micro": dict(COMMON, seeds=[0, 1], steps=8, phase=4, eval_every=4, family=dict(
        source="synthetic", vocab_size=32, d_model=16, heads=2, layers=4, block=16, batch=8, val_batches=2)),
    "quick": dict(COMMON, seeds=[0, 1, 2], steps=60, phase=10, eval_every=10, family=dict(
        d_model=32, heads=4, layers=8, block=32, batch=16, val_batches=4)),
    # the paper's depth at width 32; 300 steps put the target late (at 200 the last quarter made 24%)
    "full": dict(COMMON, seeds=[0, 1, 2, 3, 4], steps=300, phase=25, eval_every=25, family=dict(
        d_model=32, heads=4, layers=12, block=32, batch=16, val_batches=4)),
}


def _family(s: dict):
    """The GPT family, on synthetic text when Shakespeare is missing (the result says so)."""
    try:
        return FAMILIES["gpt"](**s["family"])
    except (DataSourceMissing, ImportError) as error:
        family = FAMILIES["gpt"](**dict(s["family"], source="synthetic"))
        family.data += f" (Shakespeare missing: {str(error).splitlines()[0]})"
        return family


def run(s: dict, progress) -> dict:
    with one_thread():
        return _measure(s, progress)


def _measure(s: dict, progress) -> dict:
    family = _family(s)
    flops_of = view_flops(family.make(0), family.train_batch(0))
    chosen = {name: schedules(s["steps"], s["phase"])[name] for name in (SINGLE, *s["schedules"])}
    tuning, lrs, curves = {}, {}, {}
    for opt in s["optimizers"]:
        tuning[opt], lrs[opt], curves[opt] = {}, {}, {}
        for name, schedule in chosen.items():
            def curve(seed, lr):
                return [list(p) for p in train_curve(family, opt, lr, schedule, seed, flops_of, s["eval_every"],
                                                     s["clip"])]
            tuning[opt][name] = {str(lr): curve(s["tune_seed"], lr)[-1][2] for lr in s["lrs"][opt]}
            lrs[opt][name] = min(s["lrs"][opt], key=lambda lr: math.inf if math.isnan(  # diverged: last
                tuning[opt][name][str(lr)]) else tuning[opt][name][str(lr)])
            curves[opt][name] = {str(seed): curve(seed, lrs[opt][name]) for seed in s["seeds"]}
            progress(f"multilevel: {opt} {name} done (lr {lrs[opt][name]:g})")
    return {"settings": s, "seeds": list(s["seeds"]), "data": family.data, "tuning": tuning, "lrs": lrs,
            "curves": curves, "flops_per_step": {k if isinstance(k, str) else f"{k[0]}:{k[1]}": v
                                                 for k, v in flops_of.items()}}


# ---------------------------------------------------------------------------- the analysis
def savings(result: dict, opt: str, name: str, key: int = 0) -> list:
    """Per seed: (saving, reached), saving = 1 - (multilevel / single-level) FLOPs (``key`` 0) or
    seconds (1) to the seed's target, its single-level run's final validation loss. A run that
    never reaches it gives the saving it would have at its last evaluation: an upper bound."""
    out = []
    for seed, single in result["curves"][opt][SINGLE].items():
        target = single[-1][2]
        base, ours = to_target(single, target)[key], result["curves"][opt][name][seed]
        cost = to_target(ours, target)[key]
        out.append((1 - (ours[-1][key] if cost is None else cost) / base, cost is not None))
    return out


def lateness(result: dict, opt: str = JUDGED) -> float:
    """The share of single-level training's validation-loss drop after its first quarter of steps
    that its last quarter made (seeds' curves averaged; the evaluations at or before a quarter and
    three quarters of its FLOPs): a straight line gives 1/3, a flattened curve much less."""
    curves = list(result["curves"][opt][SINGLE].values())
    mean = [sum(c[i][2] for c in curves) / len(curves) for i in range(len(curves[0]))]
    first, last = (mean[max(i for i, p in enumerate(curves[0]) if p[0] <= share * curves[0][-1][0])]
                   for share in (0.25, 0.75))
    return (last - mean[-1]) / (first - mean[-1]) if first > mean[-1] else math.nan


def check(result: dict):
    """The paper's scheme under SGD: None (not measurable) when single-level training did not
    lower the loss or its target is not late; True when the interval of the V-cycle's saving
    reaches 44% and excludes 0 with every seed reaching the target; False when it lies below 44%."""
    late = lateness(result)
    if not late <= LATE_SHARE:
        return None
    values = savings(result, JUDGED, V_CYCLE)
    spread = Spread.of(v for v, _ in values)
    if spread.high < PAPER_SAVING - 1e-9:      # rounding of FLOP ratios is no shortfall
        return False
    return True if spread.low > 0 and all(r for _, r in values) else INCONCLUSIVE


def _spread(values) -> str:
    unreached = sum(not r for _, r in values)
    return (f"{Spread.of(100 * v for v, _ in values)}%"
            + (f" ({unreached} seed(s) never reached: upper bounds)" if unreached else ""))


def tables(result: dict) -> str:
    s = result["settings"]
    size = ", ".join(f"{k}={v}" for k, v in s["family"].items())
    tuning = [[opt, name, *[fmt(v) + (" *" if float(lr) == result["lrs"][opt][name] else "")
                            for lr, v in rows.items()]]
              for opt, by_name in result["tuning"].items() for name, rows in by_name.items()]
    rows = []
    for opt, by_name in result["curves"].items():
        for name in by_name:
            if name == SINGLE:
                continue
            flops = savings(result, opt, name)
            rows.append([opt, name, result["lrs"][opt][name], ", ".join(f"{100 * v:+.0f}%" + ("" if r else " (no)")
                                                                        for v, r in flops),
                         _spread(flops), _spread(savings(result, opt, name, key=1)),
                         f"{100 * PAPER_SAVING:.0f}%" if name == V_CYCLE and opt == JUDGED else "-"])
    return (f"GPT ({size}; benchmark and paper sizes differ: the paper's decoder is 12 layers of width 256); "
            f"data: {result['data']}. Single-level {s['steps']} steps, multilevel about {2 * s['steps']} "
            f"(phases of {s['phase']} steps; the V-cycle: even, odd, fine; nested: a third of them on every 4th "
            f"layer, then every 2nd, then all, copy prolongation), gradients clipped to {s['clip']}, validation "
            f"every {s['eval_every']} steps and at phase ends. Learning rates: each scheme and optimizer tries "
            f"the grid on tuning seed {s['tune_seed']} and keeps the lowest final validation loss (*):\n\n"
            + markdown(["optimizer", "schedule", *[f"lr {i + 1}" for i in range(len(s['lrs']['sgd']))]], tuning)
            + "\n\nGrids: " + "; ".join(f"{opt} {lrs}" for opt, lrs in s["lrs"].items())
            + f". Seeds {result['seeds']}: each seed's target is its own single-level run's final validation "
            f"loss; the last quarter of SGD single-level training made {fmt(100 * lateness(result))}% of its "
            f"loss drop after the first quarter (the target is late, where training has flattened, at "
            f"{100 * LATE_SHARE:.0f}% or less; a straight line makes 33%). Saving = 1 - multilevel / single-level "
            f"FLOPs (or seconds) to the target, per seed and as mean [95% interval] over seeds; nested "
            f"iteration is our own scheme, not the paper's:\n\n"
            + markdown(["optimizer", "schedule", "lr", "FLOP saving per seed", "FLOP saving", "time saving",
                        "paper"], rows))


def plot(result: dict, path: str) -> None:
    curves = result["curves"]
    with figure(path, dpi=80, figsize=(4.5 * len(curves), 3.8), ncols=len(curves), squeeze=False) as (fig, axes):
        for ax, (opt, by_name) in zip(axes[0], curves.items()):
            for colour, (name, runs) in zip(("black", "tab:blue", "tab:orange"), by_name.items()):
                for i, curve in enumerate(runs.values()):
                    ax.plot([p[0] / 1e9 for p in curve], [p[2] for p in curve], color=colour, lw=1,
                            alpha=1.0 if i == 0 else 0.35,
                            label=f"{name} (lr {result['lrs'][opt][name]:g})" if i == 0 else None)
            ax.set_xlabel("GFLOPs (counted)")
            ax.set_ylabel("validation loss")
            ax.set_title(f"{opt}, {len(result['seeds'])} seeds", fontsize=9)
            ax.legend(fontsize=7)


def verdict(result: dict) -> Verdict:
    found = check(result)
    label = {True: CONFIRMED, False: CONTRADICTED, INCONCLUSIVE: INCONCLUSIVE, None: NOT_MEASURABLE}[found]
    named = [(opt, name) for opt in result["curves"] for name in result["curves"][opt] if name != SINGLE]
    evidence = "; ".join(f"{opt} {name}: FLOPs {_spread(savings(result, opt, name))}" for opt, name in named)
    return Verdict(
        label,
        f"the paper's scheme, the (even, odd, fine) V-cycle under SGD, against the paper's 44%: confirmed "
        f"when the 95% interval over seeds of its FLOP saving to each seed's single-level final loss reaches "
        f"44% (holds it or lies above) and lies above 0 (a saving told apart from none), every seed reaching "
        f"the target; contradicted when the interval lies entirely below 44% (a seed that never reaches the "
        f"target enters with its upper bound); inconclusive otherwise; not measurable when the target is not "
        f"late (the last quarter of single-level training made more than {100 * LATE_SHARE:.0f}% of its loss "
        f"drop after the first quarter). Each scheme at its own tuned learning rate; AdamW and nested "
        f"iteration (our scheme) are reported, not judged",
        f"{evidence}; last quarter of single-level SGD training: {fmt(100 * lateness(result))}% of its drop "
        f"after the first quarter",
        f"FLOPs saved to the single-level loss, SGD: V-cycle {_spread(savings(result, JUDGED, V_CYCLE))} "
        f"(ours: nested {_spread(savings(result, JUDGED, NESTED))}); {len(result['seeds'])} seeds, tuned lr")


EXPERIMENT = Experiment(
    name="multilevel", title="Multilevel training in depth: FLOPs to a target loss",
    claim="Multilevel paper (Lauga et al., arXiv 2504.18590): a 12-layer, d = 256, 8-head decoder "
          "trained with SGD by cycles of two coarse models of N/2 layers (the even and the odd fine "
          "layers, each with twice the step) whose layers are copied back, then the fine model, "
          "reaches the single-level training loss with 44% fewer FLOPs. Our (even, odd, fine) "
          "V-cycle is that scheme; nested iteration (N/4 -> N/2 -> N) is our own, reported beside it.",
    paper="44% fewer FLOPs to the single-level loss (12-layer decoder, SGD, even/odd coarse cycles)",
    settings=SETTINGS, run=run, tables=tables, plot=plot, verdict=verdict,
    notes=["Width 32 and 300 single-level steps (the paper: width 256, trained to convergence) for 5 seeds "
           "and a 3-value learning-rate grid per scheme and optimizer: about 18 minutes on 2 idle cores, over "
           "the 12 planned, because 200 steps left the target early; the validation loss stands in for the "
           "paper's training loss.",
           "Seconds are the wall time of runs made one after another on a shared machine: the time saving moves "
           "with the load the runs met; the FLOP saving, counted, does not."])
