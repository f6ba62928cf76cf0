"""How far the layer-parallel gradient is from the exact one, against the forward and backward
iteration counts and the progress of training."""
from __future__ import annotations

import torch

from ..report import figure
from .base import (CONFIRMED, CONTRADICTED, Experiment, Verdict, batch, fmt, make_gpt, markdown,
                   text_data, train)

COMMON = dict(d_model=32, heads=4, seq_len=32, batch_size=8, lr=2e-3, seed=0, vocab=64,
              levels=2, cfactor=4, relax="F")
SETTINGS = {
    "micro": dict(COMMON, layers=8, train_steps=4, checkpoints=1, iters=[1, 2], source="synthetic"),
    "quick": dict(COMMON, layers=16, train_steps=300, checkpoints=3, iters=[1, 2, 3],
                  source="shakespeare"),
    "full": dict(COMMON, layers=32, train_steps=1000, checkpoints=5, iters=[1, 2, 3, 4],
                 source="shakespeare"),
}


def _gradient(model, inputs) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model(*inputs)[1].backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return grad


def _compare(model, inputs, s):
    model.eval()                          # no dropout: the bias is the solver's alone
    exact = _gradient(model.serial(), inputs)
    model.layer_parallel()
    rows = []
    for fwd in s["iters"]:
        for bwd in s["iters"]:
            model.configure(levels=s["levels"], cfactor=s["cfactor"], relax=s["relax"],
                            fwd_iters=fwd, bwd_iters=bwd)
            g = _gradient(model, inputs)
            rows.append({"fwd_iters": fwd, "bwd_iters": bwd,
                         "cosine": float(torch.nn.functional.cosine_similarity(g, exact, dim=0)),
                         "rel_error": float((g - exact).norm() / exact.norm())})
    model.train().serial()
    return rows


def run(s: dict, progress) -> dict:
    data, used = text_data(s["source"], s["vocab"], s["seed"])
    model = make_gpt(s, data.vocab_size)
    probe = batch(data, s, 999_999)
    results = [{"step": 0, "rows": _compare(model, probe, s)}]
    progress("gradient-bias: step 0")
    interval = max(1, s["train_steps"] // s["checkpoints"])
    optimizer, done = None, 0
    while done < s["train_steps"]:
        steps = min(interval, s["train_steps"] - done)
        optimizer = train(model.serial(), data, s, steps, start=done, optimizer=optimizer)
        done += steps
        results.append({"step": done, "rows": _compare(model, probe, s)})
        progress(f"gradient-bias: step {done}")
    return {"data": used, "settings": s, "checkpoints": results}


def tables(result: dict) -> str:
    s = result["settings"]
    rows = [[c["step"], r["fwd_iters"], r["bwd_iters"], r["cosine"], r["rel_error"]]
            for c in result["checkpoints"] for r in c["rows"]]
    return (f"GPT, {s['layers']} layers, {s['levels']} levels, cfactor {s['cfactor']}, "
            f"{s['relax']}-relaxation, skip on; exact gradient: serial autograd; data: "
            f"{result['data']}:\n\n"
            + markdown(["training step", "forward iters", "backward iters", "cosine", "relative error"],
                       rows))


def plot(result: dict, path: str) -> None:
    with figure(path, dpi=90, figsize=(7, 4)) as (fig, ax):
        iters = result["settings"]["iters"]
        for c in result["checkpoints"]:
            for vary, fixed, ls in (("fwd_iters", "bwd_iters", "-"), ("bwd_iters", "fwd_iters", "--")):
                pts = [(r[vary], r["rel_error"]) for r in c["rows"] if r[fixed] == iters[0]]
                ax.plot(*zip(*pts), ls=ls, marker="o", ms=3,
                        label=f"step {c['step']}: vary {vary.split('_')[0]}")
        ax.set_xlabel("iterations")
        ax.set_ylabel("relative gradient error")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title("Layer-parallel gradient vs exact")


def verdict(result: dict) -> Verdict:
    lo, hi = result["settings"]["iters"][0], result["settings"]["iters"][1]
    wins, cases = 0, []
    for c in result["checkpoints"]:
        err = {(r["fwd_iters"], r["bwd_iters"]): r["rel_error"] for r in c["rows"]}
        more_fwd, more_bwd = err[(hi, lo)], err[(lo, hi)]
        wins += more_fwd < more_bwd
        cases.append(f"step {c['step']}: error ({hi},{lo}) {fmt(more_fwd)} vs ({lo},{hi}) {fmt(more_bwd)}")
    n = len(result["checkpoints"])
    label = CONFIRMED if wins > n / 2 else CONTRADICTED
    return Verdict(label, f"confirmed when one more forward iteration lowers the gradient error more "
                          f"than one more backward iteration (({hi},{lo}) vs ({lo},{hi}) "
                          f"forward/backward) at most checkpoints",
                   f"{wins} of {n} checkpoints; " + "; ".join(cases),
                   f"one more forward iteration helps more than one more backward at {wins} of {n} "
                   f"checkpoints")


EXPERIMENT = Experiment(
    name="gradient-bias", title="Gradient bias of inexact MGRIT",
    claim="Layer-parallel paper, Sec. 4: inexact MGRIT gives biased gradients; the forward solve "
          "needs more iterations than the backward one (the loss is more sensitive to forward "
          "error), and one backward iteration is often enough (the runs use 1-3 forward, 1-2 "
          "backward).",
    paper="forward needs more iterations than backward (runs use 1-3 forward, 1-2 backward)",
    settings=SETTINGS, run=run, tables=tables, plot=plot, verdict=verdict)
