"""The time-to-quality experiment's rules on made-up curves, and its verdict following the numbers."""
import copy
import statistics

import pytest

from xbraid_transformers.app.defaults import DEFAULTS
from xbraid_transformers.app.reproduce import time_to_quality as ttq
from xbraid_transformers.app.reproduce.base import CONFIRMED, CONTRADICTED
from xbraid_transformers.app.report import reached_at, tolerance


def _curve(losses, dt=1.0):
    """(step, time, loss) evaluations every ``dt`` seconds."""
    return [[i, dt * (i + 1), loss] for i, loss in enumerate(losses)]


def test_time_to_target_on_made_up_curves():
    assert reached_at(_curve([3.0, 2.5, 2.2]), 2.0) is None                  # never
    assert reached_at(_curve([3.0, 2.0, 1.9]), 2.0) == 2.0                   # a tie reaches it
    noisy = [3.0, 2.4, 2.6, 2.15, 2.3, 1.99, 2.05, 1.9]
    assert reached_at(_curve(noisy), 2.0) == 6.0                             # the first dip below
    touch = [3.0, 1.95, 2.4, 2.5, 2.6]                                               # touches once, rises
    assert reached_at(_curve(touch, dt=0.5), 2.0) == 1.0
    assert reached_at([[0, 1.0, None], [1, 2.0, 1.0]], 2.0) == 2.0           # a missing evaluation


def test_the_tolerance_is_the_larger_of_the_relative_floor_and_twice_the_spread():
    tight = [2.000, 2.001, 2.002]                     # sd 0.001: the relative floor 0.005 x 2.001 wins
    assert tolerance(tight, 0.005) == pytest.approx(0.005 * 2.001)
    loose = [2.0, 2.1, 2.2]                           # sd 0.1: twice the spread wins
    assert tolerance(loose, 0.005) == pytest.approx(2 * statistics.stdev(loose))
    assert tolerance([2.0], 0.005) == pytest.approx(0.01)    # one seed: no spread to measure


def test_speedup_never_and_no_reference():
    assert ttq.speedup(10.0, 5.0) == 2.0
    assert ttq.speedup(10.0, None) == 0.0             # the policy never reaches the target
    assert ttq.speedup(None, 5.0) is None             # serial's own seed misses: no reference


def test_exactly_one_policy_is_the_library_default():
    defaults = [p for p in ttq.POLICIES if ttq.is_default(p)]
    assert defaults == [ttq.default_policy()]
    chosen = ttq.POLICIES[ttq.default_policy()]
    assert all(DEFAULTS[k] == v for k, v in chosen.items())
    assert DEFAULTS["mode"] == chosen["mode"]


def _result(speed: float, final_gap: float):
    """Two families, one required cell each: serial reaches its target at t = 10 s; the default
    policy runs ``speed`` times faster and ends ``final_gap`` above serial."""
    policy = ttq.default_policy()
    seeds = [0, 1, 2]

    def run(scale, end):
        losses = [3.0 - 0.1 * i for i in range(10)] + [end]
        return {"evals": [[i, scale * (i + 1), loss] for i, loss in enumerate(losses)],
                "final_eval_loss": end, "switch_step": None, "diverged": None,
                "seconds_per_step": scale, "probes": 0}

    cells = []
    for family, required in (("gpt", 1.15), ("bert", 1.32)):
        finals = {s: 2.0 + 0.001 * s for s in seeds}
        cells.append(dict(family=family, layers=8, ranks=2, required=required, clock="virtual", runs={
            "serial": {str(s): run(1.0, finals[s]) for s in seeds},
            policy: {str(s): run(1.0 / speed, finals[s] + final_gap) for s in seeds}}))
    return {"settings": dict(ttq.SETTINGS["micro"], policies=["serial", policy]), "cells": cells,
            "default_policy": policy}


def test_the_verdict_follows_the_numbers():
    assert ttq.verdict(_result(1.5, 0.0)).label == CONFIRMED
    assert ttq.verdict(_result(1.25, 0.0)).label == CONTRADICTED        # BERT needs 1.32x
    assert ttq.verdict(_result(1.5, 0.5)).label == CONTRADICTED         # fast but worse
    rows = ttq.analyse(_result(1.5, 0.0))
    fields = {"family", "layers", "ranks", "policy", "default", "seed", "time_to_target_s",
              "serial_time_to_target_s", "final_eval_loss", "serial_final_eval_loss", "tolerance", "clock"}
    assert all(fields <= set(r) for r in rows)
    assert {r["clock"] for r in rows} == {"virtual"}
    default = [r for r in rows if r["default"]]
    assert default and all(r["speedup"] == pytest.approx(1.5) for r in default)


def test_a_policy_that_never_reaches_the_target_counts_as_zero():
    result = _result(2.0, 0.0)
    broken = copy.deepcopy(result)
    for cell in broken["cells"]:
        for run in cell["runs"][result["default_policy"]].values():
            for e in run["evals"]:
                e[2] = 5.0
    summary = [r for r in ttq.summarise(ttq.analyse(broken)) if r["default"]]
    assert all(r["median"] == 0.0 and r["reached"] == 0 for r in summary)
    assert ttq.verdict(broken).label == CONTRADICTED
