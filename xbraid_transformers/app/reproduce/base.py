"""What every reproduction experiment shares: its description, its sizes per mode, the verdict
rule, and the small GPT set-up most of them measure on.

An experiment is a registry entry (``Experiment``): the paper's claim with its reference, the
settings of the three sizes (``micro`` for the test suite, ``quick`` for ``--quick``, ``full``),
``run(settings, progress) -> result`` (plain JSON data), ``tables(result)`` (Markdown),
``plot(result, path)`` (one PNG of the data in the tables) and ``verdict(result)``, computed from
the measured numbers by the rule it states.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ...core.layer_parallel import find_stacks
from ...data.sources import DataSourceMissing
from ...mgrit.config import MGRITConfig
from ...models import GPT, GPTConfig, ParallelConfig

CONFIRMED, CONTRADICTED, NOT_MEASURABLE = "confirmed", "contradicted", "not measurable at this scale"
MODES = ("micro", "quick", "full")


@dataclass
class Verdict:
    """The verdict, the rule that produced it, the numbers the rule read, and those numbers in a
    phrase for the summary tables (REPORT.md and the README)."""

    label: str
    rule: str
    evidence: str
    headline: str

    def as_dict(self) -> dict:
        return {"label": self.label, "rule": self.rule, "evidence": self.evidence,
                "headline": self.headline}


@dataclass
class Experiment:
    name: str
    title: str
    claim: str            # the paper's claim and numbers, with the figure or table
    paper: str            # those numbers in a phrase, for the summary tables
    settings: Dict[str, dict]
    run: Callable[[dict, Callable[[str], None]], dict]
    tables: Callable[[dict], str]
    plot: Callable[[dict, str], None]
    verdict: Callable[[dict], Verdict]
    notes: List[str] = field(default_factory=list)   # what the size or the stand-in limits, in the report


def combine(checks) -> str:
    """One verdict from several checks (True, False, or None for not measurable): contradicted
    when any fails, not measurable when none fails but one could not be measured, else
    confirmed."""
    checks = list(checks)
    if any(c is False for c in checks):
        return CONTRADICTED
    return NOT_MEASURABLE if any(c is None for c in checks) else CONFIRMED


def answer(check) -> str:
    return {True: "yes", False: "no", None: "not measurable"}[check]


# ---------------------------------------------------------------------------- the GPT set-up
def text_data(source: str, vocab: int, seed: int):
    """(token data, what was used): Shakespeare when asked for and installed, else synthetic
    motif text (which the result then says)."""
    from ...data.synthetic import synthetic_lm
    if source == "shakespeare":
        try:
            from ...data.text import shakespeare_lm
            return shakespeare_lm("char"), "Shakespeare, characters"
        except (DataSourceMissing, ImportError) as error:
            reason = str(error).splitlines()[0]
            return synthetic_lm(vocab, seed=seed), f"synthetic motifs (Shakespeare missing: {reason})"
    return synthetic_lm(vocab, seed=seed), "synthetic motifs"


def make_gpt(s: dict, vocab: int, *, layers: Optional[int] = None, final_time: float = 1.0,
             buffer_layers=(0, 0), dropout: Optional[float] = None,
             mgrit: Optional[MGRITConfig] = None) -> GPT:
    """The experiments' GPT: ``s`` holds d_model, heads, seq_len, layers, seed."""
    torch.manual_seed(s["seed"])
    parallel = ParallelConfig(mgrit=mgrit or MGRITConfig(levels=2, cfactor=2), final_time=final_time,
                              buffer_layers=tuple(buffer_layers), dropout_seed=s["seed"])
    return GPT(GPTConfig(vocab_size=vocab, block_size=s["seq_len"], d_model=s["d_model"],
                         n_heads=s["heads"], num_layers=layers or s["layers"],
                         dropout=s.get("dropout", 0.0) if dropout is None else dropout,
                         parallel=parallel))


def step_generator(s: dict, step: int) -> torch.Generator:
    """The random stream of batch ``step`` of a run seeded ``s["seed"]``: every run and scheme
    of an experiment sees the same batches in the same order."""
    return torch.Generator().manual_seed(s["seed"] * 100_003 + step)


def batch(data, s: dict, step: int, split: str = "train"):
    return data.get_batch(split, s["batch_size"], s["seq_len"], generator=step_generator(s, step))


def optimizer_step(model, optimizer, loss) -> float:
    """One step on ``loss``, the gradient clipped to norm 1 as in every experiment; returns the
    loss."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def train(model, data, s: dict, steps: int, start: int = 0, lr: Optional[float] = None,
          optimizer=None, every: Optional[int] = None, on_step=None):
    """AdamW steps on ``data``'s batches ``start..start+steps-1``; ``on_step(step, loss)`` after
    each (``every``: only every so many steps and at the last). Returns the optimizer."""
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr or s["lr"])
    model.train()
    for step in range(start, start + steps):
        loss = optimizer_step(model, optimizer, model(*batch(data, s, step))[1])
        if on_step is not None and (every is None or (step - start + 1) % every == 0
                                    or step == start + steps - 1):
            on_step(step, loss)
    return optimizer


@contextlib.contextmanager
def exact_network(model):
    """The model in eval mode with every layer-parallel stack serial (the exact network) inside
    the block; each stack's mode and training mode are restored after it."""
    stacks = find_stacks(model)
    modes = [stack.parallel for stack in stacks]
    model.eval().serial()
    try:
        with torch.no_grad():
            yield model
    finally:
        for stack, parallel in zip(stacks, modes):
            stack.set_parallel(parallel)
        model.train()


def eval_loss(model, data, s: dict, batches: int) -> float:
    """Mean loss of the exact network over fixed validation batches."""
    with exact_network(model):
        return sum(model(*batch(data, s, 10_000 + i, "val"))[1].item()
                   for i in range(batches)) / batches


def solve_histories(model, inputs, iters: int, **options) -> dict:
    """One layer-parallel forward and backward with ``iters`` iterations each (no tolerance, no
    skip: every iteration has a residual); returns both residual histories and the last
    convergence factor of each (nan when it cannot be formed)."""
    model.layer_parallel()
    model.configure(fwd_iters=iters, bwd_iters=iters, tol=0.0, rtol=0.0, skip_first_downcycle=False,
                    **options)
    model.zero_grad(set_to_none=True)
    model(*inputs)[1].backward()
    stats = model.stats
    model.zero_grad(set_to_none=True)
    return {"fwd_residuals": list(stats.fwd_residuals), "bwd_residuals": list(stats.bwd_residuals),
            "rho_forward": last_factor(stats.fwd_residuals),
            "rho_backward": last_factor(stats.bwd_residuals)}


def last_factor(residuals: List[float]) -> float:
    r = [x for x in residuals]
    if len(r) < 2 or not r[-2] > 0:
        return math.nan
    return r[-1] / r[-2]


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def markdown(header: List[str], rows: List[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def trailing_mean(values: List[float], window: int) -> List[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1))
            for i in range(len(values))]
