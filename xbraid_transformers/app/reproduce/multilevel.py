"""Multilevel training in depth (the multilevel paper): FLOPs and wall time to a target loss for
nested iteration (N/4 -> N/2 -> N) and (even, odd, fine) V-cycles against single-level
training, under SGD with momentum and AdamW, over seeds.

The measurement is ``app.bench.multilevel`` (``benchmarks/multilevel.py`` runs it at the
benchmark's size): per family, optimizer and seed the same initial model trains single-level for
``steps`` steps and with each multilevel schedule for about twice as many cheaper steps; the
target is the worst single-level seed's final validation loss; FLOPs to the target are counted
with ``torch.utils.flop_counter`` per step of each view (forward + backward), seconds are the
training steps' wall time.
"""
from __future__ import annotations

import math
import statistics

from ...data.sources import DataSourceMissing
from ..bench.multilevel import FAMILIES, measure
from ..report import figure
from .base import Experiment, Verdict, combine, fmt, markdown

SINGLE, NESTED, V_CYCLE = "single-level", "nested N/4->N/2->N", "v-cycle"
PAPER_SAVING = 0.44            # the paper: 44 % fewer FLOPs to the same training loss

COMMON = dict(optimizers=["sgd", "adamw"], clip=1.0, schedules=[NESTED, V_CYCLE])
SETTINGS = {
    # synthetic motif text: no data package, a few seconds
    "micro": dict(COMMON, seeds=1, steps=8, phase=4, eval_every=4, families={
        "gpt": dict(source="synthetic", vocab_size=32, d_model=16, heads=2, layers=4, block=16, batch=8,
                    val_batches=2, sgd_lr=0.1)}),
    "quick": dict(COMMON, seeds=2, steps=60, phase=10, eval_every=10, families={
        "gpt": dict(d_model=32, heads=4, layers=8, block=32, batch=16, val_batches=4),
        "vit": dict(d_model=16, heads=2, layers=8, batch=32)}),
    # the benchmark's models (GPT d=64, ViT d=32, 8 layers each), 120 steps where its committed run has 500
    "full": dict(COMMON, seeds=2, steps=120, phase=20, eval_every=20, families={"gpt": {}, "vit": {}}),
}


def _families(s: dict):
    """(families built, what each trains on); GPT falls back to synthetic text and ViT is left
    out when their data packages are missing (the result says so)."""
    built, used = {}, {}
    for name, size in s["families"].items():
        try:
            built[name] = FAMILIES[name](**size)
        except (DataSourceMissing, ImportError) as error:
            reason = str(error).splitlines()[0]
            if name != "gpt":
                used[name] = f"left out ({reason})"
                continue
            built[name] = FAMILIES[name](**dict(size, source="synthetic"))
            built[name].data += f" (Shakespeare missing: {reason})"
        used[name] = built[name].data
    return built, used


def run(s: dict, progress) -> dict:
    families, used = _families(s)
    records = measure(families, s["optimizers"], s["seeds"], s["steps"], s["phase"], s["clip"],
                      names=s["schedules"], eval_every=s["eval_every"], progress=progress)
    for record in records:                  # the same keys before and after a JSON round trip
        record["curves"] = {str(seed): [list(point) for point in curve] for seed, curve in record["curves"].items()}
    return {"settings": s, "data": used, "records": records}


def _median(values):
    """Median with runs that never reached the target counted as infinitely expensive."""
    return statistics.median([math.inf if v is None else v for v in values])


def _pairs(result):
    """{(family, optimizer): {schedule: record}} in measured order."""
    pairs = {}
    for r in result["records"]:
        pairs.setdefault((r["family"], r["optimizer"]), {})[r["schedule"]] = r
    return pairs


def summary(record: dict, single: dict) -> dict:
    """Median FLOPs and seconds to the target, the saving against single-level's medians
    (1 - multilevel / single-level; negative: multilevel needs more) and the runs that reached."""
    def median(r, key):
        return _median([x[key] for x in r["runs"]])

    def saving(key):
        value, base = median(record, key), median(single, key)
        return 1 - value / base if math.isfinite(value) and math.isfinite(base) else None

    return {"flops": median(record, "flops"), "seconds": median(record, "seconds"),
            "flop_saving": saving("flops"), "time_saving": saving("seconds"),
            "reached": sum(x["flops"] is not None for x in record["runs"]), "runs": len(record["runs"])}


def _percent(x):
    return "not reached" if x is None else f"{100 * x:+.0f}%"


def _span(savings) -> str:
    """The range of the savings over the pairs, and how many pairs never reached the target."""
    reached = [x for x in savings if x is not None]
    parts = []
    if reached:
        low, high = min(reached), max(reached)
        parts.append(_percent(low) if low == high else f"{_percent(low)} to {_percent(high)}")
    if len(reached) < len(savings):
        parts.append(f"not reached in {len(savings) - len(reached)} of {len(savings)} pairs")
    return ", ".join(parts)


