"""Synchronised dropout masks against fresh masks at every layer evaluation."""
from __future__ import annotations

import math

from ...core.layer_parallel import find_stacks
from ..report import figure
from .base import (CONFIRMED, CONTRADICTED, Experiment, Verdict, batch, eval_loss, fmt, make_gpt,
                   markdown, solve_histories, text_data, train)

COMMON = dict(d_model=32, heads=4, seq_len=32, batch_size=8, lr=2e-3, seed=0, vocab=64,
              dropout=0.1, levels=2, cfactor=2, relax="F")
SETTINGS = {
    "micro": dict(COMMON, layers=8, iters=4, train_steps=4, eval_batches=1, source="synthetic"),
    "quick": dict(COMMON, layers=16, iters=6, train_steps=150, eval_batches=4, source="shakespeare"),
    "full": dict(COMMON, layers=32, iters=8, train_steps=400, eval_batches=8,
                 source="shakespeare"),
}


def _synchronise(model, on: bool):
    for stack in find_stacks(model):
        stack.dropout.synchronised = on


def run(s: dict, progress) -> dict:
    data, used = text_data(s["source"], s["vocab"], s["seed"])
    probe = batch(data, s, 999_999)
    out = {"data": used, "settings": s, "runs": {}}
    serial = make_gpt(s, data.vocab_size)
    train(serial.serial(), data, s, s["train_steps"])
    out["serial_eval_loss"] = eval_loss(serial, data, s, s["eval_batches"])
    for name, on in (("synchronised", True), ("fresh", False)):
        model = make_gpt(s, data.vocab_size)
        _synchronise(model, on)
        model.train()                       # dropout active while the residuals are measured
        histories = solve_histories(model, probe, s["iters"], levels=s["levels"],
                                    cfactor=s["cfactor"], relax=s["relax"])
        model.configure(fwd_iters=2, bwd_iters=1, skip_first_downcycle=True)
        train(model.layer_parallel(), data, s, s["train_steps"])
        out["runs"][name] = {**histories, "eval_loss": eval_loss(model, data, s, s["eval_batches"])}
        progress(f"dropout: {name} masks done")
    return out


def tables(result: dict) -> str:
    s = result["settings"]
    rows = [[name, ", ".join(f"{x:.2e}" for x in r["fwd_residuals"]), r["rho_forward"],
             r["rho_backward"], r["eval_loss"], r["eval_loss"] - result["serial_eval_loss"]]
            for name, r in result["runs"].items()]
    return (f"GPT, {s['layers']} layers, dropout {s['dropout']}, {s['levels']} levels, cfactor "
            f"{s['cfactor']}, {s['relax']}-relaxation; residuals of one batch with {s['iters']} "
            f"iterations; then {s['train_steps']} layer-parallel steps (2 forward / 1 backward "
            f"iterations) against serial training (eval loss {fmt(result['serial_eval_loss'])}); "
            f"data: {result['data']}:\n\n"
            + markdown(["masks", "forward residuals", "rho forward", "rho backward", "eval loss",
                        "gap to serial"], rows))


def plot(result: dict, path: str) -> None:
    with figure(path, dpi=90, figsize=(6, 4)) as (fig, ax):
        for name, r in result["runs"].items():
            ax.plot(range(1, len(r["fwd_residuals"]) + 1), r["fwd_residuals"], marker="o", label=f"{name} forward")
            ax.plot(range(1, len(r["bwd_residuals"]) + 1), r["bwd_residuals"], marker="s", ls="--",
                    label=f"{name} backward")
        ax.set_yscale("log")
        ax.set_xlabel("MGRIT iteration")
        ax.set_ylabel("residual norm")
        ax.legend(fontsize=8)
        ax.set_title("Dropout: synchronised vs fresh masks")


def verdict(result: dict) -> Verdict:
    sync, fresh = result["runs"]["synchronised"], result["runs"]["fresh"]
    drop_sync = sync["fwd_residuals"][-1] / sync["fwd_residuals"][0]
    drop_fresh = fresh["fwd_residuals"][-1] / fresh["fwd_residuals"][0]
    ok = drop_sync < drop_fresh and (math.isnan(fresh["rho_forward"]) or sync["rho_forward"] < fresh["rho_forward"])
    return Verdict(CONFIRMED if ok else CONTRADICTED,
                   "confirmed when the forward residual falls further over the iterations with "
                   "synchronised masks than with fresh ones, and its last rho is smaller",
                   f"forward residual reduction: synchronised {fmt(drop_sync)}, fresh {fmt(drop_fresh)}; "
                   f"rho forward {fmt(sync['rho_forward'])} vs {fmt(fresh['rho_forward'])}; eval "
                   f"loss gap to serial {fmt(sync['eval_loss'] - result['serial_eval_loss'])} vs "
                   f"{fmt(fresh['eval_loss'] - result['serial_eval_loss'])}",
                   f"residual falls to {fmt(drop_sync)} (synchronised) vs {fmt(drop_fresh)} (fresh) "
                   f"of its start; eval gap {fmt(sync['eval_loss'] - result['serial_eval_loss'])} vs "
                   f"{fmt(fresh['eval_loss'] - result['serial_eval_loss'])}")


EXPERIMENT = Experiment(
    name="dropout", title="Dropout synchronisation",
    claim="Layer-parallel paper, Sec. 3: a fresh dropout mask at every layer evaluation makes "
          "each MGRIT sweep solve a different problem and breaks convergence (reported elsewhere: "
          "rho 0.78 then 1.07-1.17 with fresh masks against 0.03 without dropout); the same mask "
          "for every evaluation of a layer within a batch restores it.",
    paper="fresh masks: rho 1.07-1.17; synchronised: converges",
    settings=SETTINGS, run=run, tables=tables, plot=plot, verdict=verdict)
