"""Our MGRIT solver against an independent peer: pymgrit 1.0.6 (PyPI), iteration by iteration.

Where the numbers come from: ``tests/data/pymgrit_dahlquist.json`` was produced by
``tests/peers/make_pymgrit_reference.py``, run in a separate virtual environment that has
pymgrit (``/work/venvs/pymgrit/bin/python tests/peers/make_pymgrit_reference.py``; its header
records the versions, date and command). pymgrit is NOT needed here: this test only reads
the JSON.

Problem: u' = -u, u(0) = 1, backward Euler on [0, 5] with N = 32 or 40 equal steps (pymgrit's
``Dahlquist`` application, method 'BE'). pymgrit runs with ``nested_iteration=False``,
``tol=0``, ``weight_c=1``, injection, one process; its initial guess is u(t_i) = 0 for i > 0.
For every case the JSON holds the fine values u(t_0..t_N) after each iteration (extracted with
pymgrit's ``output_fcn`` hook, ``output_lvl=2``), pymgrit's convergence numbers ``conv``, and
``xbraid_residuals`` (pymgrit's own level-0 relaxation + residual routine applied to the
previous iterate: the residual where XBraid and our solver measure it).

Mapping of pymgrit's options to ours:
    pymgrit cf_iter = c      ->  relax = "F" + "CF" * c   (same on every non-coarsest level)
    cycle_type 'V' / 'F'     ->  cycle 'V' / 'F'
    coarsening factors m_l   ->  cfactor (an int, or the per-level list)
    nested_iteration=False   ->  skip_first_downcycle=False, initial_guess="zeros"
    tol=0, max_iter=K        ->  tol=0, rtol=0, fwd_iters=K
Residuals: pymgrit's ``conv[k]`` is the C-point residual of the state AFTER iteration k; ours
(XBraid's convention) is measured in iteration k after the relaxation, before restriction.
With F-relaxation (c = 0) the relaxation does not change an F-relaxed state, so our
residuals[k] (iteration k+1) must equal pymgrit's conv after iteration k.
"""
import json
from pathlib import Path

import pytest
import torch

from xbraid_transformers import MGRITConfig
from xbraid_transformers.mgrit import solve

F64 = torch.float64
DATA = json.loads((Path(__file__).parent / "data" / "pymgrit_dahlquist.json").read_text())
CASES = DATA["cases"]
LAMBDA = DATA["header"]["problem"]["lambda"]

# Iterates: differences only come from the order of floating-point operations in the FAS
# right-hand side (pymgrit: (Phi(u) - u_c) + v_c - Phi_c(v); ours: Phi(u) - Phi_c(v)).
ITERATE_TOL = dict(rtol=1e-12, atol=1e-15)
# Residual norms are differences of O(1) numbers: their error is absolute, ~1e-17 here.
RESIDUAL_TOL = dict(rtol=1e-12, atol=1e-15)


def pymgrit_backward_euler(u, n, dt):
    """pymgrit's Dahlquist 'BE' step, written with the same floating-point operations."""
    return (1.0 / (1.0 - dt * LAMBDA)) * u


def config_for(case):
    cfactors = case["cfactors"]
    return MGRITConfig(
        levels=case["levels"],
        cfactor=cfactors[0] if len(set(cfactors)) == 1 else list(cfactors),
        relax="F" + "CF" * case["cf_iter"],
        cycle=case["cycle"],
        skip_first_downcycle=False,
        fwd_iters=case["iterations"],
        tol=0.0,
        rtol=0.0,
        initial_guess="zeros",
    )


def run_ours(case):
    iterates = {}

    def callback(k, states):
        iterates[k] = torch.stack([s.detach().clone().reshape(()) for s in states])

    u0 = torch.tensor(case["iterates"][0][0], dtype=F64)
    result = solve(pymgrit_backward_euler, u0, num_steps=case["num_steps"],
                   step_size=case["step_size"], config=config_for(case), callback=callback)
    return result, iterates


@pytest.fixture(scope="module")
def ours():
    cache = {}

    def get(case):
        if case["name"] not in cache:
            cache[case["name"]] = run_ours(case)
        return cache[case["name"]]

    return get


def ids(cases):
    return [c["name"] for c in cases]


def test_reference_file_is_what_the_docstring_says():
    header = DATA["header"]
    assert header["pymgrit"] == "1.0.6"
    assert header["mgrit"]["nested_iteration"] is False
    assert len(CASES) >= 24
    for case in CASES:
        assert case["iterates"][0] == [1.0] + [0.0] * case["num_steps"]  # initial_guess="zeros"
        assert len(case["iterates"]) == case["iterations"] + 1
        assert all(len(u) == case["num_steps"] + 1 for u in case["iterates"])


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_iterates_match_pymgrit(case, ours):
    result, iterates = ours(case)
    assert result.iterations == case["iterations"]
    assert sorted(iterates) == list(range(1, case["iterations"] + 1))
    for k in range(1, case["iterations"] + 1):
        expected = torch.tensor(case["iterates"][k], dtype=F64)
        torch.testing.assert_close(
            iterates[k], expected, **ITERATE_TOL,
            msg=lambda m, k=k: f"{case['name']}: iteration {k} differs from pymgrit\n{m}")


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_residuals_match_pymgrit(case, ours):
    result, _ = ours(case)
    got = torch.tensor(result.residuals, dtype=F64)
    torch.testing.assert_close(got, torch.tensor(case["xbraid_residuals"], dtype=F64),
                               **RESIDUAL_TOL)
    if case["cf_iter"] == 0:
        # pymgrit's own convergence numbers, shifted by one iteration.
        torch.testing.assert_close(got[1:], torch.tensor(case["conv"][:-1], dtype=F64),
                                   **RESIDUAL_TOL)
