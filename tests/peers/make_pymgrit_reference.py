"""Generate tests/data/pymgrit_dahlquist.json: MGRIT iterates of pymgrit (an independent peer).

Runs ONLY in a separate virtual environment that has pymgrit from PyPI, never the project's:

    python -m venv /work/venvs/pymgrit
    /work/venvs/pymgrit/bin/pip install "numpy<2.4" mpich mpi4py pymgrit==1.0.6
    /work/venvs/pymgrit/bin/python tests/peers/make_pymgrit_reference.py

Problem: pymgrit's ``Dahlquist`` application with its defaults: u' = lambda*u, lambda = -1,
u(0) = 1, method 'BE' (backward Euler: u_{i+1} = u_i / (1 - (t_{i+1}-t_i)*lambda)), on [0, 5]
with N equal intervals. N is chosen so that t_i = i*5/N is exact in binary (N = 32, 40): the
time differences pymgrit feeds to its step are then exactly h, 2h, 4h, ...

Solver: ``pymgrit.core.mgrit.Mgrit`` with nested_iteration=False, tol=0 (never met, so all
``max_iter`` iterations run), weight_c=1, GridTransferCopy (injection), one process.
The hierarchy is built like pymgrit's ``simple_setup_problem`` (level l+1 has the time points
``t_l[::m_l]``); a per-level coarsening factor uses the same construction with m_l varying.

How the iterates are extracted: pymgrit's own output hook. With ``output_lvl=2`` pymgrit
calls ``output_fcn(mgrit)`` once at the end of ``__init__`` (the initial guess, iteration 0)
and once after every iteration in ``Mgrit.solve`` (after ``iteration()`` and
``convergence_criterion()``). The hook copies ``mgrit.u[0][i].get_values()`` for every fine
point i = 0..N and ``mgrit.conv[mgrit.solve_iter]``. Nothing of pymgrit is modified.

Recorded per case:
  iterates[k]   fine values u(t_0..t_N) after iteration k (k = 0: initial guess).
  conv[k-1]     pymgrit's convergence number after iteration k (Mgrit.convergence_criterion:
                2-norm over the fine C-points c > 0 of |Phi(u_{c-1}) - u_c|, evaluated on
                the state after the iteration, i.e. after the coarse correction and the final
                F-relaxation).
  xbraid_residuals[k-1]  the residual norm measured at the place where XBraid (and our
                solver) measures it in iteration k: take iterate k-1, apply pymgrit's own
                level-0 relaxation primitives (f_relax, then cf_iter times c_relax+f_relax)
                on a separate Mgrit object, then call its convergence_criterion. Computed
                with pymgrit's functions only.

Cross-check done once by hand (not part of this script): the same cases run with pymgrit
distributed over 2, 3 and 4 MPI processes (``mpiexec -n P``), gathering ``mgrit.u[0]`` without
the ghost points, give bit-identical iterates to the one-process run stored here.
"""
from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import platform
import sys

import numpy as np
from pymgrit.core.mgrit import Mgrit
from pymgrit.dahlquist.dahlquist import Dahlquist, VectorDahlquist

T_END = 5.0
ITERS = 6
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "pymgrit_dahlquist.json")


def hierarchy(n_intervals: int, cfactors: list[int]):
    fine = Dahlquist(t_start=0.0, t_stop=T_END, nt=n_intervals + 1)  # defaults: lambda=-1, 'BE'
    assert fine.method == "BE" and fine.lambda_value == -1
    problems = [fine]
    for m in cfactors:  # same construction as pymgrit.core.simple_setup_problem
        coarse = copy.deepcopy(problems[-1])
        t = problems[-1].t[::m]
        assert (len(problems[-1].t) - 1) % m == 0
        coarse.t_start, coarse.t_end, coarse.t, coarse.nt = t[0], t[-1], t, len(t)
        problems.append(coarse)
    return problems


def make_mgrit(n_intervals, cfactors, cycle, cf_iter, iters, output_fcn=None):
    return Mgrit(problem=hierarchy(n_intervals, cfactors), max_iter=iters, tol=0.0,
                 nested_iteration=False, cf_iter=cf_iter, cycle_type=cycle, weight_c=1.0,
                 logging_lvl=logging.WARNING, output_fcn=output_fcn,
                 output_lvl=2 if output_fcn is not None else 0, t_norm=2,
                 random_init_guess=False)


def values(mgrit) -> list[float]:
    return [float(v.get_values()) for v in mgrit.u[0]]


