"""Synchronised dropout masks against fresh masks at every layer evaluation, over seeds."""
from __future__ import annotations

from ...core.layer_parallel import find_stacks
from ..report import figure
from .base import (Experiment, Spread, Verdict, answers, batch, eval_loss, fmt, make_gpt, markdown,
                   mean_factor, measurable, per_seed, sign, solve_histories, text_data, train,
                   unigram_loss)

__all__ = ["EXPERIMENT", "SETTINGS", "MASKS", "run", "tables", "plot", "verdict"]
COMMON = dict(d_model=32, heads=4, seq_len=32, batch_size=8, lr=2e-3, vocab=64, dropout=0.1,
              levels=2, cfactor=2, relax="F", source="shakespeare")
SETTINGS = {"micro": dict(COMMON, layers=8, seeds=[0, 1], iters=4, train_steps=4, eval_batches=1, source="synthetic"),
            "quick": dict(COMMON, layers=16, seeds=[0, 1, 2], iters=6, train_steps=80, eval_batches=4),
            "full": dict(COMMON, layers=16, seeds=[0, 1, 2], iters=8, train_steps=300, eval_batches=8)}
MASKS = ("synchronised", "fresh")


def run(s: dict, progress) -> dict:
    data, used = text_data(s["source"], s["vocab"], s["seeds"][0])
    out = {"data": used, "settings": s, "seeds": list(s["seeds"]), "unigram_loss": unigram_loss(data), "runs": []}
    for seed, s in per_seed(s):
        serial = make_gpt(s, data.vocab_size)
        train(serial.serial(), data, s, s["train_steps"])
        out["runs"].append({"seed": seed, "serial_eval_loss": eval_loss(serial, data, s, s["eval_batches"])})
        for name in MASKS:
            model = make_gpt(s, data.vocab_size)
            for stack in find_stacks(model):
                stack.dropout.synchronised = name == "synchronised"
            model.train()                   # dropout active while the residuals are measured
            histories = solve_histories(model, batch(data, s, 999_999), s["iters"], levels=s["levels"],
                                        cfactor=s["cfactor"], relax=s["relax"])
            model.configure(fwd_iters=2, bwd_iters=1, skip_first_downcycle=True)
            train(model.layer_parallel(), data, s, s["train_steps"])
            out["runs"][-1][name] = {**histories, "mean_factor": mean_factor(histories["fwd_residuals"]),
                                     "eval_loss": eval_loss(model, data, s, s["eval_batches"])}
            progress(f"dropout: seed {seed}, {name} masks done")
    return out


def _spreads(result):
    return {name: (Spread.of(r[name]["mean_factor"] for r in result["runs"]),
                   Spread.of(r[name]["eval_loss"] - r["serial_eval_loss"] for r in result["runs"]))
            for name in MASKS}


def tables(result: dict) -> str:
    s = result["settings"]
    rows = [[r["seed"], name, ", ".join(f"{x:.2e}" for x in r[name]["fwd_residuals"]),
             r[name]["mean_factor"], r[name]["eval_loss"], r[name]["eval_loss"] - r["serial_eval_loss"]]
            for r in result["runs"] for name in MASKS]
    return "\n\n".join([
        f"Why this regime: the solver ({s['levels']} levels, cfactor {s['cfactor']}, {s['relax']}-relaxation) "
        f"converges fast without dropout, so a loss of convergence is the masks'. GPT, {s['layers']} layers, "
        f"dropout {s['dropout']}; residuals of one batch over "
        f"{s['iters']} iterations at initialisation; then {s['train_steps']} layer-parallel steps (2 "
        f"forward / 1 backward iterations) against serial training from the same initialisation "
        f"(serial eval loss {Spread.of(r['serial_eval_loss'] for r in result['runs'])}, unigram loss "
        f"{fmt(result['unigram_loss'])}); data: {result['data']}:",
        markdown(["seed", "masks", "forward residuals", "mean forward rho", "eval loss", "gap to serial"], rows)])


def plot(result: dict, path: str) -> None:
    with figure(path, dpi=90, figsize=(6, 4)) as (fig, ax):
        for i, r in enumerate(result["runs"]):
            for name, colour in zip(MASKS, ("tab:blue", "tab:red")):
                ax.plot(r[name]["fwd_residuals"], color=colour, marker="osD^v"[i % 5], label=f"{name} seed {r['seed']}")
        ax.set(yscale="log", xlabel="MGRIT iteration (from 0)", ylabel="forward residual", title="Dropout masks")
        ax.legend(fontsize=7, ncol=2)


def verdict(result: dict) -> Verdict:
    runs, spreads = result["runs"], _spreads(result)
    preconditions = {"serial trained below the unigram loss":
                     all(r["serial_eval_loss"] < result["unigram_loss"] for r in runs)}
    checks = {f"fresh masks {what}": sign([r["fresh"][key] - r["synchronised"][key] for r in runs])
              for what, key in (("slow the forward solve", "mean_factor"), ("widen the eval gap", "eval_loss"))}
    (rho_s, gap_s), (rho_f, gap_f) = spreads["synchronised"], spreads["fresh"]
    return Verdict(
        measurable(preconditions, checks),
        "paired by seed; confirmed when both hold beyond the noise (95% interval of the mean difference above 0; "
        "below 0: contradicted; holding 0, ties included: inconclusive): the mean forward rho (residual reduction "
        "per iteration) is larger with fresh masks than with synchronised ones, and so is the eval-loss gap of "
        "layer-parallel to serial training; not measurable when serial's eval loss is not below the unigram loss",
        f"mean forward rho synchronised {rho_s}, fresh {rho_f}; eval gap to serial synchronised {gap_s}, "
        f"fresh {gap_f}; " + answers({**preconditions, **checks}),
        f"mean rho {rho_s} (synchronised) vs {rho_f} (fresh); eval gap {gap_s} vs {gap_f}")


EXPERIMENT = Experiment(
    name="dropout", title="Dropout synchronisation",
    claim="Layer-parallel paper, Sec. 3: a fresh dropout mask at every layer evaluation makes "
          "each MGRIT sweep solve a different problem and breaks convergence (reported elsewhere: "
          "rho 0.78 then 1.07-1.17 with fresh masks against 0.03 without dropout); the same mask "
          "for every evaluation of a layer within a batch restores it.",
    paper="fresh masks: rho 1.07-1.17; synchronised: converges",
    settings=SETTINGS, run=run, tables=tables, plot=plot, verdict=verdict)
