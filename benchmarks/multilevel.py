"""Multilevel training in depth versus single-level training: FLOPs and time to a target loss.

    python benchmarks/multilevel.py                     # GPT on Shakespeare + ViT on MNIST-5k
    python benchmarks/multilevel.py --quick             # fewer steps and seeds
    python benchmarks/multilevel.py --smoke             # tiny models, a few steps, a temporary directory

For each family, optimizer (SGD with momentum, AdamW) and seed, the same initial model is
trained (a) single-level for ``--steps`` steps and (b) with each multilevel schedule. The target
is the validation loss every single-level seed reaches within its budget (the worst seed's final
loss); the multilevel runs get twice that budget in optimisation steps. FLOPs are counted per
training step of each view with ``torch.utils.flop_counter.FlopCounterMode`` (forward +
backward, counted once per view and batch shape), not estimated from time. The validation
loss of the fine model is evaluated every ``--phase`` steps and at the end of every phase;
every run clips its gradients to norm ``--clip``. Writes ``benchmarks/results/multilevel.json``
and a Markdown table beside it (or into ``--out``). The measurement itself is
``xbraid_transformers.app.bench.multilevel`` (shared with ``xbt reproduce``'s experiment).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from xbraid_transformers.app.bench.multilevel import FAMILIES, measure
from xbraid_transformers.app.provenance import provenance, write_json, write_markdown

# the quick run reads fewer validation batches of text; the smoke run has tiny models on the same data
QUICK_SIZES = {"gpt": dict(val_batches=4), "vit": {}}
SMOKE_SIZES = {"gpt": dict(d_model=16, heads=2, layers=4, block=16, batch=4, val_batches=1),
               "vit": dict(d_model=16, heads=2, layers=4, batch=8, train_size=200, val_size=100)}
SMOKE_SCHEDULES = ["v-cycle", "nested N/4->N/2->N"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adamw"], choices=["sgd", "adamw"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--phase", type=int, default=25,
                        help="steps of a V-cycle phase; also the evaluation interval")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    parser.add_argument("--schedules", nargs="+", metavar="NAME",
                        help="only these multilevel schedules (single-level always runs: it sets the target)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="4-layer models of width 16, SGD, 2 schedules, 8 steps (a check that it runs)")
    parser.add_argument("--out", type=Path,
                        help="directory of the results (default: benchmarks/results; with --smoke a temporary "
                             "directory)")
    args = parser.parse_args(argv)
    sizes = {name: {} for name in FAMILIES}
    if args.quick:
        args.seeds, args.steps, args.phase = 1, 60, 10
        sizes = QUICK_SIZES
    if args.smoke:
        args.seeds, args.steps, args.phase, args.optimizers = 1, 8, 2, ["sgd"]
        args.schedules = args.schedules or SMOKE_SCHEDULES
        sizes = SMOKE_SIZES
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="multilevel-")) if args.smoke else Path(__file__).parent / "results"
    facts = provenance()
    torch.set_num_threads(1)
    families = {name: FAMILIES[name](**sizes[name]) for name in args.families}
    results = measure(families, args.optimizers, args.seeds, args.steps, args.phase, args.clip,
                      names=args.schedules)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(str(args.out / "multilevel.json"), dict(args={k: str(v) for k, v in vars(args).items()},
                                                       results=results), facts)
    table = markdown(results)
    write_markdown(str(args.out / "multilevel.md"), table, facts)
    print(table)
    print(f"wrote {args.out}/multilevel.json and .md")


def _spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "not reached"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def markdown(results):
    lines = ["| family | optimizer | schedule | target val loss | FLOP ratio to target (median [min, max]) "
             "| wall-time ratio | reached |", "|---|---|---|---|---|---|---|"]
    for r in results:
        reached = sum(x["flops"] is not None for x in r["runs"])
        lines.append(f"| {r['family']} | {r['optimizer']} | {r['schedule']} | {r['target']:.3f} | "
                     f"{_spread([x['flop_ratio'] for x in r['runs']])} | "
                     f"{_spread([x['time_ratio'] for x in r['runs']])} | {reached}/{len(r['runs'])} |")
    lines.append("")
    lines.append("Ratios are single-level / multilevel (above 1: multilevel needs fewer). FLOPs per "
                 "step (forward + backward) by view: " + "; ".join(
                     f"{r['family']} " + ", ".join(f"{k}={v / 1e6:.1f}M" for k, v in r["flops_per_step"].items())
                     for r in results[:: max(1, len(results) // max(1, len({x['family'] for x in results})))]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