def run_case(n_intervals, cfactors, cycle, cf_iter, iters=ITERS):
    record = {"solve_iter": [], "iterates": [], "conv": []}

    def hook(mgrit):
        record["solve_iter"].append(int(mgrit.solve_iter))
        record["iterates"].append(values(mgrit))
        if mgrit.solve_iter > 0:
            record["conv"].append(float(mgrit.conv[mgrit.solve_iter]))

    mgrit = make_mgrit(n_intervals, cfactors, cycle, cf_iter, iters, hook)
    with np.errstate(divide="ignore", invalid="ignore"):  # conv-factor logging may divide 0/0
        mgrit.solve()
    assert record["solve_iter"] == list(range(iters + 1)), record["solve_iter"]
    assert record["iterates"][-1] == values(mgrit)
    assert record["conv"] == [float(c) for c in mgrit.conv[1:iters + 1]]

    # XBraid-convention residuals, with pymgrit's primitives on a separate object.
    probe = make_mgrit(n_intervals, cfactors, cycle, cf_iter, iters)
    xres = []
    for k in range(1, iters + 1):
        probe.u[0] = [VectorDahlquist(v) for v in record["iterates"][k - 1]]
        probe.f_relax(lvl=0)
        for _ in range(cf_iter):
            probe.c_relax(lvl=0)
            probe.f_relax(lvl=0)
        probe.convergence_criterion(iteration=k)
        xres.append(float(probe.conv[k]))

    h = T_END / n_intervals
    serial = [float((1.0 / (1.0 + h)) ** i) for i in range(n_intervals + 1)]
    return {
        "name": f"N{n_intervals}_L{len(cfactors) + 1}_m{'-'.join(map(str, cfactors))}_{cycle}_cf{cf_iter}",
        "num_steps": n_intervals,
        "step_size": h,
        "levels": len(cfactors) + 1,
        "cfactors": cfactors,
        "cycle": cycle,
        "cf_iter": cf_iter,
        "iterations": iters,
        "iterates": record["iterates"],
        "conv": record["conv"],
        "xbraid_residuals": xres,
        "serial_solution_closed_form": serial,
    }


def main():
    hierarchies = {
        32: [[2], [4], [2, 2], [4, 2], [2, 2, 2]],
        40: [[2], [4], [2, 2], [2, 4]],
    }
    cases = []
    for n, hs in hierarchies.items():
        for cfactors in hs:
            for cycle in ("V", "F"):
                for cf_iter in (0, 1):
                    cases.append(run_case(n, cfactors, cycle, cf_iter))
    import mpi4py
    data = {
        "header": {
            "description": "Iterates of pymgrit's FAS-MGRIT on Dahlquist u'=-u (backward Euler), "
                           "u(0)=1, t in [0,5]; see tests/peers/make_pymgrit_reference.py",
            "pymgrit": _dist_version("pymgrit"),
            "numpy": np.__version__,
            "mpi4py": mpi4py.__version__,
            "python": platform.python_version(),
            "date": datetime.date.today().isoformat(),
            "command": "/work/venvs/pymgrit/bin/python tests/peers/make_pymgrit_reference.py",
            "problem": {"lambda": -1.0, "method": "BE", "u0": 1.0, "t_start": 0.0,
                        "t_stop": T_END, "pymgrit_step": "u_{i+1} = 1/(1 - (t_{i+1}-t_i)*lambda) * u_i"},
            "mgrit": {"nested_iteration": False, "tol": 0.0, "weight_c": 1.0,
                      "transfer": "GridTransferCopy (injection)", "t_norm": 2,
                      "random_init_guess": False, "processes": 1,
                      "initial_guess": "u(t_0)=1, u(t_i)=0 for i>0"},
            "extraction": "output_fcn hook with output_lvl=2 (called after __init__ and after "
                          "every iteration of Mgrit.solve), copying mgrit.u[0]",
            "fields": {
                "iterates[k]": "fine values u(t_0..t_N) after iteration k (k=0: initial guess)",
                "conv[k-1]": "pymgrit conv after iteration k (residual of the state after the iteration)",
                "xbraid_residuals[k-1]": "residual norm after level-0 relaxation of iterate k-1 "
                                          "(pymgrit primitives), where XBraid measures it in iteration k",
            },
        },
        "cases": cases,
    }
    with open(OUT, "w") as f:
        json.dump(data, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {len(cases)} cases to {os.path.normpath(OUT)} ({os.path.getsize(OUT)} bytes)")


def _dist_version(name):
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    sys.exit(main())