def tables(result: dict) -> str:
    s = result["settings"]
    rows = []
    for (family, optimizer), records in _pairs(result).items():
        single = records[SINGLE]
        for name, record in records.items():
            m = summary(record, single)
            rows.append([family, optimizer, name, f"{record['target']:.3f}", f"{m['reached']}/{m['runs']}",
                         "-" if math.isinf(m["flops"]) else fmt(m["flops"] / 1e9),
                         "-" if name == SINGLE else _percent(m["flop_saving"]),
                         "-" if math.isinf(m["seconds"]) else fmt(m["seconds"]),
                         "-" if name == SINGLE else _percent(m["time_saving"]),
                         f"{100 * PAPER_SAVING:.0f}% fewer" if name == V_CYCLE else "-"])
    data = "; ".join(f"{k}: {v}" for k, v in result["data"].items())
    sizes = "; ".join(f"{k}: " + (", ".join(f"{a}={b}" for a, b in size.items()) or "as the benchmark")
                      for k, size in s["families"].items())
    return (f"Benchmark sizes GPT d=64, 4 heads, 8 layers, 64 tokens, batch 16; ViT d=32, 4 heads, 8 layers, "
            f"batch 64; here {sizes}. {s['seeds']} seed(s), single-level {s['steps']} steps, "
            f"multilevel about {2 * s['steps']} (phases of {s['phase']} steps; nested: a third of them "
            f"on every 4th layer, then every 2nd, then all, copy prolongation; the paper's has two levels, "
            f"N/2 then N), validation loss read every "
            f"{s['eval_every']} steps and at phase ends, gradients clipped to {s['clip']}; target: the worst "
            f"single-level seed's final validation loss (the paper's: the training loss); FLOPs counted by "
            f"torch's FlopCounterMode "
            f"(matmuls, forward + backward); data: {data}. Medians over seeds (a run that never reaches "
            f"the target counts as infinite); saving = 1 - multilevel / single-level:\n\n"
            + markdown(["family", "optimizer", "schedule", "target loss", "reached", "GFLOPs to target",
                        "FLOP saving", "seconds to target", "time saving", "paper"], rows))


def plot(result: dict, path: str) -> None:
    pairs = _pairs(result)
    with figure(path, dpi=80, figsize=(4.5 * len(pairs), 3.8), ncols=len(pairs), squeeze=False) as (fig, axes):
        for ax, ((family, optimizer), records) in zip(axes[0], pairs.items()):
            for colour, (name, record) in zip(("black", "tab:blue", "tab:orange", "tab:green"), records.items()):
                for seed, curve in record["curves"].items():
                    ax.plot([p[0] / 1e9 for p in curve], [p[2] for p in curve], color=colour, lw=1,
                            alpha=1.0 if seed == "0" else 0.4, label=name if seed == "0" else None)
            ax.axhline(records[SINGLE]["target"], color="grey", ls=":", lw=1, label="target")
            ax.set_xlabel("GFLOPs (counted)")
            ax.set_ylabel("validation loss")
            ax.set_title(f"{family}, {optimizer}", fontsize=9)
            ax.legend(fontsize=7)


def checks(result: dict) -> dict:
    """Per family and optimizer: does the paper's scheme, the (even, odd, fine) V-cycle, reach the
    target with fewer median FLOPs than single-level training? None when single-level training
    did not lower the validation loss, so that no target is worth reaching."""
    out = {}
    for (family, optimizer), records in _pairs(result).items():
        single = records[SINGLE]
        untrained = min(curve[0][2] for curve in single["curves"].values())
        if not single["target"] < untrained:
            out[f"{family}/{optimizer}"] = None
            continue
        m = summary(records[V_CYCLE], single)
        out[f"{family}/{optimizer}"] = m["flop_saving"] is not None and m["flop_saving"] > 0
    return out


def verdict(result: dict) -> Verdict:
    found = checks(result)
    label = combine(found.values())
    evidence = []
    for (family, optimizer), records in _pairs(result).items():
        single = records[SINGLE]
        nested, v_cycle = summary(records[NESTED], single), summary(records[V_CYCLE], single)
        evidence.append(f"{family}/{optimizer}: nested {_percent(nested['flop_saving'])} FLOPs "
                        f"({_percent(nested['time_saving'])} time), V-cycle {_percent(v_cycle['flop_saving'])} "
                        f"FLOPs")
    savings = {name: [summary(r[name], r[SINGLE])["flop_saving"] for r in _pairs(result).values()]
               for name in (NESTED, V_CYCLE)}
    reached = {name: sum(x is not None and x >= PAPER_SAVING for x in xs) for name, xs in savings.items()}
    size = (f"; at least the paper's 44% saved in {reached[V_CYCLE]} of {len(savings[V_CYCLE])} pairs by "
            f"the V-cycle, in {reached[NESTED]} by nested iteration")
    return Verdict(label,
                   "confirmed when the paper's scheme, the (even, odd, fine) V-cycle, reaches the target "
                   "with fewer median FLOPs than single-level training for every family and both "
                   "optimizers (a run that never reaches it counts as infinite); contradicted when it does "
                   "not for one of them; not measurable when single-level training does not lower the "
                   "validation loss. The size of the saving is set beside the paper's 44%, not judged; "
                   "nested iteration is reported beside it",
                   "; ".join(evidence) + size,
                   f"FLOPs saved to the target: V-cycle {_span(savings[V_CYCLE])}, nested {_span(savings[NESTED])} "
                   f"(over {'/'.join(dict.fromkeys(family for family, _ in _pairs(result)))}, SGD and AdamW)")


EXPERIMENT = Experiment(
    name="multilevel", title="Multilevel training in depth: FLOPs to a target loss",
    claim="Multilevel paper (Lauga et al., arXiv 2504.18590): a 12-layer, d = 256, 8-head decoder "
          "trained with SGD by cycles of two coarse models of N/2 layers (the even and the odd fine "
          "layers, each with twice the step) whose layers are copied back, then the fine model, "
          "reaches the single-level training loss with 44% fewer FLOPs. Our (even, odd, fine) "
          "V-cycle is that scheme; nested iteration (N/4 -> N/2 -> N) is reported beside it.",
    paper="44% fewer FLOPs to the single-level loss (12-layer decoder, SGD, even/odd coarse cycles)",
    settings=SETTINGS, run=run, tables=tables, plot=plot, verdict=verdict)
