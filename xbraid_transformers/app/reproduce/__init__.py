"""``xbt reproduce``: the papers' claims at small scale, each with its verdict.

Every experiment (``EXPERIMENTS``, one module each) writes ``<name>.json`` (its raw results,
settings and verdict) and ``<name>.png`` beside ``REPORT.md``, which has one section per
experiment: the paper's claim, our setting, our table and figure, and the verdict with the rule
that computed it. ``--only`` runs a subset; the report then holds the experiments whose JSON is
in the directory (earlier runs' included), so sections can be produced one at a time.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, Iterable, List, Optional

from ..provenance import provenance, provenance_line, stamped
from . import (buffers, convergence, dropout, encoder_parity, finetune, gradient_bias, indicator, multilevel,
               scaling, time_to_quality, translation)
from .base import MODES, Experiment, Verdict

# the layer-parallel paper's claims, the multilevel paper's, then the end-to-end time to quality
EXPERIMENTS: Dict[str, Experiment] = {e.name: e for e in (
    convergence.EXPERIMENT, gradient_bias.EXPERIMENT, indicator.EXPERIMENT, dropout.EXPERIMENT,
    buffers.EXPERIMENT, translation.EXPERIMENT, finetune.EXPERIMENT, encoder_parity.EXPERIMENT,
    scaling.EXPERIMENT, multilevel.EXPERIMENT, time_to_quality.EXPERIMENT)}

__all__ = ["EXPERIMENTS", "MODES", "Experiment", "Verdict", "run_experiment", "write_record", "load_records",
           "summary_table", "write_report", "reproduce"]


VERDICTS = ("Numbers over seeds read `mean [low, high]`, the 95% t-interval of the mean. A "
            "verdict is **confirmed** or **contradicted** only when the effect stands outside the "
            "noise (tolerances come from the serial runs' own seed spread); **inconclusive** when it "
            "is within the noise, ties included; **not measurable at this scale** when the run "
            "cannot show the effect at all (the section says which measurement ruled it out).")


def run_experiment(experiment: Experiment, mode: str, out_dir: str,
                   progress: Callable[[str], None] = print) -> dict:
    """Run one experiment at ``mode``'s size; writes its JSON and PNG, returns the record."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    os.makedirs(out_dir, exist_ok=True)
    facts = provenance()   # the code that runs, as it was when the run started
    start, cpu = time.perf_counter(), _cpu_seconds()
    result = experiment.run(dict(experiment.settings[mode]), progress)
    record = write_record(experiment, mode, out_dir, result, time.perf_counter() - start, facts,
                          cpu_seconds=_cpu_seconds() - cpu)
    progress(f"{experiment.name}: {record['verdict']['label']} ({record['seconds']:.0f} s)")
    return record


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children: unlike wall time, it does not grow
    when other jobs share the machine."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def write_record(experiment: Experiment, mode: str, out_dir: str, result: dict, seconds: float,
                 facts: Optional[dict] = None, cpu_seconds: Optional[float] = None) -> dict:
    """``NAME.json`` (the result with its verdict and provenance: ``facts``, by default this
    process's) and ``NAME.png`` of a finished run in ``out_dir``; returns the record."""
    figure = f"{experiment.name}.png"
    experiment.plot(result, os.path.join(out_dir, figure))
    record = stamped({"name": experiment.name, "mode": mode, "seconds": seconds,
                      **({} if cpu_seconds is None else {"cpu_seconds": cpu_seconds}), "result": result,
                      "verdict": experiment.verdict(result).as_dict(), "figure": figure},
                     facts or provenance())
    with open(os.path.join(out_dir, f"{experiment.name}.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1, allow_nan=True)
    return record


def section(record: dict) -> str:
    experiment = EXPERIMENTS[record["name"]]
    v = record["verdict"]
    return "\n\n".join([
        f"## {experiment.title} (`{experiment.name}`)",
        f"**Paper:** {experiment.claim}",
        f"**Ours** ({record['mode']} size, {_timing(record)}):",
        experiment.tables(record["result"]),
        f"![{experiment.name}]({record['figure']})",
        f"**Verdict: {v['label']}.** {v['evidence']}. Rule: {v['rule']}.",
        *(f"*Caveat:* {note}" for note in experiment.notes),
        *([provenance_line(record["provenance"])] if "provenance" in record else [])])


def _timing(record: dict) -> str:
    wall = f"{record['seconds']:.0f} s wall time"
    if "cpu_seconds" not in record:
        return wall + " on this machine"
    return f"{wall}, {record['cpu_seconds']:.0f} s CPU time on this 2-core machine"


def load_records(out_dir: str) -> List[dict]:
    """Every experiment JSON in ``out_dir``, in registry order, each verdict recomputed from the
    stored numbers by the experiment's current rule."""
    records = []
    for name, experiment in EXPERIMENTS.items():
        path = os.path.join(out_dir, f"{name}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                record = json.load(handle)
            record["verdict"] = experiment.verdict(record["result"]).as_dict()
            records.append(record)
    return records


def summary_table(records: List[dict]) -> str:
    """Claim, the paper's numbers, ours and the verdict, one row per experiment (REPORT.md's head;
    the README carries the committed report's)."""
    rows = ["| experiment | paper | ours | verdict | size |", "|---|---|---|---|---|"]
    rows += [f"| {EXPERIMENTS[r['name']].title} | {EXPERIMENTS[r['name']].paper} | "
             f"{r['verdict']['headline']} | **{r['verdict']['label']}** | {r['mode']} |"
             for r in records]
    return "\n".join(rows)


def write_report(out_dir: str) -> str:
    """REPORT.md from every experiment JSON in ``out_dir`` (in registry order)."""
    records = load_records(out_dir)
    text = "\n\n".join(["# Reproducing the papers at small scale",
                        "Generated by `xbt reproduce`; each section's raw results are the JSON "
                        "file of the same name. " + VERDICTS, summary_table(records),
                        *map(section, records)])
    path = os.path.join(out_dir, "REPORT.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    return path


def reproduce(names: Optional[Iterable[str]], mode: str, out_dir: str,
              progress: Callable[[str], None] = print) -> str:
    """Run the named experiments (all by default) and write the report; returns its path."""
    names = list(names or EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    for name in names:
        run_experiment(EXPERIMENTS[name], mode, out_dir, progress)
    return write_report(out_dir)
