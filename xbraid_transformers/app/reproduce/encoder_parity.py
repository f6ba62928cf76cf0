"""The same layer-parallel training on 1, 2, 4 (8) processes: the paper's MC result."""
from __future__ import annotations

from ...distributed import spawn
from ...mgrit.config import MGRITConfig
from ..tasks import TaskConfig, build_task
from ..trainer import TrainConfig, Trainer, seed_everything
from ..report import figure
from .base import CONFIRMED, CONTRADICTED, Experiment, Verdict, fmt, markdown

COMMON = dict(d_model=32, heads=4, seq_len=12, batch_size=16, vocab=8, lr=3e-3, seed=0)
SETTINGS = {
    "micro": dict(COMMON, d_model=16, layers=8, steps=4, eval_every=2, ranks=[1, 2]),
    "quick": dict(COMMON, layers=16, steps=60, eval_every=10, ranks=[1, 2, 4]),
    "full": dict(COMMON, layers=32, steps=200, eval_every=10, ranks=[1, 2, 4, 8]),
}
TOLERANCE = 1e-5


def _train(comm, task_cfg: TaskConfig, train_cfg: TrainConfig):
    seed_everything(task_cfg.seed)
    trainer = Trainer(build_task(task_cfg, comm), train_cfg)
    trainer.fit()
    return [(r["step"], r["loss"], r.get("eval_loss")) for r in trainer.history] if trainer.is_main else None


def run(s: dict, progress) -> dict:
    # the paper's MC runs: 2 levels, cfactor 2, 1 forward / 1 backward iteration
    mgrit = MGRITConfig(levels=2, cfactor=2, relax="F", fwd_iters=1, bwd_iters=1)
    task_cfg = TaskConfig(name="synthetic", layers=s["layers"], d_model=s["d_model"], heads=s["heads"],
                          seq_len=s["seq_len"], batch_size=s["batch_size"], vocab=s["vocab"],
                          seed=s["seed"], mgrit=mgrit)
    train_cfg = TrainConfig(mode="parallel", steps=s["steps"], lr=s["lr"], eval_every=s["eval_every"],
                            progress=False, virtual_time=False, seed=s["seed"])
    curves = {}
    for ranks in s["ranks"]:
        history = spawn(_train, ranks, task_cfg, train_cfg)[0]
        curves[ranks] = {"steps": [h[0] for h in history], "loss": [h[1] for h in history],
                         "eval_loss": [h[2] for h in history if h[2] is not None]}
        progress(f"encoder-parity: {ranks} process(es) done")
    return {"settings": s, "curves": {str(k): v for k, v in curves.items()}}


def _deviation(result) -> dict:
    """Largest relative difference of each run's training and evaluation losses from 1 process."""
    one = result["curves"]["1"]
    out = {}
    for ranks, c in result["curves"].items():
        pairs = list(zip(c["loss"], one["loss"])) + list(zip(c["eval_loss"], one["eval_loss"]))
        out[ranks] = max(abs(a - b) / abs(b) for a, b in pairs)
    return out


def tables(result: dict) -> str:
    s = result["settings"]
    dev = _deviation(result)
    rows = [[ranks, c["loss"][-1], c["eval_loss"][-1] if c["eval_loss"] else None, dev[ranks]]
            for ranks, c in result["curves"].items()]
    return (f"Stand-in for the paper's MC task (per-token morphological tags on GUM, not available "
            f"offline): the synthetic per-token counting task, a {s['layers']}-layer pre-LN encoder "
            f"(d_model {s['d_model']}), layer-parallel throughout (2 levels, cfactor 2, "
            f"F-relaxation, 1 forward / 1 backward iteration), {s['steps']} steps, evaluation every "
            f"{s['eval_every']}:\n\n"
            + markdown(["processes", "final train loss", "final eval loss",
                        "largest relative difference from 1 process"], rows))


def plot(result: dict, path: str) -> None:
    with figure(path, dpi=90, figsize=(6, 4)) as (fig, ax):
        for ranks, c in result["curves"].items():
            ax.plot(c["steps"], c["loss"], lw=3 if ranks == "1" else 1, ls="-" if ranks == "1" else "--",
                    label=f"{ranks} process(es)")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
        ax.set_title("Layer-parallel training on 1, 2, 4 processes")


def verdict(result: dict) -> Verdict:
    dev = _deviation(result)
    worst = max(dev.values())
    return Verdict(CONFIRMED if worst <= TOLERANCE else CONTRADICTED,
                   f"confirmed when every run's training and evaluation losses equal the 1-process "
                   f"run's to a relative {TOLERANCE:g}",
                   "largest relative difference " + ", ".join(f"{r} processes {fmt(d)}" for r, d in dev.items()),
                   f"largest relative loss difference to 1 process {fmt(worst)} "
                   f"({', '.join(dev)} processes)")


EXPERIMENT = Experiment(
    name="encoder-parity", title="Encoder training on several processes (MC)",
    claim="Layer-parallel paper, Fig. 3 (MC): a 64-layer encoder trained layer-parallel on 1, 2, 4 "
          "and 8 GPUs (2 levels, cfactor 2) reaches the same accuracy as serial training, whatever "
          "the number of devices.",
    paper="same accuracy on 1, 2, 4, 8 GPUs",
    settings=SETTINGS, run=run, tables=tables, plot=plot, verdict=verdict)
