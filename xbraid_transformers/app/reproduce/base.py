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
import statistics
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ...core.layer_parallel import find_stacks
from ...data.sources import DataSourceMissing
from ...formatting import format_number
from ...mgrit.config import MGRITConfig
from ...models import GPT, GPTConfig, ParallelConfig

__all__ = ["CONFIRMED", "CONTRADICTED", "INCONCLUSIVE", "NOT_MEASURABLE", "MODES", "Verdict",
           "Experiment", "combine", "answer", "answers", "measurable", "Spread", "sign",
           "within", "seed_tolerance", "per_seed", "text_data", "unigram_loss",
           "frequency_loss", "make_gpt", "step_generator", "batch", "optimizer_step", "train",
           "exact_network", "validation_batch", "eval_loss", "solve_histories", "last_factor",
           "mean_factor", "one_thread", "fmt", "markdown", "trailing_mean"]

CONFIRMED, CONTRADICTED, INCONCLUSIVE = "confirmed", "contradicted", "inconclusive"
NOT_MEASURABLE = "not measurable at this scale"
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
    """One verdict from several checks (True, False, ``INCONCLUSIVE`` for an effect within the
    noise, or None for not measurable): contradicted when any fails, not measurable when none
    fails but one could not be measured, inconclusive when the rest hold but one is within the
    noise, else confirmed."""
    checks = list(checks)
    if any(c is False for c in checks):
        return CONTRADICTED
    if any(c is None for c in checks):
        return NOT_MEASURABLE
    return INCONCLUSIVE if any(c == INCONCLUSIVE for c in checks) else CONFIRMED


def answer(check) -> str:
    if check == INCONCLUSIVE:
        return "within the noise"
    return {True: "yes", False: "no", None: "not measurable"}[check]


# ---------------------------------------------------------------------------- noise over seeds
# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (the normal's beyond)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class Spread:
    """Per-seed values, their mean and the 95% t-interval of the mean (no interval from one
    value: ``low`` and ``high`` are nan)."""

    values: tuple
    mean: float
    sd: float
    low: float
    high: float

    @classmethod
    def of(cls, values) -> "Spread":
        values = tuple(float(v) for v in values if v is not None and math.isfinite(v))
        if not values:
            return cls((), math.nan, math.nan, math.nan, math.nan)
        mean = statistics.fmean(values)
        if len(values) < 2:
            return cls(values, mean, math.nan, math.nan, math.nan)
        sd = statistics.stdev(values)
        freedom = len(values) - 1
        half = (_T975[freedom - 1] if freedom <= len(_T975) else 1.96) * sd / math.sqrt(len(values))
        return cls(values, mean, sd, mean - half, mean + half)

    def __str__(self) -> str:
        if math.isnan(self.low):
            return f"{fmt(self.mean)} ({len(self.values)} seed)"
        return f"{fmt(self.mean)} [{fmt(self.low)}, {fmt(self.high)}]"


def sign(differences) -> object:
    """Is the mean of the per-seed ``differences`` above zero beyond the noise? True when the
    95% interval of their mean lies above 0, False when it lies below, ``INCONCLUSIVE`` when it
    holds 0 (ties included) or there are fewer than two values."""
    spread = Spread.of(differences)
    if math.isnan(spread.low) or spread.low <= 0 <= spread.high:
        return INCONCLUSIVE
    return spread.low > 0


def within(differences, tolerance_: float) -> object:
    """Do the per-seed ``differences`` (ours minus the reference) stay within ``tolerance_``? An
    equivalence test: True when the whole 95% interval of their mean lies inside
    [-tolerance_, tolerance_]; False when it lies wholly outside (a real difference, larger than
    the tolerance); ``INCONCLUSIVE`` otherwise, and from fewer than two values."""
    spread = Spread.of(differences)
    if math.isnan(spread.low):
        return INCONCLUSIVE
    if -tolerance_ <= spread.low and spread.high <= tolerance_:
        return True
    return False if spread.low > tolerance_ or spread.high < -tolerance_ else INCONCLUSIVE


def seed_tolerance(serial_values, floor: float = 0.0) -> float:
    """The tolerance that serial training's own seed spread sets: twice the sample standard
    deviation of its per-seed values, at least ``floor`` (0 from one seed)."""
    values = [v for v in serial_values if v is not None and math.isfinite(v)]
    return max(floor, 2 * statistics.stdev(values) if len(values) > 1 else 0.0)


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


def validation_batch(data, s: dict, index: int):
    """Validation batch ``index``: the same for every seed, so that the seeds' spread is training
    noise and not a different sample of held-out text."""
    return data.get_batch("val", s["batch_size"], s["seq_len"],
                          generator=torch.Generator().manual_seed(10_000 + index))


def eval_loss(model, data, s: dict, batches: int) -> float:
    """Mean loss of the exact network over fixed validation batches."""
    with exact_network(model):
        return sum(model(*validation_batch(data, s, i))[1].item() for i in range(batches)) / batches


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
    """The reports' numbers: ``digits`` significant digits, "-" for none."""
    return format_number(x, digits)


def markdown(header: List[str], rows: List[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def trailing_mean(values: List[float], window: int) -> List[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1))
            for i in range(len(values))]


def per_seed(s: dict):
    """``(seed, settings)`` for each seed in ``s["seeds"]``: the settings with ``"seed"`` set, so
    that ``make_gpt`` and ``batch`` give that seed's initialisation and batch order."""
    for seed in s["seeds"]:
        yield seed, dict(s, seed=seed)


def unigram_loss(data) -> float:
    """The validation loss of predicting every token by its training-split frequency: the loss a
    model reaches by learning the character frequencies and no context, so a run whose eval loss
    stays above it has not trained."""
    return frequency_loss(torch.tensor(data.splits["train"], dtype=torch.long),
                          torch.tensor(data.splits["val"], dtype=torch.long), data.vocab_size)


def frequency_loss(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy on the tokens ``val`` of predicting each by its (add-one smoothed) frequency
    in ``train``."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1
    return float(-(counts / counts.sum()).log()[val].mean())


def measurable(preconditions: Dict[str, bool], checks: Dict[str, object]) -> str:
    """Not measurable when a precondition computed from the measurements fails (a run did not
    train, the regime is not the claim's), whatever the checks say; else ``combine(checks)``."""
    return combine(checks.values()) if all(preconditions.values()) else NOT_MEASURABLE


def mean_factor(residuals: List[float]) -> float:
    """The mean residual reduction per iteration, (last / first) ** (1 / (n - 1)): an average rho
    that, unlike ``last_factor``, does not read round-off once the solve has converged."""
    if len(residuals) < 2 or not residuals[0] > 0:
        return math.nan
    return (residuals[-1] / residuals[0]) ** (1 / (len(residuals) - 1))


def answers(checks: Dict[str, object]) -> str:
    """Each check with its answer, for a verdict's evidence."""
    return ", ".join(f"{name}: {answer(check)}" for name, check in checks.items())


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside the block (restored after it): on a shared machine a second
    thread of a small model's matmuls mostly waits for the first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
